"""Optimizers and learning-rate schedules from a config, built on optax."""

from __future__ import annotations

import dataclasses

import jax
import optax

OPTIMIZERS = ("adamw", "rmsprop", "adafactor", "sgd")
SCHEDULES = ("cosine", "linear", "constant")
DECAY_MASKS = ("all", "no_norms", "no_norms_no_embed")


def _field(default, help: str):
    """A field of the config tree (`apo_jax.config.fields.field`: default and one-line help),
    written here because this module is imported before the config package."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer settings (the fields of the config's `optim` block)."""

    name: str = _field("adamw", "adamw | rmsprop | adafactor | sgd")
    learning_rate: float = _field(5e-7, "peak learning rate")
    warmup_steps: int = _field(0, "linear warmup from 0 to the peak over this many steps")
    schedule: str = _field("linear", "decay after warmup: cosine | linear | constant")
    end_lr_factor: float = _field(0.0, "final learning rate as a fraction of the peak")
    weight_decay: float = _field(0.0, "decoupled weight decay")
    decay_mask: str = _field(
        "no_norms",
        "what weight decay touches: all | no_norms (every weight but norm scales and biases) | no_norms_no_embed (nor the embedding)",
    )
    b1: float = _field(0.9, "Adam's first-moment decay")
    b2: float = _field(0.999, "Adam's (and RMSProp's) second-moment decay")
    eps: float = _field(1e-8, "added to the denominator of the adaptive optimizers")
    momentum: float = _field(0.0, "sgd only")
    clip_norm: float = _field(1.0, "global gradient-norm clipping; 0 disables")

    def __post_init__(self):
        for field, allowed in (
            ("name", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("decay_mask", DECAY_MASKS),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(
                    f"optim.{field} must be one of {allowed}, got {getattr(self, field)!r}"
                )
        if self.learning_rate < 0 or self.warmup_steps < 0 or self.clip_norm < 0:
            raise ValueError("optim.learning_rate, warmup_steps and clip_norm must be >= 0")


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to the peak, then cosine, linear or constant to `end_lr_factor * peak`."""
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_lr_factor
    warm = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warm, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_factor)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), decay], [warm])


def _decay_mask(kind: str):
    def decays(path, _) -> bool:
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if kind == "all":
            return True
        if "bias" in keys or any("norm" in k for k in keys):  # norms; biases (Qwen2's q/k/v)
            return False
        return not (kind == "no_norms_no_embed" and "embed_tokens" in keys)

    return lambda params: jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    cfg: OptimConfig, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation (clipping, then the optimizer) and its schedule."""
    lr = make_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(
            lr,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=_decay_mask(cfg.decay_mask),
        )
    elif cfg.name == "rmsprop":
        opt = optax.rmsprop(lr, decay=cfg.b2, eps=cfg.eps, momentum=cfg.momentum or None)
    elif cfg.name == "adafactor":
        opt = optax.adafactor(lr, weight_decay_rate=cfg.weight_decay or None)
    else:
        opt = optax.sgd(lr, momentum=cfg.momentum or None)
    if cfg.weight_decay and cfg.name in ("rmsprop", "sgd"):  # decoupled decay, scaled by the lr
        decay = optax.add_decayed_weights(cfg.weight_decay, _decay_mask(cfg.decay_mask))
        opt = optax.chain(decay, opt)
    if cfg.clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return opt, lr
