"""The sections about the model, the devices and the run's outputs, each with its validation.

`model` (its `hf_path` validated: a .gguf file becomes its converted directory), `mesh` (validated:
the real axis sizes), `lora` (validated: a PEFT adapter's own settings), `checkpoint`, `samples`
(validated: `num_prompts=-1` becomes a count) and `demo`. The `optim`, `lora` and `distributed`
sections are the dataclasses of the modules that use them (`optim.OptimConfig`,
`models.lora.LoraConfig`, `distributed.DistributedConfig`), whose fields carry their help too.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from apo_jax import sharding
from apo_jax.config.fields import above, at_least, build, field
from apo_jax.errors import ConfigError, UserError
from apo_jax.models import lora as lora_lib

DEMO_SAMPLE_PROMPTS = 64  # samples.num_prompts=-1: held-out prompts scored on the demo data
SAMPLE_PROMPTS = 3  # samples.num_prompts=-1 on your data


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """`config.model`: the policy's (and reference's) weights and how they compute."""

    preset: str = field("tiny", "models/config.py preset, random weights, when hf_path is empty")
    hf_path: str = field(
        "",
        "Hugging Face checkpoint dir or .gguf file (Llama, Qwen2/3, Mistral, Gemma 3 text; docs/models.md); a training workdir is refused: pass its export <workdir>/hf",
    )
    dtype: str = field("float32", "compute dtype: float32 | bfloat16")
    param_dtype: str = field("float32", "master weight dtype")
    remat: str = field("none", "per-layer rematerialization: none | full | save_dots")
    scan_layers: bool = field(True, "one compiled block for all layers (False unrolls them)")
    attention: str = field(
        "auto",
        "auto (cuDNN on a GPU for 16-bit compute, blocked on a CPU, else xla) | xla | cudnn | blocked",
    )

    def overrides(self) -> dict[str, Any]:
        """The LlamaConfig fields this run sets whatever the checkpoint says."""
        keys = ("dtype", "param_dtype", "remat", "scan_layers", "attention")
        return {k: getattr(self, k) for k in keys}


def model_path(c: Any) -> str:
    """config.model.hf_path, a .gguf file converted once into its cached directory."""
    from apo_jax.models.convert import resolve_model_path

    try:
        return resolve_model_path(c.model.hf_path)
    except UserError as e:
        raise ConfigError(f"config.model.hf_path: {e}") from None


def check_paths(c: Any, hf: str) -> None:
    """The directories the config names exist, and a paper preset names a model and data."""
    if c.preset != "demo":
        _need(
            bool(c.model.hf_path),
            f"preset {c.preset} trains a pretrained model: pass "
            "--config.model.hf_path=<Hugging Face checkpoint dir>",
        )
        _need(
            bool(c.data.train),
            f"preset {c.preset} needs data: pass --config.data.train=<prepared shard dir>",
        )
    for name, path in (
        ("model.hf_path", hf),
        ("data.train", c.data.train),
        ("data.eval", c.data.eval),
        ("data.tokenizer", c.data.tokenizer),
    ):
        _need(not path or os.path.isdir(path), f"config.{name}: {path} is not a directory")
    if hf and os.path.isdir(os.path.join(hf, "checkpoints")):  # a training workdir, not a model
        export = os.path.join(hf, "hf")
        later = "" if os.path.isdir(export) else " (written when that run finishes, export_hf=True)"
        raise ConfigError(
            f"config.model.hf_path: {hf} is a training workdir; pass its Hugging "
            f"Face export {export}{later}"
        )
    if c.data.train:
        _need(
            os.path.exists(os.path.join(c.data.train, "manifest.json")),
            f"config.data.train: {c.data.train} has no manifest.json; make shards with "
            "python -m apo_jax.data.prepare",
        )


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """`config.mesh`: the device mesh; validated, every axis holds its real size."""

    data: int = field(
        -1, "data-parallel axis; -1 takes the devices the other axes leave (docs/scaling.md)"
    )
    fsdp: int = field(
        1, "fully sharded data-parallel axis (parameters and optimizer state sharded)"
    )
    tensor: int = field(1, "tensor-parallel axis")

    @property
    def batch_ways(self) -> int:
        """How many ways the batch's rows are split (data * fsdp)."""
        return self.data * self.fsdp


