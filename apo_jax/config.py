"""A run's settings: checked once, early, and frozen into nested dataclasses.

`validate(config)` turns the ml_collections ConfigDict of `configs/<objective>.py` (fields and
their meaning: `apo_jax/config_base.py`, docs/training.md) into a `RunConfig` that the rest of
the run receives unchanged. Every setting has one vocabulary once validated (the reference mode
is 'precomputed', 'online' or 'none'; the mesh has its real sizes), and every check lives here
or in the module that owns the concept (the mesh rule in `sharding`, the distributed settings in
`distributed`), with a message that names the field and what to do.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from apo_jax import config_base, distributed, layouts, losses, sharding, workdir
from apo_jax.errors import ConfigError, UserError
from apo_jax.models import lora as lora_lib
from apo_jax.optim import OptimConfig

REFERENCE_MODES = ("auto", "precomputed", "online", "none")


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    preset: str  # models/config.py preset when hf_path is empty
    hf_path: str  # Hugging Face checkpoint to start from ('' = a random preset)
    dtype: str
    param_dtype: str
    remat: str
    scan_layers: bool
    attention: str

    def overrides(self) -> dict[str, Any]:
        """The LlamaConfig fields this run sets whatever the checkpoint says."""
        keys = ("dtype", "param_dtype", "remat", "scan_layers", "attention")
        return {k: getattr(self, k) for k in keys}


@dataclasses.dataclass(frozen=True)
class DataSettings:
    train: str  # '' = the embedded demo
    eval: str
    tokenizer: str
    seq_len: int | None  # None: the shards' own length
    buckets: tuple[int, ...] | None
    layout: layouts.Layout | None  # the row layout (config.data.layout); None: 'auto', which
    # assemble.resolve_layout replaces by the layout it picks once the shards are known
    num_epochs: int
    shuffle: bool
    worker_count: int
    verify: str = "fast"  # shards vs their manifest before training: fast | full | off


@dataclasses.dataclass(frozen=True)
class LossSettings:
    name: str  # a losses.py name or mixture
    beta: float
    label_smoothing: float
    discopop_tau: float
    simpo_gamma: float
    f_divergence_type: str
    f_alpha_divergence_coef: float
    use_weighting: bool
    ld_alpha: float  # LD-DPO; 1 = off (the step weights log-probs, not the loss)
    desirable_weight: float  # unpaired losses only
    undesirable_weight: float

    @property
    def hparams(self) -> tuple[tuple[str, float], ...]:
        """The losses.HParams fields besides beta, as a hashable tuple."""
        skip = ("name", "beta", "ld_alpha", "desirable_weight", "undesirable_weight")
        return tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                     if f.name not in skip)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ReferenceSettings:
    mode: str  # 'precomputed' (read from the data) | 'online' | 'none' (the loss needs none)
    dtype: str
    sync_ref_model: bool  # TR-DPO (online only)
    ref_model_mixup_alpha: float
    ref_model_sync_steps: int


@dataclasses.dataclass(frozen=True)
class MeshShape:
    data: int
    fsdp: int
    tensor: int

    @property
    def batch_ways(self) -> int:
        """How many ways the batch's rows are split (data * fsdp)."""
        return self.data * self.fsdp


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    every: int
    keep: int
    keep_best: int
    async_save: bool


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    cache_dir: str
    n_train: int
    n_eval: int
    multi_turn: float
    warm_start_steps: int  # sft steps of the demo's starting model; 0: random weights


@dataclasses.dataclass(frozen=True)
class SamplesSettings:
    num_prompts: int  # 0: off
    prompts: str  # prompts file ('': the demo's held-out pairs, else the eval split's source)
    max_new_tokens: int
    checker: str  # module:function or '' (the demo's checker on the demo data)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The validated run settings (see apo_jax/config_base.py for the meaning of each field)."""

    preset: str
    seed: int
    model: ModelSettings
    data: DataSettings
    loss: LossSettings
    reference: ReferenceSettings
    optim: OptimConfig
    mesh: MeshShape
    batch_size: int
    grad_accum: int
    num_steps: int
    logprob_chunk: int
    max_bad_steps: int
    log_every: int
    eval_every: int
    eval_batches: int
    progress_bar: bool
    wandb_project: str
    checkpoint: CheckpointSettings
    export_hf: bool
    plots: bool
    samples: SamplesSettings
    demo: DemoSettings
    distributed: distributed.DistributedConfig
    lora: lora_lib.LoraConfig = lora_lib.LoraConfig()  # rank 0: LoRA off

    @property
    def is_demo(self) -> bool:
        return not self.data.train


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _section(cls: type, c: Any, name: str, **resolved: Any) -> Any:
    """`cls` built from the ConfigDict block `name`, with `resolved` fields replacing raw ones."""
    raw = c[name].to_dict()
    try:
        return cls(**{**raw, **resolved})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.{name}: {e}") from None


