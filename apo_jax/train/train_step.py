"""The train state and the pure train and eval steps.

The model is split once into a static graphdef and a state of parameters; the step is a pure
function of (state, batch[, reference params][, frozen]) that `jax.jit` compiles once over the
mesh. The batch's row layout (`StepConfig.layout`, from `apo_jax.layouts`) gives the pairs' log-probs
and the micro-batch split; chosen and rejected run in one forward pass, so the weights stream once.

With LoRA (`apo_jax.models.lora`) the state's params are the adapters alone: the frozen base comes
as a separate argument, is merged with them for the forward pass, and gets neither gradients nor
optimizer state.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from apo_jax import layouts, losses
from apo_jax.models import lora

Array = jax.Array
Batch = Mapping[str, Array]


@flax.struct.dataclass
class TrainState:
    """Everything a step changes; a checkpoint saves exactly this."""

    step: Array  # int32 scalar: optimizer updates applied or skipped so far
    params: nnx.State  # trainable parameters (float32 master weights; the adapters with LoRA)
    opt_state: optax.OptState
    rng: Array  # PRNG key, split once per step
    bad_steps: Array  # int32: consecutive steps skipped for non-finite loss or gradients
    skipped: Array  # int32: all skipped steps
    # TR-DPO's online reference, mixed toward the policy by the step itself (`sync_reference`);
    # None otherwise (a reference that never changes is an argument of the step, not state).
    ref_params: nnx.State | None = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static settings of a step (hashable, so the step compiles once per setting)."""

    loss: Any = "apo_down"  # a loss name or mixture, see losses.parse_spec
    beta: float = 0.1
    loss_hparams: tuple[tuple[str, float], ...] = ()  # other losses.HParams fields
    logprob_chunk: int = 128  # time steps per chunk of the log-prob head
    grad_accum: int = 1  # micro-batches per step
    reference: str = "precomputed"  # 'precomputed' (from the batch) | 'online' | 'none'
    layout: layouts.Layout = layouts.get("concat")  # the batch's row layout (layouts.get(name))
    ld_alpha: float = 1.0  # LD-DPO weight of the longer completion's tail (1: off; concat)
    unpaired_weights: tuple[float, float] = (1.0, 1.0)  # desirable, undesirable (kto ...)
    sync_every: int = 0  # TR-DPO: mix the reference toward the policy every N steps (0: off)
    sync_alpha: float = 0.0  # TR-DPO: the policy's share of each mix


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params) of a model whose only state is its parameters."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("the model holds non-parameter state; the train step does not carry it")
    return graphdef, params


def init_state(
    params: nnx.State,
    tx: optax.GradientTransformation,
    seed: int,
    ref_params: nnx.State | None = None,
) -> TrainState:
    """A fresh state: step 0, optimizer initialized on `params`; `ref_params`: TR-DPO's reference."""
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731 - distinct buffers, so each can be donated
    return TrainState(
        step=zero(),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        bad_steps=zero(),
        skipped=zero(),
        ref_params=ref_params,
    )


def mix_reference(ref_params: nnx.State, params: nnx.State, alpha: float) -> nnx.State:
    """TR-DPO's soft update: ``alpha * policy + (1 - alpha) * reference``, in float32, each leaf
    back in the reference's dtype."""
    a, keep = np.float32(alpha), np.float32(1 - alpha)
    f32 = jnp.float32
    return jax.tree.map(
        lambda r, p: (a * p.astype(f32) + keep * r.astype(f32)).astype(r.dtype), ref_params, params
    )


def sync_reference(state: TrainState, cfg: StepConfig) -> nnx.State | None:
    """The state's reference after its step: TR-DPO (Gorbatovski et al., 2024, as TRL's
    ``sync_ref_model``) mixes it toward the policy when the step count is a multiple of
    `cfg.sync_every` (TRL syncs at multiples of the period only); unchanged otherwise."""
    if not cfg.sync_every or state.ref_params is None:
        return state.ref_params
    return jax.lax.cond(
        state.step % cfg.sync_every == 0,
        lambda: mix_reference(state.ref_params, state.params, cfg.sync_alpha),
        lambda: state.ref_params,
    )


