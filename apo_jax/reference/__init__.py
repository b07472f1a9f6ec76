"""The reference pass: the frozen reference model's log-probs, computed once, stored beside the shards.

Training then holds one model instead of two. The stored file is keyed by record index and by a
fingerprint of everything that changes the log-probs -- the reference weights, tokenizer, row
length, the shards' truncation settings, dtype and log-prob chunk (plus the shard contents, which
`data.refs` adds) -- so runs with other references keep their own files side by side and a loader
refuses log-probs that belong to another model or other shards. When a shard directory is
read-only, the file goes to `<workdir>/reference_logps/` instead.

  python -m apo_jax.reference --config=configs/apo_down.py:llama3_8b --config.model.hf_path=... \
      --config.data.train=...

`prepare` decides, from the run's reference mode, what the train step gets: nothing, the frozen
parameters (online), or the stored log-probs' fingerprint for the loader (precomputed, computing
them first when none match).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from apo_jax import layouts, sharding
from apo_jax.config import RunConfig
from apo_jax.data import loader as loader_lib
from apo_jax.data import refs, shards
from apo_jax.models.llama import Llama

log = logging.getLogger("apo_jax")


def weights_fingerprint(hf_path: str, model_desc: dict[str, Any]) -> str:
    """Identifies the reference weights without reading them.

    From a Hugging Face directory: a hash of config.json and of each safetensors file's name,
    size and first MiB. For a randomly initialized model: a hash of its description (preset and
    seed), which determines its weights.
    """
    h = hashlib.sha256()
    if hf_path:
        for name in sorted(os.listdir(hf_path)):
            if name == "config.json" or name.endswith(".safetensors"):
                path = os.path.join(hf_path, name)
                h.update(f"{name}:{os.path.getsize(path)}".encode())
                with open(path, "rb") as f:
                    h.update(f.read(1 << 20))
    else:
        h.update(json.dumps(model_desc, sort_keys=True).encode())
    return h.hexdigest()[:16]


def fingerprint_info(
    shard_dir: str, weights_fp: str, dtype: str, *, seq_len: int | None = None, chunk: int = 0
) -> dict[str, Any]:
    """What the stored log-probs depend on besides the shard contents.

    Args:
      shard_dir: the train shards (their tokenizer and truncation settings).
      weights_fp: `weights_fingerprint` of the reference.
      dtype: the reference's compute dtype.
      seq_len: the row length of the reference pass (None: the shards' max_length).
      chunk: the log-prob chunk size (it orders the sums).
    """
    manifest = shards.read_manifest(shard_dir)
    tokenizer = manifest.get("tokenizer", {})
    settings = manifest.get("settings", {})
    truncation = {k: v for k, v in settings.items() if "length" in k or "trunc" in k}
    return {
        "weights": weights_fp,
        "tokenizer": tokenizer.get("fingerprint", ""),
        "dtype": dtype,
        "seq_len": seq_len or settings.get("max_length"),
        "truncation": truncation,
        "chunk": chunk,
    }


def stored_matches(shard_dir: str, info: dict[str, Any], workdir: str = "") -> bool:
    """Whether log-probs made with `info` are stored for the shards (beside them or in the
    workdir) and cover them."""
    try:
        refs.load_reference_logps(shard_dir, info, workdir)
    except refs.ReferenceMismatchError:
        return False
    return True


def compute_and_store(
    shard_dir: str,
    graphdef: nnx.GraphDef,
    ref_params: nnx.State,
    mesh: jax.sharding.Mesh,
    info: dict[str, Any],
    *,
    batch_size: int,
    seq_len: int | None,
    chunk: int,
    out_dir: str | None = None,
) -> str:
    """Runs the reference over every record of `shard_dir` and writes the log-probs beside it.

    Args:
      shard_dir: prepared shards.
      graphdef, ref_params: the frozen reference model (params on `mesh`).
      mesh: the device mesh.
      info: `fingerprint_info(...)`, stored with the log-probs.
      batch_size: pairs per batch, all processes together.
      seq_len: row length (None: the shards' max_length).
      chunk: log-prob chunk size.
      out_dir: where to write the file (default: beside the shards).

    Returns:
      The path of the written file.
    """
    procs = jax.process_count()
    concat = layouts.get("concat")
    cfg = loader_lib.LoaderConfig(
        batch_size=batch_size // procs,
        seq_len=seq_len,
        layout=concat,
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
    )
    data = loader_lib.make_loader(shard_dir, cfg)
    fn = jax.jit(functools.partial(concat.pair_logps, graphdef, chunk=chunk))
    row_sh = sharding.batch_sharding(mesh)
    index, chosen, rejected = [], [], []
    for batch in data:
        g = data.global_batch(batch, row_sh)
        sides = fn(ref_params, g)
        got = multihost_utils.process_allgather(
            (g["index"], sides.chosen, sides.rejected), tiled=True
        )
        keep = np.asarray(got[0]) >= 0
        for out, x in zip((index, chosen, rejected), got, strict=True):
            out.append(np.asarray(x)[keep])
    path = os.path.join(out_dir or shard_dir, refs.reference_file(info))
    if jax.process_index() == 0:
        path = refs.write_reference_logps(
            shard_dir,
            np.concatenate(index),
            np.concatenate(chosen),
            np.concatenate(rejected),
            info,
            out_dir,
        )
        log.info("reference log-probs of %d records written to %s", sum(map(len, index)), path)
    multihost_utils.sync_global_devices("reference_logps_written")
    return path


@dataclasses.dataclass(frozen=True)
class Reference:
    """What the train step needs of the reference model.

    Attributes:
      mode: 'precomputed' (log-probs come with each batch), 'online' or 'none'.
      graphdef: the reference's graph (its compute dtype may differ from the policy's).
      params: the frozen reference parameters (online only, else None).
      info: the fingerprint info the stored log-probs must match (precomputed only, else None).
      workdir: the run's workdir, which keeps the log-probs of read-only shards ('' = none).
    """

    mode: str
    graphdef: nnx.GraphDef
    params: nnx.State | None
    info: dict[str, Any] | None
    workdir: str = ""


def _graphdef(dtype: str, graphdef: nnx.GraphDef, model_cfg: Any) -> nnx.GraphDef:
    """The policy's graph rebuilt with the reference's compute and parameter dtype."""
    if dtype == model_cfg.dtype and dtype == model_cfg.param_dtype:
        return graphdef
    cfg = dataclasses.replace(model_cfg, dtype=dtype, param_dtype=dtype)
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(abstract, nnx.Param, ...)[0]


def prepare(
    rc: RunConfig,
    shard_dirs: tuple[str, str],
    graphdef: nnx.GraphDef,
    params: nnx.State,
    model_cfg: Any,
    weights_fp: str,
    mesh: jax.sharding.Mesh,
    workdir: str = "",
    *,
    shared: bool = False,
) -> Reference:
    """The run's reference: frozen params (online), or stored log-probs made first if missing.

    Args:
      rc: the run config (its reference mode and dtype, batch size, seq_len, chunk).
      shard_dirs: (train, eval) shard directories; eval may be ''.
      graphdef, params: the policy at step 0, which is the reference.
      model_cfg: the policy's model config.
      weights_fp: the fingerprint of the starting weights (`weights_fingerprint`).
      mesh: the device mesh.
      workdir: where to keep the log-probs of a read-only shard directory ('' = nowhere: such a
        directory is then an error).
      shared: use `params` themselves as the reference, in the policy's dtypes (a LoRA run's
        frozen base: the reference is the policy with its adapters off, and no copy is made).

    Returns:
      The Reference the train step and the loaders use.
    """
    mode, dtype = rc.reference.mode, rc.reference.dtype
    if shared:
        dtype, ref_graphdef = model_cfg.dtype, graphdef
    else:
        ref_graphdef = _graphdef(dtype, graphdef, model_cfg)
    if mode == "none":
        return Reference(mode, ref_graphdef, None, None)
    ref_params = params
    if not shared:  # a copy in the reference dtype; no optimizer state is ever made for it
        ref_params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)
    if mode == "online":
        return Reference(mode, ref_graphdef, ref_params, None)
    info = fingerprint_info(
        shard_dirs[0], weights_fp, dtype, seq_len=rc.data.seq_len, chunk=rc.logprob_chunk
    )
    for shard_dir in filter(None, shard_dirs):
        if stored_matches(shard_dir, info, workdir):
            continue
        out_dir = None
        if not refs.writable(shard_dir):
            if not workdir:
                raise refs.ReferenceMismatchError(
                    f"{shard_dir} is read-only and holds no matching reference log-probs: "
                    "run the reference pass where it can write, or train (which keeps them in "
                    "the workdir)"
                )
            out_dir = refs.store_dir(shard_dir, workdir)
        log.info(
            "no matching reference log-probs for %s: computing them into %s first",
            shard_dir,
            out_dir or shard_dir,
        )
        compute_and_store(
            shard_dir,
            ref_graphdef,
            ref_params,
            mesh,
            info,
            batch_size=rc.batch_size,
            seq_len=rc.data.seq_len,
            chunk=rc.logprob_chunk,
            out_dir=out_dir,
        )
    return Reference(
        mode, ref_graphdef, None, info, workdir
    )  # read from the data: one model in memory
