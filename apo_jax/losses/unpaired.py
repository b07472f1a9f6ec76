"""Objectives for unpaired preferences: single completions labelled desirable or undesirable.

TRL's ``KTOTrainer`` layout (``prompt``, ``completion``, ``label``) with its two ``loss_type``
values, same formulas and metric names:

- ``kto`` (Ethayarajh et al., 2024, eq. 7): with r = log pi(y|x) - log pi_ref(y|x) and z the
  batch's KL estimate, a desirable example costs 1 - sigma(beta (r - z)) and an undesirable one
  1 - sigma(beta (z - r)). z is the mean of log pi(y'|x) - log pi_ref(y'|x) over mismatched pairs
  (x, y') of the batch, clamped at 0 and carrying no gradient (:func:`kl_estimate`).
- ``apo_zero_unpaired`` (D'Oosterlinck et al., 2024, eq. 7 split per example): 1 - sigma(beta r)
  for a desirable example, sigma(beta r) for an undesirable one. It needs no KL estimate. Use it
  when the desirable completions are better than what the model writes now.

Each example's loss is multiplied by ``desirable_weight`` or ``undesirable_weight``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

UNPAIRED_LOSSES = ("kto", "apo_zero_unpaired")
NEEDS_KL = frozenset({"kto"})


class UnpairedLogps(NamedTuple):
    """Summed completion log-probs of N unpaired examples and the batch's KL estimate."""

    policy: Array  # log pi(y|x), shape N
    reference: Array  # log pi_ref(y|x), shape N
    label: Array  # bool[N]: True desirable, False undesirable
    kl: Array | float | None = None  # the batch's KL estimate (scalar); only `kto` needs it


def kl_estimate(policy_kl: Array, reference_kl: Array, where: Array | None = None) -> Array:
    """TRL's KL term: mean of the mismatched pairs' log-ratios, clamped at 0, no gradient.

    Args:
      policy_kl, reference_kl: log pi(y'|x) and log pi_ref(y'|x) of the batch's mismatched
        (prompt, completion) pairs, shape N.
      where: optional mask of the real examples (padding False).

    Returns:
      A float32 scalar >= 0.
    """
    ratio = jnp.asarray(policy_kl, jnp.float32) - jnp.asarray(reference_kl, jnp.float32)
    if where is not None:
        # A batch of padding only: an empty mean would be nan; report 0.
        n = jnp.sum(where)
        mean = jnp.sum(jnp.where(where, ratio, 0.0)) / jnp.maximum(n, 1)
    else:
        mean = jnp.mean(ratio)
    return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


def unpaired_loss(
    name: str,
    logps: UnpairedLogps,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    where: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Per-example unpaired preference loss and TRL's KTO metrics.

    Args:
      name: ``kto`` or ``apo_zero_unpaired``.
      logps: :class:`UnpairedLogps` of N examples; ``kl`` (clamped at 0 here, as TRL does, and
        never differentiated) is required by ``kto`` and ignored by ``apo_zero_unpaired``.
      beta: inverse temperature of the implicit reward (TRL's default 0.1).
      desirable_weight, undesirable_weight: factors of the desirable and undesirable losses.
      where: optional boolean mask of the real examples; metrics average over them only.

    Returns:
      ``(loss_N, metrics)``: the weighted loss of each example in input order (float32) and
      scalars ``loss`` (mean over the examples), ``kl`` (0 for ``apo_zero_unpaired``, which
      computes none), ``rewards/chosen`` and ``logps/chosen`` (means of beta r and log pi over
      the desirable examples), ``rewards/rejected`` and ``logps/rejected`` (over the undesirable
      ones) and ``rewards/margins`` (their difference). A side with no example reports 0.

    Raises:
      ValueError: an unknown name, or ``kto`` without a KL estimate.
    """
    name = name.strip()
    if name not in UNPAIRED_LOSSES:
        raise ValueError(f"unknown unpaired loss {name!r}; known: {', '.join(UNPAIRED_LOSSES)}")
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    policy_N, reference_N = f32(logps.policy), f32(logps.reference)
    label_N = jnp.asarray(logps.label).astype(bool)
    r_N = policy_N - reference_N
    if name == "kto":
        if logps.kl is None:
            raise ValueError("the kto loss needs the batch's KL estimate (UnpairedLogps.kl)")
        kl = jax.lax.stop_gradient(jnp.maximum(f32(logps.kl), 0.0))
        desirable_N = jax.nn.sigmoid(-beta * (r_N - kl))  # 1 - sigma(beta (r - z))
        undesirable_N = jax.nn.sigmoid(-beta * (kl - r_N))  # 1 - sigma(beta (z - r))
    else:
        kl = jnp.zeros((), jnp.float32)
        desirable_N = jax.nn.sigmoid(-beta * r_N)  # 1 - sigma(beta r)
        undesirable_N = jax.nn.sigmoid(beta * r_N)
    loss_N = jnp.where(label_N, desirable_weight * desirable_N, undesirable_weight * undesirable_N)
    return loss_N, unpaired_metrics(loss_N, r_N, policy_N, label_N, kl, beta, where)


def unpaired_metrics(
    loss_N: Array,
    r_N: Array,
    policy_N: Array,
    label_N: Array,
    kl: Array,
    beta: float,
    where: Array | None = None,
) -> dict[str, Array]:
    """TRL's KTO metrics over the real examples (``where``), each side averaged on its own."""
    valid_N = jnp.ones_like(label_N) if where is None else jnp.asarray(where).astype(bool)
    sg = jax.lax.stop_gradient

    def side_mean(x_N: Array, side_N: Array) -> Array:
        keep_N = side_N & valid_N
        return jnp.sum(jnp.where(keep_N, sg(x_N), 0.0)) / jnp.maximum(jnp.sum(keep_N), 1)

    chosen, rejected = label_N, ~label_N
    rewards_chosen = side_mean(beta * r_N, chosen)
    rewards_rejected = side_mean(beta * r_N, rejected)
    return {
        "loss": jnp.mean(loss_N, where=valid_N),
        "kl": jnp.broadcast_to(sg(kl), ()).astype(jnp.float32),
        "rewards/chosen": rewards_chosen,
        "rewards/rejected": rewards_rejected,
        "rewards/margins": rewards_chosen - rewards_rejected,
        "logps/chosen": side_mean(policy_N, chosen),
        "logps/rejected": side_mean(policy_N, rejected),
    }
