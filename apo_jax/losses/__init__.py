"""Preference objectives as pure functions of sequence log-probabilities.

Every loss takes the summed completion log-probs of the policy and of the reference for the
chosen (winning, y_w) and rejected (losing, y_l) output of N pairs and returns a per-pair loss of
shape N. Names and formulas follow TRL's ``DPOTrainer`` ``loss_type`` values (the differences are
listed in docs/losses.md); ``simpo`` and ``orpo`` (reference-free) and weighted mixtures come on
top, and TRL's DPO regularizers: f-divergences (``f_divergence_type``) and WPO weights. The
unpaired objectives (``kto``, ``apo_zero_unpaired``) live in :mod:`apo_jax.losses.unpaired`.

Notation: r_w = log pi(y_w|x) - log pi_ref(y_w|x), r_l likewise, d = r_w - r_l, sigma the
logistic function and ls the label smoothing. Everything is computed in float32 whatever the input
dtype, with log-sigmoid forms so that |log-ratios| up to 1e4 stay finite.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from apo_jax.losses.pairs import (
    ALIASES,
    F_DIVERGENCE_LOSSES,
    F_DIVERGENCES,
    LOSSES,
    REFERENCE_FREE,
    SORTING_LOSSES,
    HParams,
    PairLogps,
    _In,
)
from apo_jax.losses.unpaired import (
    NEEDS_KL,
    UNPAIRED_LOSSES,
    UnpairedLogps,
    kl_estimate,
    unpaired_loss,
)

__all__ = [
    "NEEDS_KL",
    "UNPAIRED_LOSSES",
    "HParams",
    "PairLogps",
    "UnpairedLogps",
    "check_options",
    "f_divergence_scores",
    "is_unpaired",
    "kl_estimate",
    "names",
    "needs_reference",
    "parse_spec",
    "preference_loss",
    "unpaired_loss",
]

Array = jax.Array
log_sigmoid = jax.nn.log_sigmoid


def names() -> list[str]:
    """Every loss name the registry accepts (aliases included)."""
    return sorted([*LOSSES, *ALIASES])


Spec = str | Sequence[tuple[Any, ...]]


def parse_spec(spec: Spec) -> list[tuple[str, float, dict[str, Any]]]:
    """Normalizes a loss name or mixture into [(name, weight, hparam overrides)].

    Accepts ``"apo_zero"``, ``"apo_zero+0.1*sft"`` (a compact form for configs) or a sequence of
    ``(name, weight)`` / ``(name, weight, {hparam: value})`` tuples.
    """
    if isinstance(spec, str):
        terms = []
        for part in spec.replace(" ", "").split("+"):
            weight, _, name = part.rpartition("*")
            terms.append((name, float(weight) if weight else 1.0, {}))
    else:
        terms = [(t[0], float(t[1]), dict(t[2]) if len(t) > 2 else {}) for t in spec]
    if not terms:
        raise ValueError("empty loss specification")
    out = []
    for name, weight, overrides in terms:
        canonical = ALIASES.get(name, name)
        if canonical not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(names())}")
        out.append((canonical, weight, overrides))
    return out


def needs_reference(spec: Spec) -> bool:
    """Whether any term of the loss uses reference log-probs (every unpaired loss does)."""
    if is_unpaired(spec):
        return True
    return any(name not in REFERENCE_FREE for name, _, _ in parse_spec(spec))


def is_unpaired(spec: Spec) -> bool:
    """Whether `spec` names an unpaired objective (``kto``, ``apo_zero_unpaired``)."""
    return isinstance(spec, str) and spec.strip() in UNPAIRED_LOSSES


def _as_pair_logps(logps: PairLogps | Mapping[str, Array]) -> PairLogps:
    if isinstance(logps, PairLogps):
        return logps
    unknown = set(logps) - set(PairLogps._fields)
    if unknown:
        raise ValueError(f"unknown log-prob fields {sorted(unknown)}; expected {PairLogps._fields}")
    return PairLogps(**logps)


def f_divergence_scores(logratio: Array, kind: str = "reverse_kl", alpha: float = 0.5) -> Array:
    """f'(pi/pi_ref) of an f-divergence, as a function of the log-ratio r (f-DPO, Wang et al. 2023).

    ``reverse_kl``: r (plain DPO); ``forward_kl``: 1 - e^-r; ``js_divergence``:
    log 2 + log sigma(r); ``alpha_divergence``: (e^((alpha - 1) r) - 1) / (alpha - 1), its
    exponent clamped at 80 as TRL does, and r itself for alpha = 1 (the limit).
    """
    r = jnp.asarray(logratio, jnp.float32)
    if kind == "reverse_kl":
        return r
    if kind == "forward_kl":
        return -jnp.expm1(-r)
    if kind == "js_divergence":
        return jnp.log(2.0) + log_sigmoid(r)
    if kind == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return r
        return jnp.expm1(jnp.minimum((alpha - 1.0) * r, 80.0)) / (alpha - 1.0)
    raise ValueError(f"f_divergence_type must be one of {', '.join(F_DIVERGENCES)}, got {kind!r}")


def check_options(spec: Spec, hparams: Mapping[str, Any]) -> None:
    """Raises ValueError when DPO options do not fit the loss terms (TRL refuses the same).

    ``f_divergence_type`` other than ``reverse_kl`` only for the score-difference losses
    (``F_DIVERGENCE_LOSSES``); ``use_weighting`` not with the sorting losses ``aot`` and
    ``aot_unpaired``, whose per-pair weights would be misaligned.
    """
    terms = [name for name, _, _ in parse_spec(spec)]
    kind = hparams.get("f_divergence_type", "reverse_kl")
    if kind not in F_DIVERGENCES:
        raise ValueError(
            f"f_divergence_type must be one of {', '.join(F_DIVERGENCES)}, got {kind!r}"
        )
    if kind != "reverse_kl" and not set(terms) <= F_DIVERGENCE_LOSSES:
        raise ValueError(
            f"f_divergence_type={kind!r} works only with the losses "
            f"{', '.join(sorted(F_DIVERGENCE_LOSSES))}; got {', '.join(terms)}"
        )
    if hparams.get("use_weighting") and set(terms) & SORTING_LOSSES:
        raise ValueError(
            "use_weighting (WPO) does not work with aot or aot_unpaired (they sort pairs)"
        )


def _inputs(p: PairLogps, needs_ref: bool, h: HParams | None = None) -> _In:
    h = h or HParams()
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    w, l = f32(p.chosen), f32(p.rejected)  # noqa: E741
    if p.ref_chosen is None or p.ref_rejected is None:
        if needs_ref:
            raise ValueError("this loss needs ref_chosen and ref_rejected log-probs")
        ref_w, ref_l = jnp.zeros_like(w), jnp.zeros_like(l)
    else:
        ref_w, ref_l = f32(p.ref_chosen), f32(p.ref_rejected)
    ones = jnp.ones_like(w)
    nw = ones if p.chosen_tokens is None else jnp.maximum(f32(p.chosen_tokens), 1.0)
    nl = ones if p.rejected_tokens is None else jnp.maximum(f32(p.rejected_tokens), 1.0)
    rw, rl = w - ref_w, l - ref_l
    score = lambda r: f_divergence_scores(r, h.f_divergence_type, h.f_alpha_divergence_coef)  # noqa: E731
    return _In(w=w, l=l, rw=rw, rl=rl, nw=nw, nl=nl, sw=score(rw), sl=score(rl))


def preference_loss(
    name: Spec,
    logps: PairLogps | Mapping[str, Array],
    *,
    beta: float = 0.1,
    where: Array | None = None,
    **hparams: float,
) -> tuple[Array, dict[str, Array]]:
    """Per-pair preference loss and TRL-named metrics.

    Args:
      name: a loss name from ``names()`` or a weighted mixture such as
        ``[("apo_zero", 1.0), ("sft", 0.1)]``; a mixture term may carry its own hparams as a
        third element.
      logps: ``PairLogps`` (or a dict of its fields) of N pairs. Token counts are needed by the
        length-normalized losses (``ipo``, ``sigmoid_norm``, ``simpo``, ``orpo``, ``sft``).
      beta: inverse temperature (0.1, the paper's and TRL's default).
      where: optional boolean mask of the real pairs (padding pairs False); metrics average
        over the real pairs only.
      **hparams: other fields of ``HParams`` (``label_smoothing``, ``discopop_tau``,
        ``f_divergence_type``, ``use_weighting`` ...). An f-divergence replaces each log-ratio by
        its score (:func:`f_divergence_scores`) in the score-difference losses; ``use_weighting``
        multiplies each pair's loss by ``chosen_weight * rejected_weight`` of ``logps`` (WPO,
        Zhou et al. 2024, eq. 2; see :func:`apo_jax.logprobs.wpo_weights`).

    Returns:
      ``(loss_N, metrics)``: the weighted per-pair loss in float32 and scalar metrics
      ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
      ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected`` with TRL's meanings
      (rewards are beta times the log-ratios; beta times the log-probs for reference-free
      losses).
    """
    terms = parse_spec(name)
    check_options(terms, hparams)
    base = HParams(beta=beta, **hparams)
    p = _as_pair_logps(logps)
    x = _inputs(p, needs_ref=needs_reference(terms), h=base)
    loss_N = jnp.zeros_like(x.w)
    for term, weight, overrides in terms:
        loss_N = loss_N + weight * LOSSES[term](x, dataclasses.replace(base, **overrides))
    if base.use_weighting:
        if p.chosen_weight is None or p.rejected_weight is None:
            raise ValueError("use_weighting needs chosen_weight and rejected_weight (WPO weights)")
        wpo_N = jax.lax.stop_gradient(
            jnp.asarray(p.chosen_weight, jnp.float32) * jnp.asarray(p.rejected_weight, jnp.float32)
        )
        loss_N = loss_N * wpo_N
    return loss_N, pair_metrics(x, loss_N, beta, where)


def pair_metrics(
    x: _In, loss_N: Array, beta: float, where: Array | None = None
) -> dict[str, Array]:
    """TRL's DPO metrics, averaged over the (real) pairs."""
    reward_w = jax.lax.stop_gradient(beta * x.rw)
    reward_l = jax.lax.stop_gradient(beta * x.rl)
    mean = lambda a: jnp.mean(a, where=where)  # noqa: E731
    return {
        "loss": mean(loss_N),
        "rewards/chosen": mean(reward_w),
        "rewards/rejected": mean(reward_l),
        "rewards/margins": mean(reward_w - reward_l),
        "rewards/accuracies": mean((reward_w > reward_l).astype(jnp.float32)),
        "logps/chosen": mean(jax.lax.stop_gradient(x.w)),
        "logps/rejected": mean(jax.lax.stop_gradient(x.l)),
    }
