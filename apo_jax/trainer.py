"""Building a run from a validated config: data paths, model, reference, state, compiled steps.

Each function does one thing and can be called from a notebook; `apo_jax.train` strings them
together into the loop.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from apo_jax import layouts, reference, sharding
from apo_jax import train_step as ts
from apo_jax.data import loader as loader_lib
from apo_jax.data import shards
from apo_jax.models import config as model_config
from apo_jax.models import hf
from apo_jax.models.llama import Llama
from apo_jax.optim import make_optimizer
from apo_jax.run_config import ConfigError, RunConfig


@dataclasses.dataclass(frozen=True)
class DataPaths:
    train: str
    eval: str
    tokenizer: str
    manifest: dict[str, Any]


@dataclasses.dataclass
class Built:
    """Everything `train.setup` prepares for the loop."""

    rc: RunConfig
    workdir: str
    paths: DataPaths
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    params: nnx.State
    ref_graphdef: nnx.GraphDef
    ref_params: nnx.State | None  # only for the online reference
    ref_mode: str  # 'precomputed' | 'online' | 'none'
    info: dict[str, Any]  # the reference fingerprint info
    model_cfg: Any


def resolve_data(rc: RunConfig) -> DataPaths:
    """The shard and tokenizer directories of the run; builds the embedded demo when none is given."""
    train, eval_, tokenizer = rc.data["train"], rc.data["eval"], rc.data["tokenizer"]
    if rc.is_demo:
        from apo_jax.data import demo

        assets = demo.build_demo(
            rc.demo["cache_dir"] or None,
            n_train=rc.demo["n_train"],
            n_eval=rc.demo["n_eval"],
            multi_turn=rc.demo["multi_turn"],
        )
        train, eval_ = assets.train_shards, eval_ or assets.eval_shards
        tokenizer = tokenizer or assets.tokenizer_dir
    manifest = shards.read_manifest(train)
    tokenizer = tokenizer or manifest.get("tokenizer", {}).get("dir", "")
    return DataPaths(
        train, eval_, tokenizer if tokenizer and os.path.isdir(tokenizer) else "", manifest
    )


def model_overrides(rc: RunConfig) -> dict[str, Any]:
    m = rc.model
    return {
        "dtype": m["dtype"],
        "param_dtype": m["param_dtype"],
        "remat": m["remat"],
        "scan_layers": m["scan_layers"],
        "attention": m.get("attention", "auto"),
    }


def build_model(rc: RunConfig, paths: DataPaths, mesh: jax.sharding.Mesh) -> tuple[Llama, Any, str]:
    """(model on the mesh, its LlamaConfig, weights fingerprint)."""
    overrides = model_overrides(rc)
    vocab = int(paths.manifest.get("tokenizer", {}).get("vocab_size") or 0)
    if rc.model["hf_path"]:
        model, cfg = hf.load_hf(rc.model["hf_path"], mesh=mesh, **overrides)
        desc: dict[str, Any] = {}
    else:
        seq = int(paths.manifest.get("settings", {}).get("max_length") or 512)
        extra = {"vocab_size": vocab} if vocab else {}
        cfg = model_config.get_preset(
            rc.model["preset"], max_seq_len=max(seq, 512), **extra, **overrides
        )
        with jax.set_mesh(mesh):
            model = Llama(cfg, rngs=nnx.Rngs(rc.seed))
        sharding.shard_model(model, mesh)
        desc = {"preset": rc.model["preset"], "seed": rc.seed, "config": repr(cfg)}
    if vocab and vocab > cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {vocab} tokens but the model's vocabulary only {cfg.vocab_size}"
        )
    return model, cfg, reference.weights_fingerprint(rc.model["hf_path"], desc)


def frozen_reference(params: nnx.State, dtype: str) -> nnx.State:
    """A copy of the parameters in the reference dtype (no optimizer state is ever made for it)."""
    return jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)


def reference_graphdef(rc: RunConfig, graphdef: nnx.GraphDef, model_cfg: Any) -> nnx.GraphDef:
    """The reference runs in its own dtype: rebuild the graph with that compute dtype."""
    dtype = rc.reference["dtype"]
    if dtype == model_cfg.dtype and dtype == model_cfg.param_dtype:
        return graphdef
    cfg = dataclasses.replace(model_cfg, dtype=dtype, param_dtype=dtype)
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(abstract, nnx.Param, ...)[0]


def reference_mode(rc: RunConfig) -> str:
    """'precomputed' (read from the data, computed first when missing), 'online' or 'none'."""
    from apo_jax import losses

    mode = rc.reference["mode"]
    if mode == "none" or not losses.needs_reference(rc.loss["name"]):
        return "none"
    return "online" if mode == "online" else "precomputed"


def state_shardings(
    params: nnx.State, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> ts.TrainState:
    """Shardings of the whole TrainState: params as placed, optimizer moments like their params."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params_sh = jax.tree.map(lambda x: x.sharding, params)
    opt_sh = optax.tree_map_params(
        tx,
        lambda _, s: s,
        jax.eval_shape(tx.init, params),
        params_sh,
        transform_non_params=lambda _: replicated,
    )
    return ts.TrainState(
        step=replicated,
        params=params_sh,
        opt_state=opt_sh,
        rng=replicated,
        bad_steps=replicated,
        skipped=replicated,
    )


