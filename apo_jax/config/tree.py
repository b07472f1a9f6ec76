"""The run config's tree, `RunConfig`, and `validate`, which checks a ConfigDict into it.

The tree is the one declaration of every setting: each field carries its default, a one-line help
and its check (`apo_jax.config.fields`). From it come the ConfigDict that `configs/*.py` return
and the command line overrides (`presets.base_config`), the field table of docs/training.md
(`python -m apo_jax.config.doc`) and, through `validate`, the frozen `RunConfig` the rest of the
run receives. A validated RunConfig has one vocabulary for each setting: the reference mode is
'precomputed', 'online' or 'none', the mesh has its real sizes, the data layout is a Layout object
(None for auto until `train.data.resolve_layout` picks), the demo preset's -1 values are resolved.
Checks of one field sit on the field, checks across a section's fields beside the section
(`objective.py`, `sections.py`), the mesh rule in `sharding` and the distributed settings in
`distributed`; each message names the field and what to do.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from apo_jax import distributed as distributed_lib
from apo_jax.config import fields, objective, sections
from apo_jax.config.fields import above, at_least, field, section
from apo_jax.config.objective import DataSettings, LossSettings, ReferenceSettings
from apo_jax.config.sections import (
    CheckpointSettings,
    DemoSettings,
    MeshShape,
    ModelSettings,
    SamplesSettings,
)
from apo_jax.errors import ConfigError
from apo_jax.models.lora import LoraConfig
from apo_jax.optim import OptimConfig


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The run's settings: the config tree, and once validated the frozen form runs receive."""

    preset: str = field("demo", "which preset filled the fields (informational)")
    seed: int = field(0, "model init, data shuffle and step RNG")
    model: ModelSettings = section(ModelSettings, "the model")
    lora: LoraConfig = section(LoraConfig, "LoRA adapters on a frozen base (docs/lora.md)")
    data: DataSettings = section(DataSettings, "the data")
    loss: LossSettings = section(LossSettings, "the objective")
    reference: ReferenceSettings = section(ReferenceSettings, "the reference log-probs")
    optim: OptimConfig = section(OptimConfig, "the optimizer and its schedule")
    mesh: MeshShape = section(MeshShape, "the device mesh")
    batch_size: int = field(
        16,
        "pairs per optimizer step (completions for an unpaired loss), all processes together; the demo preset's 32 is 64 for an unpaired loss",
        above(0),
    )
    grad_accum: int = field(1, "micro-batches per step (batch_size must divide)", above(0))
    num_steps: int = field(
        0,
        "0: as many as data.num_epochs give; else exactly this many steps, the data repeating as needed",
        at_least(0, "0 (0: as the epochs give)"),
    )
    logprob_chunk: int = field(
        128,
        "time steps per chunk of the log-prob head; memory grows with it (docs/performance.md)",
        above(0),
    )
    max_bad_steps: int = field(5, "consecutive skipped (non-finite) steps before the run stops")
    log_every: int = field(10, "console / metrics.jsonl / TensorBoard every N steps", above(0))
    eval_every: int = field(
        100, "held-out evaluation every N steps (0: only at the end)", at_least(0)
    )
    eval_batches: int = field(0, "held-out batches per evaluation (0: the whole held-out split)")
    progress_bar: bool = field(True, "tqdm bar on a terminal")
    wandb_project: str = field("", "log to Weights & Biases when set and wandb is installed")
    checkpoint: CheckpointSettings = section(CheckpointSettings, "checkpoints")
    export_hf: bool = field(
        True, "write <workdir>/hf at the end (safetensors + config + tokenizer)"
    )
    plots: bool = field(
        False,
        "write PNG figures of metrics.jsonl to <workdir>/plots at the end (docs/evaluation.md)",
    )
    samples: SamplesSettings = section(SamplesSettings, "greedy samples")
    distributed: distributed_lib.DistributedConfig = section(
        distributed_lib.DistributedConfig, "multi-process runs (docs/scaling.md)"
    )
    demo: DemoSettings = section(DemoSettings, "the embedded demo")

    @property
    def is_demo(self) -> bool:
        return not self.data.train


def _check_finite(c: Any) -> None:
    """Refuses NaN and infinity in any number of the config (``--config.optim.learning_rate=nan``
    would train, skip nothing and export a NaN model)."""
    for name, value in fields.flatten(c.to_dict()).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config.{name} must be a finite number, got {value}")


def _distributed(c: Any) -> distributed_lib.DistributedConfig:
    dist = distributed_lib.DistributedConfig.from_mapping(
        c.distributed.to_dict() if "distributed" in c else None
    )
    try:
        distributed_lib.check(dist)
    except distributed_lib.DistributedError as e:
        raise ConfigError(str(e)) from None
    return dist


def _scalars(c: Any) -> dict[str, Any]:
    """The top-level values of `c`, each of its default's type."""
    return {
        f.name: type(f.default)(c[f.name])
        for f in dataclasses.fields(RunConfig)
        if "section" not in f.metadata
    }


def validate(c: Any, *, device_count: int, process_count: int = 1) -> RunConfig:
    """Checks `c` (a ConfigDict from configs/*.py) and returns the frozen RunConfig.

    Args:
      c: the config.
      device_count: devices of all processes together (the mesh must use them all).
      process_count: processes of the run (the batch splits over them).

    Returns:
      The RunConfig. Raises ConfigError naming the field for anything that cannot work.
    """
    _check_finite(c)
    fields.check(RunConfig, c.to_dict())
    loss, reference = objective.loss(c), objective.reference(c)
    hf_path = sections.model_path(c)
    sections.check_paths(c, hf_path)
    mesh = sections.mesh(c, device_count)
    data = objective.data(c, mesh.batch_ways, process_count)
    lora = sections.lora(c)
    if lora.rank and reference.sync_ref_model:
        raise ConfigError(
            "config.reference.sync_ref_model (TR-DPO) moves a reference copy of the weights, and "
            "a LoRA run's reference is its own frozen base: use one or the other"
        )
    return RunConfig(
        **_scalars(c),
        model=fields.build(ModelSettings, c.model.to_dict(), "model", hf_path=hf_path),
        lora=lora,
        data=data,
        loss=loss,
        reference=reference,
        optim=fields.build(OptimConfig, c.optim.to_dict(), "optim"),
        mesh=mesh,
        checkpoint=fields.build(CheckpointSettings, c.checkpoint.to_dict(), "checkpoint"),
        samples=sections.samples(c),
        distributed=_distributed(c),
        demo=fields.build(DemoSettings, c.demo.to_dict(), "demo"),
    )
