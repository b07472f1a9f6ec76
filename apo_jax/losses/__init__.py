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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

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


class PairLogps(NamedTuple):
    """Summed completion log-probs of N pairs (policy and reference) and completion lengths."""

    chosen: Array  # log pi(y_w|x), shape N
    rejected: Array  # log pi(y_l|x), shape N
    ref_chosen: Array | None = None  # log pi_ref(y_w|x); None for reference-free losses
    ref_rejected: Array | None = None
    chosen_tokens: Array | None = None  # number of completion tokens of y_w
    rejected_tokens: Array | None = None
    chosen_weight: Array | None = None  # WPO weight of y_w (wpo_weight); only for use_weighting
    rejected_weight: Array | None = None


@dataclasses.dataclass(frozen=True)
class HParams:
    """Loss hyper-parameters; the defaults are TRL's."""

    beta: float = 0.1  # inverse temperature of the implicit reward (tau for IPO, lambda for ORPO)
    label_smoothing: float = 0.0  # assumed probability that a pair's label is flipped
    discopop_tau: float = 0.05  # temperature of DiscoPOP's mixing coefficient
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    exo_epsilon: float = 1e-3  # EXO's smoothing when label_smoothing is 0
    f_divergence_type: str = (
        "reverse_kl"  # reverse_kl | forward_kl | js_divergence | alpha_divergence
    )
    f_alpha_divergence_coef: float = 0.5  # alpha of alpha_divergence
    use_weighting: bool = False  # WPO: multiply each pair's loss by its two WPO weights


class _In(NamedTuple):
    """float32 view of the inputs shared by every loss."""

    w: Array  # policy log-prob of chosen
    l: Array  # noqa: E741 - policy log-prob of rejected
    rw: Array  # chosen log-ratio r_w
    rl: Array  # rejected log-ratio r_l
    nw: Array  # chosen token count (>= 1)
    nl: Array  # rejected token count (>= 1)
    sw: Array  # chosen score: f'(pi/pi_ref) of the f-divergence (r_w for reverse KL)
    sl: Array  # rejected score


def _smoothed_logistic(z: Array, ls: float) -> Array:
    return -(1.0 - ls) * log_sigmoid(z) - ls * log_sigmoid(-z)


def sigmoid(x: _In, h: HParams) -> Array:
    """DPO (Rafailov et al., 2023): -log sigma(beta d); with ls > 0 the conservative cDPO form."""
    return _smoothed_logistic(h.beta * (x.sw - x.sl), h.label_smoothing)


def hinge(x: _In, h: HParams) -> Array:
    """SLiC hinge (Zhao et al., 2023): max(0, 1 - beta d)."""
    return jax.nn.relu(1.0 - h.beta * (x.sw - x.sl))


def ipo(x: _In, h: HParams) -> Array:
    """IPO (Azar et al., 2023, eq. 17), length-normalized as TRL: (d_avg - 1/(2 beta))^2."""
    d_avg = x.sw / x.nw - x.sl / x.nl
    return (d_avg - 1.0 / (2.0 * h.beta)) ** 2


def robust(x: _In, h: HParams) -> Array:
    """Robust DPO (Chowdhury et al., 2024): unbiased under label noise of rate ls < 1/2."""
    z, ls = h.beta * (x.sw - x.sl), h.label_smoothing
    return (-(1.0 - ls) * log_sigmoid(z) + ls * log_sigmoid(-z)) / (1.0 - 2.0 * ls)


def exo_pair(x: _In, h: HParams) -> Array:
    """EXO (Ji et al., 2024, eq. 16): KL(softmax(beta r) || [1 - eps, eps]) over the pair."""
    eps = h.label_smoothing if h.label_smoothing > 0 else h.exo_epsilon
    z = h.beta * (x.sw - x.sl)
    log_qw, log_ql = log_sigmoid(z), log_sigmoid(-z)
    return jnp.exp(log_qw) * (log_qw - jnp.log1p(-eps)) + jnp.exp(log_ql) * (log_ql - jnp.log(eps))


def nca_pair(x: _In, h: HParams) -> Array:
    """NCA (Chen et al., 2024): -log sigma(beta r_w) - 1/2 log sigma(-beta r_w) - 1/2 log sigma(-beta r_l)."""
    cw, cl = h.beta * x.rw, h.beta * x.rl
    return -log_sigmoid(cw) - 0.5 * log_sigmoid(-cw) - 0.5 * log_sigmoid(-cl)


def bco_pair(x: _In, h: HParams) -> Array:
    """BCO on pairs (Jung et al., 2024): -log sigma(beta r_w) - log sigma(-beta r_l)."""
    return -log_sigmoid(h.beta * x.rw) - log_sigmoid(-h.beta * x.rl)


def sppo_hard(x: _In, h: HParams) -> Array:
    """SPPO with hard labels (Wu et al., 2024): (r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2."""
    return (x.rw - 0.5 / h.beta) ** 2 + (x.rl + 0.5 / h.beta) ** 2


def aot(x: _In, h: HParams) -> Array:
    """AOT paired (Melnyk et al., 2024): logistic loss on sorted policy minus sorted reference margins.

    Couples the pairs of a batch through the sort, as in TRL.
    """
    delta = jnp.sort(x.w - x.l) - jnp.sort((x.w - x.rw) - (x.l - x.rl))
    return _smoothed_logistic(h.beta * delta, h.label_smoothing)