def mesh(c: Any, device_count: int) -> MeshShape:
    """config.mesh with its -1 resolved so that the axes use every device."""
    try:
        sizes = sharding.resolve_mesh_shape(
            int(c.mesh.data), int(c.mesh.fsdp), int(c.mesh.tensor), device_count
        )
    except sharding.MeshError as e:
        raise ConfigError(f"config.mesh: {e}") from None
    return MeshShape(*sizes)


def lora(c: Any) -> lora_lib.LoraConfig:
    """config.lora validated; a PEFT adapter (lora.adapter, or model.hf_path naming one) brings
    its own rank, alpha, dropout and targets, and the validated `adapter` is then ''."""
    if "lora" not in c:
        return lora_lib.LoraConfig()
    adapter = c.lora.adapter or (
        c.model.hf_path if lora_lib.is_adapter_dir(c.model.hf_path) else ""
    )
    if adapter and (c.lora.rank or c.lora.adapter):
        _need(
            lora_lib.is_adapter_dir(adapter),
            f"config.lora.adapter: {adapter} has no {lora_lib.ADAPTER_CONFIG}",
        )
        try:
            return lora_lib.read_adapter_config(adapter)[0]
        except (lora_lib.LoraError, KeyError, ValueError) as e:
            raise ConfigError(f"config.lora.adapter: {e}") from None
    return build(lora_lib.LoraConfig, c.lora.to_dict(), "lora", adapter="")


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """`config.checkpoint`: when the train state is saved and how many saves are kept."""

    every: int = field(200, "steps between saves (0: only at the end and on SIGTERM or Ctrl-C)")
    keep: int = field(3, "latest checkpoints kept")
    keep_best: int = field(1, "plus the best by held-out loss (0: off)")
    async_save: bool = field(True, "write checkpoints in the background")

    def __post_init__(self):
        if not (self.every >= 0 and self.keep >= 1 and self.keep_best >= 0):
            raise ValueError(
                "every must be >= 0 (0: only at the end and on a stop), keep >= 1 and keep_best "
                f">= 0; got every={self.every}, keep={self.keep}, keep_best={self.keep_best}"
            )


@dataclasses.dataclass(frozen=True)
class SamplesSettings:
    """`config.samples`: greedy generations at each held-out evaluation (one process only)."""

    num_prompts: int = field(
        0,
        "prompts generated each time (0: off); -1 (demo preset): 64 on the demo data, 3 on yours (validated: the count)",
        at_least(-1, "0 (or -1)"),
    )
    prompts: str = field(
        "",
        "prompt or messages rows; '': the demo's held-out pairs, else the file your data.eval shards were prepared from",
    )
    max_new_tokens: int = field(128, "tokens generated per prompt at most", above(0))
    checker: str = field(
        "",
        "module:function scoring each response (samples/accuracy); '': apo_jax.eval.checkers:demo on the demo data only",
    )


def samples(c: Any) -> SamplesSettings:
    """config.samples validated: the prompts file exists, the checker imports, -1 resolved."""
    s = c.samples
    _need(
        not s.prompts or os.path.exists(s.prompts),
        f"config.samples.prompts: {s.prompts} does not exist",
    )
    if s.checker:
        from apo_jax.eval import scoring  # imports the checker's module: fail now, not mid-run

        try:
            scoring.load_checker(s.checker)
        except UserError as e:
            raise ConfigError(f"config.samples.checker: {e}") from None
    n = int(s.num_prompts)
    if n == -1:  # the demo preset's value: more on the demo data, where a checker scores them
        n = SAMPLE_PROMPTS if c.data.train else DEMO_SAMPLE_PROMPTS
    return build(SamplesSettings, s.to_dict(), "samples", num_prompts=n)


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """`config.demo`: the embedded demo's data, used when data.train is empty."""

    cache_dir: str = field(
        "", "where the demo's data and warm start are cached; '': ~/.cache/apo_jax/demo"
    )
    n_train: int = field(3000, "generated training pairs")
    n_eval: int = field(300, "generated held-out pairs")
    multi_turn: float = field(
        0.0, "fraction of multi-turn conversations (long rows, slower on a CPU)"
    )
    warm_start_steps: int = field(
        300,
        "sft steps of the model the demo starts from (cached; 0: random weights; ignored with a model.hf_path)",
        at_least(0),
    )