def pair_logps(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    batch: Batch,
    cfg: StepConfig,
    ref_params: nnx.State | None = None,
    ref_graphdef: nnx.GraphDef | None = None,
) -> losses.PairLogps:
    """Policy (and reference) log-probs of the N pairs of a batch in `cfg.layout`.

    The online reference runs through `ref_graphdef` (default: the policy's graph), which may
    differ in compute dtype; a precomputed one is read from the batch.
    """
    layout, chunk = cfg.layout, cfg.logprob_chunk
    wpo = bool(dict(cfg.loss_hparams).get("use_weighting"))
    # TRL's DPO options (LD-DPO, WPO weights) go through the layout's contract entry, which is
    # plain pair_logps without them (concat supports them; config.validate checks the layout).
    side, *weights = layout.regularized_logps(
        graphdef, params, batch, chunk, ld_alpha=cfg.ld_alpha, wpo=wpo
    )
    chosen, rejected, n_w, n_l = side
    if cfg.reference == "online":  # TRL weights the reference's log-probs alike (not with WPO)
        ref, _, _ = layout.regularized_logps(
            ref_graphdef or graphdef, ref_params, batch, chunk, ld_alpha=cfg.ld_alpha
        )
        ref_w, ref_l = jax.lax.stop_gradient(ref[0]), jax.lax.stop_gradient(ref[1])
    elif cfg.reference == "precomputed":
        ref_w, ref_l = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    else:
        ref_w = ref_l = None
    return losses.PairLogps(
        chosen=chosen,
        rejected=rejected,
        ref_chosen=ref_w,
        ref_rejected=ref_l,
        chosen_tokens=n_w,
        rejected_tokens=n_l,
        chosen_weight=weights[0],
        rejected_weight=weights[1],
    )


def unpaired_logps(logps: losses.PairLogps, batch: Batch, name: str) -> losses.UnpairedLogps:
    """An unpaired batch's log-probs (its layout runs completions as ``chosen`` and the KL
    completions as ``rejected``) with the batch's KL estimate when the loss needs one."""
    valid_N = batch["index"] >= 0
    kl = None
    if name.strip() in losses.NEEDS_KL:
        kl = losses.kl_estimate(logps.rejected, logps.ref_rejected, where=valid_N)
    return losses.UnpairedLogps(logps.chosen, logps.ref_chosen, batch["label"], kl)


def loss_fn(
    params, graphdef, batch, cfg: StepConfig, ref_params=None, ref_graphdef=None, frozen=None
):
    """Mean preference loss of a batch and its metrics.

    With LoRA, `frozen` is the frozen base; an online reference given as None is that base itself
    (under `ref_graphdef`, the graph without adapters), so the step holds the weights once.
    """
    if frozen is not None:
        if cfg.reference == "online" and ref_params is None:
            ref_params = lora.base_state(frozen)
        params = nnx.merge_state(frozen, params)
    logps = pair_logps(graphdef, params, batch, cfg, ref_params, ref_graphdef)
    valid_N = batch["index"] >= 0  # the loader pads a last partial batch with index -1
    if losses.is_unpaired(cfg.loss):
        wd, wu = cfg.unpaired_weights
        loss_N, metrics = losses.unpaired_loss(
            cfg.loss,
            unpaired_logps(logps, batch, cfg.loss),
            beta=cfg.beta,
            desirable_weight=wd,
            undesirable_weight=wu,
            where=valid_N,
        )
    else:
        loss_N, metrics = losses.preference_loss(
            cfg.loss, logps, beta=cfg.beta, where=valid_N, **dict(cfg.loss_hparams)
        )
    return jnp.sum(jnp.where(valid_N, loss_N, 0.0)) / jnp.maximum(jnp.sum(valid_N), 1), metrics


