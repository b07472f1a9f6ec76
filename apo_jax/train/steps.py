"""The compiled steps: the train state laid out on the mesh, and the train and eval steps of
`apo_jax.train.train_step` jitted once with their shardings and the state donated.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from apo_jax import metrics as metrics_lib
from apo_jax.config import RunConfig
from apo_jax.train import train_step as ts


def state_shardings(
    params: nnx.State,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    ref_params: nnx.State | None = None,
) -> ts.TrainState:
    """Shardings of the whole TrainState: params (and TR-DPO's reference) as placed, optimizer
    moments like their params."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params_sh = jax.tree.map(lambda x: x.sharding, params)
    opt_sh = optax.tree_map_params(
        tx,
        lambda _, s: s,
        jax.eval_shape(tx.init, params),
        params_sh,
        transform_non_params=lambda _: replicated,
    )
    ref_sh = None if ref_params is None else jax.tree.map(lambda x: x.sharding, ref_params)
    return ts.TrainState(
        step=replicated,
        params=params_sh,
        opt_state=opt_sh,
        rng=replicated,
        bad_steps=replicated,
        skipped=replicated,
        ref_params=ref_sh,
    )


def init_state(
    params: nnx.State,
    tx: optax.GradientTransformation,
    seed: int,
    state_sh: ts.TrainState,
    ref_params: nnx.State | None = None,
) -> ts.TrainState:
    """A fresh TrainState laid out on `state_sh`, holding `ref_params` (TR-DPO's reference) as a
    copy of its own: the state is donated to every step, the reference it starts from is not."""
    if ref_params is not None:
        ref_params = jax.tree.map(jnp.copy, ref_params)
    init = lambda p, r: ts.init_state(p, tx, seed, r)  # noqa: E731
    return jax.jit(init, out_shardings=state_sh)(params, ref_params)


def step_config(rc: RunConfig) -> ts.StepConfig:
    return ts.StepConfig(
        loss=rc.loss.name,
        beta=rc.loss.beta,
        loss_hparams=rc.loss.hparams,
        logprob_chunk=rc.logprob_chunk,
        grad_accum=rc.grad_accum,
        reference=rc.reference.mode,
        layout=rc.data.layout,
        ld_alpha=rc.loss.ld_alpha,
        unpaired_weights=(rc.loss.desirable_weight, rc.loss.undesirable_weight),
        sync_every=rc.reference.ref_model_sync_steps if rc.reference.sync_ref_model else 0,
        sync_alpha=rc.reference.ref_model_mixup_alpha if rc.reference.sync_ref_model else 0.0,
    )


class Steps:
    """The jitted train and eval steps: state donated, batch rows sharded over ('data', 'fsdp').

    Each train-batch shape (buckets and packed rows vary it) is compiled ahead of time once and
    kept, so its model FLOPs are known for MFU (`flops` is the last call's).
    """

    def __init__(
        self, rc: RunConfig, graphdef, ref, tx, schedule, state_sh, mesh, model_cfg, frozen=None
    ):
        scfg = step_config(rc)
        replicated = NamedSharding(mesh, PartitionSpec())
        ref_graphdef = ref.graphdef

        def train_fn(state, batch, ref_params, frozen):
            return ts.train_step(
                state,
                batch,
                ref_params,
                frozen,
                graphdef=graphdef,
                tx=tx,
                cfg=scfg,
                schedule=schedule,
                ref_graphdef=ref_graphdef,
            )

        def eval_fn(state, batch, ref_params, frozen):
            if state.ref_params is not None:  # TR-DPO: the reference mixed so far
                ref_params = state.ref_params
            return ts.eval_step(
                state.params,
                batch,
                ref_params,
                frozen,
                graphdef=graphdef,
                cfg=scfg,
                ref_graphdef=ref_graphdef,
            )

        # The frozen LoRA base keeps the sharding it was placed with; only the state is donated.
        self._train = jax.jit(
            train_fn,
            in_shardings=(state_sh, None, None, None),
            out_shardings=(state_sh, replicated),
            donate_argnames=("state",),
        )
        self._eval = jax.jit(
            eval_fn, in_shardings=(state_sh, None, None, None), out_shardings=replicated
        )
        # LoRA: the online reference is the frozen base itself, found inside the step; TR-DPO's
        # moves, so it lives in the state (`init_state`).
        self.ref_params = None if frozen is not None or scfg.sync_every else ref.params
        self.frozen = frozen
        self._online = rc.reference.mode == "online"
        self._model_cfg = model_cfg
        self._compiled: dict[Any, tuple[Any, float]] = {}
        self.flops: float | None = None

    def train(self, state: ts.TrainState, batch: dict[str, Any]) -> tuple[ts.TrainState, Any]:
        """One optimizer step on a global batch; returns (state, device metrics)."""
        key = batch["input_ids"].shape
        if key not in self._compiled:
            exe = self._train.lower(state, batch, self.ref_params, self.frozen).compile()
            rows, seq_len = key
            flops = metrics_lib.model_flops(
                self._model_cfg, rows, seq_len, online_reference=self._online
            )
            if self.frozen is not None:  # LoRA: no weight gradients, 2 forwards' work, not 3
                flops *= (2 + self._online) / (3 + self._online)
            self._compiled[key] = exe, flops
        exe, self.flops = self._compiled[key]
        return exe(state, batch, self.ref_params, self.frozen)

    def evaluate(self, state: ts.TrainState, batch: dict[str, Any]) -> Any:
        """Loss metrics of the state's policy on a held-out global batch (device values)."""
        return self._eval(state, batch, self.ref_params, self.frozen)