def _model_path(c: Any) -> str:
    """config.model.hf_path, a .gguf file converted once into its cached directory."""
    from apo_jax.models.convert import resolve_model_path

    try:
        return resolve_model_path(c.model.hf_path)
    except UserError as e:
        raise ConfigError(f"config.model.hf_path: {e}") from None


def _check_paths(c: Any, hf: str) -> None:
    if c.preset != "demo":
        _need(bool(c.model.hf_path), f"preset {c.preset} trains a pretrained model: pass "
              "--config.model.hf_path=<Hugging Face checkpoint dir>")  # fmt: skip
        _need(bool(c.data.train), f"preset {c.preset} needs data: pass "
              "--config.data.train=<prepared shard dir>")  # fmt: skip
    for field, path in (
        ("model.hf_path", hf),
        ("data.train", c.data.train),
        ("data.eval", c.data.eval),
        ("data.tokenizer", c.data.tokenizer),
    ):
        _need(not path or os.path.isdir(path), f"config.{field}: {path} is not a directory")
    if hf and os.path.isdir(os.path.join(hf, "checkpoints")):  # a training workdir, not a model
        export = os.path.join(hf, "hf")
        later = "" if os.path.isdir(export) else " (written when that run finishes, export_hf=True)"
        raise ConfigError(f"config.model.hf_path: {hf} is a training workdir; pass its Hugging "
                          f"Face export {export}{later}")  # fmt: skip
    if c.data.train:
        _need(
            os.path.exists(os.path.join(c.data.train, "manifest.json")),
            f"config.data.train: {c.data.train} has no manifest.json; make shards with "
            "python -m apo_jax.data.prepare",
        )


def _check_finite(c: Any) -> None:
    """Refuses NaN and infinity in any number of the config (``--config.optim.learning_rate=nan``
    would train, skip nothing and export a NaN model)."""
    for field, value in workdir.flatten(c.to_dict()).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config.{field} must be a finite number, got {value}")


def _loss(c: Any) -> LossSettings:
    try:
        if not losses.is_unpaired(c.loss.name):
            losses.parse_spec(c.loss.name)
    except ValueError as e:
        raise ConfigError(f"config.loss.name: {e} (unpaired: kto, apo_zero_unpaired)") from None
    _need(c.loss.beta > 0 or c.loss.beta == -1,
          f"config.loss.beta must be > 0 (or -1), got {c.loss.beta}")  # fmt: skip
    _need(
        0 <= c.loss.label_smoothing < 0.5,
        f"config.loss.label_smoothing must be in [0, 0.5), got {c.loss.label_smoothing}",
    )
    _need(
        0 <= c.loss.ld_alpha <= 1, f"config.loss.ld_alpha must be in [0, 1], got {c.loss.ld_alpha}"
    )
    _need(c.loss.desirable_weight > 0 and c.loss.undesirable_weight > 0,
          "config.loss.desirable_weight and undesirable_weight must be > 0")  # fmt: skip
    beta = float(c.loss.beta)
    if beta == -1:  # the demo preset's value: config_base.DEMO_BETA on the demo data
        beta = config_base.DEMO_BETA if not c.data.train else 0.1
    loss = _section(LossSettings, c, "loss", beta=beta)
    if losses.is_unpaired(loss.name):
        _need(loss.f_divergence_type == "reverse_kl" and not loss.use_weighting
              and loss.ld_alpha == 1, f"config.loss: {loss.name} takes no f_divergence_type, "
              "use_weighting or ld_alpha (DPO options)")  # fmt: skip
        return loss
    try:
        losses.check_options(loss.name, dict(loss.hparams))
    except ValueError as e:
        raise ConfigError(f"config.loss: {e}") from None
    return loss


