"""The sections that depend on the objective: `loss`, `reference` and `data`.

Each section is declared once (fields with default, help and check); below it, the function that
validates it against the rest of the config and returns its validated form. Where that form
differs from the raw one it is said on the field: `loss.beta=-1` becomes a number, the reference
mode one of 'precomputed' | 'online' | 'none', `data.layout` a `layouts.Layout` (None for auto),
`data.seq_len` and `data.buckets` None when unset.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from apo_jax import layouts, losses
from apo_jax.config.fields import above, at_least, build, field, one_of
from apo_jax.errors import ConfigError

DEMO_BETA = 10.0  # loss.beta=-1 on the demo data (docs/training.md, "The demo")
DEMO_SEQ_LEN = 128  # data.seq_len=-1 on the demo data: single-turn rows are at most about 80 tokens
REFERENCE_MODES = ("auto", "precomputed", "online", "none")


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _beta(v: float) -> str | None:
    return None if v > 0 or v == -1 else f"must be > 0 (or -1), got {v}"


def _smoothing(v: float) -> str | None:
    return None if 0 <= v < 0.5 else f"must be in [0, 0.5), got {v}"


def _fraction(v: float) -> str | None:
    return None if 0 <= v <= 1 else f"must be in [0, 1], got {v}"


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """`config.loss`: the objective and its hyper-parameters ([losses.md](losses.md))."""

    name: str = field(
        "apo_zero",
        "losses.py name or mixture, e.g. `apo_zero + 0.1*sft`; set by each configs/<objective>.py",
    )
    beta: float = field(
        0.1,
        "the paper's and TRL's default; -1 (demo preset): 10 on the demo data, 0.1 on yours (validated: the number)",
        _beta,
    )
    label_smoothing: float = field(
        0.0, "conservative DPO / robust losses' smoothing, in [0, 0.5)", _smoothing
    )
    discopop_tau: float = field(0.05, "DiscoPOP's temperature")
    simpo_gamma: float = field(0.5, "SimPO's target reward margin")
    f_divergence_type: str = field(
        "reverse_kl", "f-DPO: reverse_kl | forward_kl | js_divergence | alpha_divergence"
    )
    f_alpha_divergence_coef: float = field(0.5, "f-DPO: alpha of alpha_divergence")
    use_weighting: bool = field(
        False, "WPO: weight each pair by its sequences' probabilities (concat layout)"
    )
    ld_alpha: float = field(
        1.0,
        "LD-DPO: weight of the longer completion's tail; 1 = off (concat layout, online reference)",
        _fraction,
    )
    desirable_weight: float = field(
        1.0, "kto / apo_zero_unpaired: factor of the desirable examples' loss", above(0)
    )
    undesirable_weight: float = field(
        1.0, "kto / apo_zero_unpaired: factor of the undesirable examples' loss", above(0)
    )

    @property
    def hparams(self) -> tuple[tuple[str, float], ...]:
        """The losses.HParams fields besides beta, as a hashable tuple."""
        skip = ("name", "beta", "ld_alpha", "desirable_weight", "undesirable_weight")
        return tuple(
            (f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in skip
        )


def loss(c: Any) -> LossSettings:
    """config.loss validated: the name parsed, beta=-1 resolved, the DPO options checked."""
    try:
        if not losses.is_unpaired(c.loss.name):
            losses.parse_spec(c.loss.name)
    except ValueError as e:
        raise ConfigError(f"config.loss.name: {e} (unpaired: kto, apo_zero_unpaired)") from None
    beta = float(c.loss.beta)
    if beta == -1:  # the demo preset's value
        beta = DEMO_BETA if not c.data.train else 0.1
    s = build(LossSettings, c.loss.to_dict(), "loss", beta=beta)
    if losses.is_unpaired(s.name):
        _need(
            s.f_divergence_type == "reverse_kl" and not s.use_weighting and s.ld_alpha == 1,
            f"config.loss: {s.name} takes no f_divergence_type, "
            "use_weighting or ld_alpha (DPO options)",
        )
        return s
    try:
        losses.check_options(s.name, dict(s.hparams))
    except ValueError as e:
        raise ConfigError(f"config.loss: {e}") from None
    return s


@dataclasses.dataclass(frozen=True)
class ReferenceSettings:
    """`config.reference`: where the reference log-probs come from."""

    mode: str = field(
        "auto",
        "auto (precompute once, then read) | precomputed | online | none (validated: precomputed, online or none)",
        one_of(REFERENCE_MODES, f"one of {REFERENCE_MODES}"),
    )
    dtype: str = field("float32", "dtype of the frozen reference weights and compute")
    sync_ref_model: bool = field(False, "TR-DPO: mix the policy into the online reference")
    ref_model_mixup_alpha: float = field(
        0.6, "TR-DPO: ref <- alpha * policy + (1 - alpha) * ref, alpha in (0, 1]"
    )
    ref_model_sync_steps: int = field(512, "TR-DPO: mix every this many steps")


def reference(c: Any) -> ReferenceSettings:
    """config.reference validated; `mode` resolved from the loss and the DPO options."""
    mode = c.reference.mode
    needs = losses.needs_reference(c.loss.name)
    _need(
        mode != "none" or not needs,
        f"config.reference.mode=none but loss {c.loss.name!r} needs reference log-probs",
    )
    # Stored log-probs are plain sums of a fixed reference: LD-DPO weights them, TR-DPO moves it.
    moving = "sync_ref_model" if c.reference.sync_ref_model else ""
    moving = moving or ("loss.ld_alpha" if c.loss.ld_alpha != 1 else "")
    _need(
        mode != "precomputed" or not moving,
        f"config.{moving} needs the online reference: set config.reference.mode=online (or auto)",
    )
    if not needs:
        mode = "none"
    elif mode == "auto":
        mode = "online" if moving else "precomputed"
    r = c.reference
    _need(
        not r.sync_ref_model or (0 < r.ref_model_mixup_alpha <= 1 and r.ref_model_sync_steps > 0),
        "config.reference: ref_model_mixup_alpha must be in (0, 1] and ref_model_sync_steps > 0",
    )
    return build(ReferenceSettings, r.to_dict(), "reference", mode=mode)


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """`config.data`: the shards and how their rows are laid out ([data.md](data.md))."""

    train: str = field(
        "", "prepared shard dir (python -m apo_jax.data.prepare); '': the embedded demo"
    )
    eval: str = field("", "held-out shard dir; '': no held-out evaluation (the demo has its own)")
    tokenizer: str = field("", "tokenizer dir copied into HF exports; '': the shards' manifest's")
    seq_len: int | None = field(
        0,
        "row length T; 0: the shards' max_length; -1 (demo preset): 128 on the demo data, 0 on yours (validated: None for 0)",
        at_least(-1, "0 (or -1)"),
    )
    buckets: tuple[int, ...] | None = field(
        (),
        "row lengths to pad each batch to (fewer recompiles, less padding); () = seq_len (validated: None)",
    )
    layout: layouts.Layout | None = field(
        "auto",
        "auto (picked from the data, logged) | concat | prefix | packed | packed_prefix | unpaired (validated: the Layout, None for auto)",
        one_of(("auto", *layouts.NAMES), "auto or one of " + ", ".join(layouts.NAMES)),
    )
    num_epochs: int = field(1, "passes over the training shards", above(0))
    shuffle: bool = field(True, "seeded shuffle, a new order each epoch")
    worker_count: int = field(0, "grain worker processes (0 reads in the main process)")
    verify: str = field(
        "fast",
        "shards vs their manifest before training: fast (sizes, hashes of each file's ends) | full (every byte) | off",
        one_of(("fast", "full", "off")),
    )


def data(c: Any, batch_ways: int, process_count: int) -> DataSettings:
    """config.data validated against the loss, the batch and the mesh (`batch_ways` = data*fsdp)."""
    name = c.data.layout
    unpaired = losses.is_unpaired(c.loss.name)
    needs_concat = c.loss.ld_alpha != 1 or c.loss.use_weighting
    if name == "auto" and (unpaired or needs_concat):  # the loss decides, not the data
        name = "unpaired" if unpaired else "concat"
    layout = None if name == "auto" else layouts.get(name)  # None: train.data.resolve_layout picks
    if layout is not None:
        _need(
            unpaired == (layout.name == "unpaired"),
            "config.data.layout must be 'unpaired' "
            "for the unpaired losses (kto, apo_zero_unpaired) and only for them, got "
            f"{layout.name!r} with loss {c.loss.name!r}",
        )
        if unpaired:  # the KL rows run only for a loss that estimates the KL term
            layout = dataclasses.replace(layout, kl=c.loss.name.strip() in losses.NEEDS_KL)
        _need(
            not needs_concat or layout.name == "concat",
            "config.loss.ld_alpha and use_weighting need config.data.layout=concat",
        )
    _need(
        c.batch_size % c.grad_accum == 0,
        f"config.batch_size {c.batch_size} must be a multiple of config.grad_accum {c.grad_accum}",
    )
    _need(
        c.batch_size % process_count == 0,
        f"config.batch_size {c.batch_size} must divide "
        f"across the {process_count} processes: make it a multiple of {process_count}",
    )
    try:  # auto: concat must fit, the others are candidates when they do
        (layout or layouts.get("concat")).check(
            batch_size=c.batch_size,
            grad_accum=c.grad_accum,
            data_ways=batch_ways,
            process_count=process_count,
        )
    except layouts.LayoutError as e:
        raise ConfigError(str(e)) from None
    seq_len = int(c.data.seq_len)
    if seq_len == -1:  # the demo preset's value: its own rows' length, or your shards'
        seq_len = 0 if c.data.train else DEMO_SEQ_LEN
    return build(
        DataSettings,
        c.data.to_dict(),
        "data",
        layout=layout,
        seq_len=seq_len or None,
        buckets=tuple(int(b) for b in c.data.buckets) or None,
    )
