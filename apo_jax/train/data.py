"""The run's data: where its shards and tokenizer are, which row layout it trains in, its loaders.

`resolve_data` finds the shard and tokenizer directories (building the embedded demo when the
config names none), `resolve_layout` turns config.data.layout=auto into the layout picked for the
train shards, and `make_loader` gives this process's loader of a split (`apo_jax.data.loader`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import jax

from apo_jax import layouts, losses
from apo_jax.config import ConfigError, RunConfig
from apo_jax.data import loader as loader_lib
from apo_jax.data import shards
from apo_jax.layouts import auto

log = logging.getLogger("apo_jax")


DEMO_CHECKER = "apo_jax.eval.checkers:demo"  # the demo data's checker unless samples.checker


@dataclasses.dataclass(frozen=True)
class DataPaths:
    """The run's shard directories, the tokenizer directory ('' = none) and the train manifest."""

    train: str
    eval: str
    tokenizer: str
    manifest: dict[str, Any]
    sample_prompts: str = ""  # prompts file for the samples hook ('' = the eval split's source)
    sample_checker: str = ""  # module:function scoring the samples ('' = none)
    demo_root: str = ""  # the demo assets' directory ('' = not the demo data)


def resolve_data(rc: RunConfig) -> DataPaths:
    """The shard and tokenizer directories of the run; builds the embedded demo when none is given."""
    train, eval_, tokenizer = rc.data.train, rc.data.eval, rc.data.tokenizer
    prompts, checker, demo_root = rc.samples.prompts, rc.samples.checker, ""
    if rc.is_demo:
        from apo_jax.data import demo

        assets = demo.build_demo(
            rc.demo.cache_dir or None,
            n_train=rc.demo.n_train,
            n_eval=rc.demo.n_eval,
            multi_turn=rc.demo.multi_turn,
        )
        train, eval_ = assets.train_shards, eval_ or assets.eval_shards
        if losses.is_unpaired(rc.loss.name):  # the demo pairs split into unpaired records
            train, demo_eval = demo.unpaired_shards(assets, kl_group=rc.batch_size)
            eval_ = rc.data.eval or demo_eval
        tokenizer = tokenizer or assets.tokenizer_dir
        prompts = prompts or assets.eval_pairs
        checker = checker or DEMO_CHECKER
        demo_root = assets.root
    manifest = shards.read_manifest(train)
    tokenizer = tokenizer or manifest.get("tokenizer", {}).get("dir", "")
    tokenizer = tokenizer if tokenizer and os.path.isdir(tokenizer) else ""
    return DataPaths(train, eval_, tokenizer, manifest, prompts, checker, demo_root)


def resolve_layout(rc: RunConfig, paths: DataPaths, model_cfg: Any = None) -> RunConfig:
    """`rc` with config.data.layout=auto replaced by the layout picked for the train shards.

    The choice (:func:`apo_jax.layouts.auto.choose`) and why are logged in one line; a run with a
    named layout is returned unchanged.
    """
    if rc.data.layout is not None:
        return rc
    choice = auto.choose(
        paths.manifest,
        seq_len=rc.data.seq_len,
        buckets=rc.data.buckets,
        batch_size=rc.batch_size,
        grad_accum=rc.grad_accum,
        data_ways=rc.mesh.batch_ways,
        process_count=jax.process_count(),
        model_cfg=model_cfg,
    )
    log.info("config.data.layout=auto chose %s: %s", choice.name, choice.reason)
    data = dataclasses.replace(rc.data, layout=layouts.get(choice.name))
    return dataclasses.replace(rc, data=data)


def make_loader(
    rc: RunConfig,
    shard_dir: str,
    reference_info: dict[str, Any] | None,
    *,
    train: bool,
    reference_workdir: str = "",
) -> loader_lib.PairLoader:
    """This process's loader of `shard_dir`: the training stream, or one pass for evaluation."""
    # Packed rows of all processes must split evenly over the mesh's data*fsdp batch shards.
    ways, procs = rc.mesh.batch_ways, jax.process_count()
    epochs = rc.data.num_epochs if train else 1
    if train and rc.num_steps:
        epochs = None  # repeat until num_steps
    cfg = loader_lib.LoaderConfig(
        batch_size=rc.batch_size // procs,
        seq_len=rc.data.seq_len,
        buckets=rc.data.buckets,
        layout=rc.data.layout,
        row_multiple=ways // math.gcd(ways, procs),
        micro_batches=rc.grad_accum if train else 1,
        seed=rc.seed,
        shuffle=rc.data.shuffle if train else False,
        num_epochs=epochs,
        drop_remainder=train,
        worker_count=rc.data.worker_count if train else 0,
        reference_info=reference_info,
        reference_workdir=reference_workdir,
    )
    kind = shards.record_kind(shards.read_manifest(shard_dir))
    if (kind == "unpaired") != (rc.data.layout.name == "unpaired"):
        raise ConfigError(
            f"{shard_dir} holds {kind} records but loss {rc.loss.name!r} trains on "
            f"{'unpaired examples' if kind == 'pairs' else 'pairs'}: prepare the "
            "matching data or pick a matching loss"
        )
    try:
        return loader_lib.make_loader(shard_dir, cfg)
    except ValueError as e:  # the loader's checks of seq_len, batch size and shards
        raise ConfigError(f"config.data: {e}") from None