def _reference(c: Any) -> ReferenceSettings:
    mode = c.reference.mode
    _need(mode in REFERENCE_MODES, f"config.reference.mode must be one of {REFERENCE_MODES}, "
          f"got {mode!r}")  # fmt: skip
    needs = losses.needs_reference(c.loss.name)
    _need(mode != "none" or not needs,
          f"config.reference.mode=none but loss {c.loss.name!r} needs reference log-probs")  # fmt: skip
    # Stored log-probs are plain sums of a fixed reference: LD-DPO weights them, TR-DPO moves it.
    moving = "sync_ref_model" if c.reference.sync_ref_model else ""
    moving = moving or ("loss.ld_alpha" if c.loss.ld_alpha != 1 else "")
    _need(mode != "precomputed" or not moving, f"config.{moving} needs the online reference: "
          "set config.reference.mode=online (or auto)")  # fmt: skip
    if not needs:
        mode = "none"
    elif mode == "auto":
        mode = "online" if moving else "precomputed"
    r = c.reference
    _need(not r.sync_ref_model or (0 < r.ref_model_mixup_alpha <= 1 and r.ref_model_sync_steps > 0),
          "config.reference: ref_model_mixup_alpha must be in (0, 1] and ref_model_sync_steps > 0")  # fmt: skip
    return _section(ReferenceSettings, c, "reference", mode=mode)


def _mesh(c: Any, device_count: int) -> MeshShape:
    try:
        sizes = sharding.resolve_mesh_shape(
            int(c.mesh.data), int(c.mesh.fsdp), int(c.mesh.tensor), device_count
        )
    except sharding.MeshError as e:
        raise ConfigError(f"config.mesh: {e}") from None
    return MeshShape(*sizes)


def _data(c: Any, mesh: MeshShape, process_count: int) -> DataSettings:
    name = c.data.layout
    _need(name == "auto" or name in layouts.NAMES,
          f"config.data.layout must be auto or one of {', '.join(layouts.NAMES)}, "
          f"got {name!r}")  # fmt: skip
    unpaired = losses.is_unpaired(c.loss.name)
    needs_concat = c.loss.ld_alpha != 1 or c.loss.use_weighting
    if name == "auto" and (unpaired or needs_concat):  # the loss decides, not the data
        name = "unpaired" if unpaired else "concat"
    layout = None if name == "auto" else layouts.get(name)  # None: assemble.resolve_layout picks
    if layout is not None:
        _need(unpaired == (layout.name == "unpaired"), "config.data.layout must be 'unpaired' "
              "for the unpaired losses (kto, apo_zero_unpaired) and only for them, got "
              f"{layout.name!r} with loss {c.loss.name!r}")  # fmt: skip
        if unpaired:  # the KL rows run only for a loss that estimates the KL term
            layout = dataclasses.replace(layout, kl=c.loss.name.strip() in losses.NEEDS_KL)
        _need(not needs_concat or layout.name == "concat",
              "config.loss.ld_alpha and use_weighting need config.data.layout=concat")  # fmt: skip
    _need(c.data.seq_len >= -1, f"config.data.seq_len must be >= 0 (or -1), got {c.data.seq_len}")
    _need(c.data.verify in ("fast", "full", "off"),
          f"config.data.verify must be fast, full or off, got {c.data.verify!r}")  # fmt: skip
    _need(c.data.num_epochs > 0, f"config.data.num_epochs must be > 0, got {c.data.num_epochs}")
    _need(c.batch_size > 0 and c.grad_accum > 0,
          "config.batch_size and config.grad_accum must be positive")  # fmt: skip
    _need(c.batch_size % c.grad_accum == 0, f"config.batch_size {c.batch_size} must be a "
          f"multiple of config.grad_accum {c.grad_accum}")  # fmt: skip
    _need(c.batch_size % process_count == 0, f"config.batch_size {c.batch_size} must divide "
          f"across the {process_count} processes: make it a multiple of {process_count}")  # fmt: skip
    try:  # auto: concat must fit, the others are candidates when they do
        (layout or layouts.get("concat")).check(
            batch_size=c.batch_size, grad_accum=c.grad_accum, data_ways=mesh.batch_ways,
            process_count=process_count)  # fmt: skip
    except layouts.LayoutError as e:
        raise ConfigError(str(e)) from None
    seq_len = int(c.data.seq_len)
    if seq_len == -1:  # the demo preset's value: its own rows' length, or your shards'
        seq_len = 0 if c.data.train else config_base.DEMO_SEQ_LEN
    return _section(DataSettings, c, "data", layout=layout, seq_len=seq_len or None,
                    buckets=tuple(int(b) for b in c.data.buckets) or None)  # fmt: skip