def aot_unpaired(x: _In, h: HParams) -> Array:
    """AOT unpaired (Melnyk et al., 2024): logistic loss on sorted r_w minus sorted r_l."""
    delta = jnp.sort(x.rw) - jnp.sort(x.rl)
    return _smoothed_logistic(h.beta * delta, h.label_smoothing)


def apo_zero(x: _In, h: HParams) -> Array:
    """APO-zero (D'Oosterlinck et al., 2024, eq. 7): (1 - sigma(beta r_w)) + sigma(beta r_l).

    Raises the likelihood of the winning output and lowers that of the losing one. Use it when
    the winning outputs are better than what the model produces now (for example CLAIR revisions
    by a stronger reviser of a weaker model's answers).
    """
    return jax.nn.sigmoid(-h.beta * x.rw) + jax.nn.sigmoid(h.beta * x.rl)


def apo_down(x: _In, h: HParams) -> Array:
    """APO-down (D'Oosterlinck et al., 2024, eq. 8): sigma(beta r_w) + (1 - sigma(beta (r_w - r_l))).

    Lowers the likelihood of both outputs, the losing one more. Use it when the model is already
    better than the winning outputs, so that imitating them would hurt while their contrast with
    the losing outputs still carries signal.
    """
    return jax.nn.sigmoid(h.beta * x.rw) + jax.nn.sigmoid(-h.beta * (x.rw - x.rl))


def discopop(x: _In, h: HParams) -> Array:
    """DiscoPOP (Chris Lu et al., 2024, eq. 5): logistic and exponential losses mixed by sigma(z/tau).

    With z = beta d: (1 - sigma(z/tau)) (-log sigma(z)) + sigma(z/tau) exp(-z), the second term
    evaluated as exp(-z + log sigma(z/tau)) so it never forms inf * 0.
    """
    z = h.beta * (x.sw - x.sl)
    logistic = -log_sigmoid(z) * jax.nn.sigmoid(-z / h.discopop_tau)
    exponential = jnp.exp(-z + log_sigmoid(z / h.discopop_tau))
    return logistic + exponential


def sigmoid_norm(x: _In, h: HParams) -> Array:
    """Length-normalized DPO (TRL's ``sigmoid_norm``): -log sigma(beta (r_w/|y_w| - r_l/|y_l|))."""
    return -log_sigmoid(h.beta * (x.sw / x.nw - x.sl / x.nl))


def sft(x: _In, h: HParams) -> Array:
    """Negative log-likelihood of the chosen completions, averaged over all their tokens.

    As TRL, the mean is over the tokens of the batch, not over pairs: entry i is pair i's share,
    -log pi(y_w_i|x_i) * N / sum_j |y_w_j|, so that the batch mean is the token mean.
    """
    return -x.w * x.w.shape[-1] / jnp.sum(x.nw, axis=-1, keepdims=True)


def simpo(x: _In, h: HParams) -> Array:
    """SimPO (Meng et al., 2024): reference-free, -log sigma(beta (w/|y_w| - l/|y_l|) - gamma).

    Label smoothing as in TRL's CPO trainer.
    """
    z = h.beta * (x.w / x.nw - x.l / x.nl) - h.simpo_gamma
    return _smoothed_logistic(z, h.label_smoothing)


def _log1mexp(a: Array) -> Array:
    """log(1 - exp(a)) for a < 0, stable on both sides of -log 2."""
    a = jnp.minimum(a, -1e-6)
    return jnp.where(a > -0.6931472, jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(a)))


def orpo(x: _In, h: HParams) -> Array:
    """ORPO (Hong et al., 2024): reference-free, NLL(y_w) - lambda log sigma(log odds ratio).

    With average log-probs a_w = w/|y_w|, a_l = l/|y_l| and odds p/(1-p), the log odds ratio is
    (a_w - a_l) - (log(1 - e^a_w) - log(1 - e^a_l)); lambda is ``beta``.
    """
    aw, al = x.w / x.nw, x.l / x.nl
    log_odds = (aw - al) - (_log1mexp(aw) - _log1mexp(al))
    return -aw - h.beta * log_sigmoid(log_odds)


LossFn = Callable[[_In, HParams], Array]

LOSSES: dict[str, LossFn] = {
    "sigmoid": sigmoid,
    "hinge": hinge,
    "ipo": ipo,
    "robust": robust,
    "exo_pair": exo_pair,
    "nca_pair": nca_pair,
    "bco_pair": bco_pair,
    "sppo_hard": sppo_hard,
    "aot": aot,
    "aot_unpaired": aot_unpaired,
    "apo_zero": apo_zero,
    "apo_down": apo_down,
    "discopop": discopop,
    "sigmoid_norm": sigmoid_norm,
    "sft": sft,
    "simpo": simpo,
    "orpo": orpo,
}
ALIASES = {"dpo": "sigmoid"}
REFERENCE_FREE = frozenset({"sft", "simpo", "orpo"})
# The losses built on the chosen-minus-rejected score, which TRL lets an f-divergence change.
F_DIVERGENCE_LOSSES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
SORTING_LOSSES = frozenset({"aot", "aot_unpaired"})  # no per-pair WPO weight (TRL refuses too)


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


def _inputs(p: PairLogps, needs_ref: bool, h: HParams = HParams()) -> _In:
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