def _grads(
    state: TrainState, graphdef, batch: Batch, cfg: StepConfig, ref_params, ref_graphdef, frozen
):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if frozen is not None:  # LoRA dropout keys of this step (none without dropout)
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 1)
        frozen = lora.fill_dropout_keys(frozen, step_key)
    args = (cfg, ref_params, ref_graphdef, frozen)
    if cfg.grad_accum == 1:
        (_, metrics), grads = grad_fn(state.params, graphdef, batch, *args)
        return grads, metrics

    def body(acc, micro):
        (_, m), g = grad_fn(state.params, graphdef, micro, *args)
        return jax.tree.map(jnp.add, acc, g), m

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, metrics_K = jax.lax.scan(body, zeros, cfg.layout.micro_batches(batch, cfg.grad_accum))
    grads = jax.tree.map(lambda g: g / cfg.grad_accum, grads)
    return grads, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics_K)


def train_step(
    state: TrainState,
    batch: Batch,
    ref_params: nnx.State | None = None,
    frozen: nnx.State | None = None,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    cfg: StepConfig,
    schedule: Callable[[Array], Array] | None = None,
    ref_graphdef: nnx.GraphDef | None = None,
) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer update, skipped (and counted) when the loss, the gradients or the updated
    parameters are not finite.

    Args:
      state: the TrainState (donated by the caller's jit).
      batch: a batch of N pairs in `cfg.layout`, laid out for `cfg.grad_accum` micro-batches.
      ref_params: frozen reference parameters, for ``cfg.reference == 'online'`` (None with
        LoRA: the reference is then the frozen base without adapters; unused when the state
        carries TR-DPO's reference).
      frozen: a LoRA run's frozen base (merged with the adapters in ``state.params``), or None.
      graphdef: the model's static graph.
      tx: the optax transformation (clipping included).
      cfg: the StepConfig.
      schedule: the learning-rate schedule, only to report it.
      ref_graphdef: the online reference's graph when its dtype differs from the policy's.

    Returns:
      (new state, metrics): the new state (its TR-DPO reference synced when due), the loss
      metrics plus ``grad_norm``, ``learning_rate``,
      ``skipped`` (1 when this update was skipped) and ``tokens``.
    """
    if state.ref_params is not None:
        ref_params = state.ref_params
    grads, metrics = _grads(state, graphdef, batch, cfg, ref_params, ref_graphdef, frozen)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # An update that makes any parameter NaN or infinite (with a finite loss and gradient: a
    # NaN learning rate, an overflow) is a bad step too: the parameters are never replaced by it.
    params_ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_params)]))
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & params_ok
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
    bad = jnp.where(ok, 0, state.bad_steps + 1)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt, state.opt_state),
        rng=jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0]),
        bad_steps=bad,
        skipped=state.skipped + (1 - ok.astype(jnp.int32)),
    )
    new_state = new_state.replace(ref_params=sync_reference(new_state, cfg))
    metrics = dict(metrics)
    metrics["grad_norm"] = grad_norm
    metrics["skipped"] = 1 - ok.astype(jnp.int32)
    metrics["bad_steps"] = bad
    metrics["tokens"] = jnp.sum(batch["segment_ids"] > 0)
    if schedule is not None:
        metrics["learning_rate"] = schedule(state.step)
    return new_state, metrics


def eval_step(
    params: nnx.State,
    batch: Batch,
    ref_params: nnx.State | None = None,
    frozen: nnx.State | None = None,
    *,
    graphdef: nnx.GraphDef,
    cfg: StepConfig,
    ref_graphdef: nnx.GraphDef | None = None,
) -> dict[str, Array]:
    """Loss and metrics of a held-out batch (no update; LoRA dropout off)."""
    _, metrics = loss_fn(params, graphdef, batch, cfg, ref_params, ref_graphdef, frozen)
    return metrics
