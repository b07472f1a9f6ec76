"""The pair objectives, one formula each, and their registry (see :mod:`apo_jax.losses`).

Each loss is a function of the float32 inputs :class:`_In` (log-probs, log-ratios, f-divergence
scores, token counts) and the hyper-parameters :class:`HParams`, returning a loss per pair.
Notation as in :mod:`apo_jax.losses`: d = r_w - r_l; the score-difference losses use the
f-divergence scores s_w - s_l, which are r_w - r_l for the default reverse KL.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

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