def loader_config(rc: RunConfig, *, train: bool, info: dict[str, Any] | None, ref_mode: str) -> Any:
    # Packed rows of all processes must split evenly over the mesh's data*fsdp batch shards.
    shards, procs = rc.mesh[0] * rc.mesh[1], jax.process_count()
    return loader_lib.LoaderConfig(
        batch_size=rc.batch_size // procs,
        seq_len=rc.data["seq_len"] or None,
        buckets=tuple(rc.data["buckets"]) or None,
        layout=layouts.get(rc.data["layout"]),
        row_multiple=shards // math.gcd(shards, procs),
        micro_batches=rc.grad_accum if train else 1,
        seed=rc.seed,
        shuffle=rc.data["shuffle"] if train else False,
        num_epochs=rc.data["num_epochs"] if train else 1,
        drop_remainder=train,
        worker_count=rc.data["worker_count"] if train else 0,
        reference_info=info if ref_mode == "precomputed" else None,
    )


def make_tx(rc: RunConfig, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    return make_optimizer(rc.optim, steps)


def step_config(rc: RunConfig, ref_mode: str) -> ts.StepConfig:
    return ts.StepConfig(
        loss=rc.loss["name"],
        beta=rc.loss["beta"],
        loss_hparams=rc.loss_hparams(),
        logprob_chunk=rc.logprob_chunk,
        grad_accum=rc.grad_accum,
        reference=ref_mode,
        layout=layouts.get(rc.data["layout"]),
    )


def compile_steps(
    graphdef: nnx.GraphDef,
    ref_graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    scfg: ts.StepConfig,
    state_sh: Any,
    mesh: jax.sharding.Mesh,
) -> tuple[Any, Any]:
    """The jitted train and eval steps, state donated, batch rows sharded over ('data', 'fsdp')."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def train_fn(state, batch, ref_params):
        return ts.train_step(
            state,
            batch,
            ref_params,
            graphdef=graphdef,
            tx=tx,
            cfg=scfg,
            schedule=schedule,
            ref_graphdef=ref_graphdef,
        )

    def eval_fn(params, batch, ref_params):
        return ts.eval_step(
            params, batch, ref_params, graphdef=graphdef, cfg=scfg, ref_graphdef=ref_graphdef
        )

    train_jit = jax.jit(
        train_fn,
        in_shardings=(state_sh, None, None),
        out_shardings=(state_sh, replicated),
        donate_argnames=("state",),
    )
    eval_jit = jax.jit(
        eval_fn, in_shardings=(state_sh.params, None, None), out_shardings=replicated
    )
    return train_jit, eval_jit