def _lora(c: Any) -> lora_lib.LoraConfig:
    if "lora" not in c:
        return lora_lib.LoraConfig()
    adapter = c.lora.adapter or (
        c.model.hf_path if lora_lib.is_adapter_dir(c.model.hf_path) else ""
    )
    if adapter and (c.lora.rank or c.lora.adapter):
        _need(lora_lib.is_adapter_dir(adapter),
              f"config.lora.adapter: {adapter} has no {lora_lib.ADAPTER_CONFIG}")  # fmt: skip
        try:  # a PEFT adapter brings its own rank, alpha, dropout and targets
            return lora_lib.read_adapter_config(adapter)[0]
        except (lora_lib.LoraError, KeyError, ValueError) as e:
            raise ConfigError(f"config.lora.adapter: {e}") from None
    try:
        return lora_lib.LoraConfig(**{**c.lora.to_dict(), "adapter": ""})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.lora: {e}") from None


def _samples(c: Any) -> SamplesSettings:
    s = c.samples
    _need(s.num_prompts >= -1 and s.max_new_tokens > 0,
          "config.samples.num_prompts must be >= 0 (or -1) and max_new_tokens > 0")  # fmt: skip
    _need(not s.prompts or os.path.exists(s.prompts),
          f"config.samples.prompts: {s.prompts} does not exist")  # fmt: skip
    if s.checker:
        from apo_jax.eval import scoring  # imports the checker's module: fail now, not mid-run

        try:
            scoring.load_checker(s.checker)
        except UserError as e:
            raise ConfigError(f"config.samples.checker: {e}") from None
    n = int(s.num_prompts)
    if n == -1:  # the demo preset's value: more on the demo data, where a checker scores them
        n = config_base.SAMPLE_PROMPTS if c.data.train else config_base.DEMO_SAMPLE_PROMPTS
    return _section(SamplesSettings, c, "samples", num_prompts=n)


def _demo(c: Any) -> DemoSettings:
    _need(c.demo.warm_start_steps >= 0,
          f"config.demo.warm_start_steps must be >= 0, got {c.demo.warm_start_steps}")  # fmt: skip
    return _section(DemoSettings, c, "demo")


def _distributed(c: Any) -> distributed.DistributedConfig:
    dist = distributed.DistributedConfig.from_mapping(
        c.distributed.to_dict() if "distributed" in c else None
    )
    try:
        distributed.check(dist)
    except distributed.DistributedError as e:
        raise ConfigError(str(e)) from None
    return dist


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
    loss, reference = _loss(c), _reference(c)
    hf_path = _model_path(c)
    _check_paths(c, hf_path)
    mesh = _mesh(c, device_count)
    data = _data(c, mesh, process_count)
    _need(c.logprob_chunk > 0, "config.logprob_chunk must be positive")
    _need(c.log_every > 0 and c.eval_every >= 0,
          "config.log_every must be > 0 and eval_every >= 0")  # fmt: skip
    _need(
        c.num_steps >= 0,
        f"config.num_steps must be >= 0 (0: as the epochs give), got {c.num_steps}",
    )
    ck = c.checkpoint
    _need(ck.every >= 0 and ck.keep >= 1 and ck.keep_best >= 0,
          f"config.checkpoint: every must be >= 0 (0: only at the end and on a stop), keep >= 1 "
          f"and keep_best >= 0; got every={ck.every}, keep={ck.keep}, keep_best={ck.keep_best}")  # fmt: skip
    lora = _lora(c)
    _need(not (lora.rank and reference.sync_ref_model),
          "config.reference.sync_ref_model (TR-DPO) moves a reference copy of the weights, and a "
          "LoRA run's reference is its own frozen base: use one or the other")  # fmt: skip
    return RunConfig(
        preset=c.preset,
        seed=int(c.seed),
        model=_section(ModelSettings, c, "model", hf_path=hf_path),
        data=data,
        loss=loss,
        reference=reference,
        optim=_section(OptimConfig, c, "optim"),
        mesh=mesh,
        batch_size=int(c.batch_size),
        grad_accum=int(c.grad_accum),
        num_steps=int(c.num_steps),
        logprob_chunk=int(c.logprob_chunk),
        max_bad_steps=int(c.max_bad_steps),
        log_every=int(c.log_every),
        eval_every=int(c.eval_every),
        eval_batches=int(c.eval_batches),
        progress_bar=bool(c.progress_bar),
        wandb_project=str(c.wandb_project),
        checkpoint=_section(CheckpointSettings, c, "checkpoint"),
        export_hf=bool(c.export_hf),
        plots=bool(c.plots),
        samples=_samples(c),
        demo=_demo(c),
        distributed=_distributed(c),
        lora=lora,
    )
