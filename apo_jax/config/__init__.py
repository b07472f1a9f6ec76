"""A run's config: one typed tree of fields, the presets over it, and its validation.

- `tree.RunConfig`: every field with its default, help and check; `validate(c, device_count=...)`
  checks a ConfigDict into a frozen RunConfig.
- `presets.base_config(loss, preset)`: the ConfigDict that configs/*.py return (the tree's
  defaults, the preset applied); `with_overrides` sets dotted fields as the command line does.
- `doc`: the field table of docs/training.md, written from the tree.
"""

from apo_jax.config.objective import (
    DEMO_BETA,
    DEMO_SEQ_LEN,
    REFERENCE_MODES,
    DataSettings,
    LossSettings,
    ReferenceSettings,
)
from apo_jax.config.presets import RUN_PRESETS, base_config, inner_run_overrides, with_overrides
from apo_jax.config.sections import (
    DEMO_SAMPLE_PROMPTS,
    SAMPLE_PROMPTS,
    CheckpointSettings,
    DemoSettings,
    MeshShape,
    ModelSettings,
    SamplesSettings,
)
from apo_jax.config.tree import RunConfig, validate
from apo_jax.errors import ConfigError

__all__ = [
    "DEMO_BETA",
    "DEMO_SAMPLE_PROMPTS",
    "DEMO_SEQ_LEN",
    "REFERENCE_MODES",
    "RUN_PRESETS",
    "SAMPLE_PROMPTS",
    "CheckpointSettings",
    "ConfigError",
    "DataSettings",
    "DemoSettings",
    "LossSettings",
    "MeshShape",
    "ModelSettings",
    "ReferenceSettings",
    "RunConfig",
    "SamplesSettings",
    "base_config",
    "validate",
    "with_overrides",
    "inner_run_overrides",
]
