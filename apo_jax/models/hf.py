"""Hugging Face checkpoints (config.json + safetensors) of every family in and out.

`load_hf` dispatches on `config.json`'s `model_type` (`families.config_from_hf`); the tensor
names follow the family's `*ForCausalLM` (`families.layer_params`).

Loading reads one tensor at a time from memory-mapped safetensors and places it straight onto its
sharding (`jax.make_array_from_callback`, so each device reads only its own slice), transposing
HF `[out, in]` linear weights to our `[in, out]` kernels and stacking per-layer tensors into the
scanned `[L, ...]` layout. Only safetensors are read; pickle checkpoints are refused.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx

from apo_jax import atomic, sharding
from apo_jax.errors import UserError
from apo_jax.models import families
from apo_jax.models.config import ConfigError, LlamaConfig
from apo_jax.models.llama import Llama
from apo_jax.models.safetensors_io import SafetensorsFile, write_safetensors

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older exports carry
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read into (or written from) this model; the message says why."""


def _hf_name(path: tuple[Any, ...], layer: int | None) -> str:
    """Our state path (without the layer index) -> HF tensor name."""
    if path[0] == "layers":
        leaf = "bias" if path[-1] == "bias" else "weight"
        return f"model.layers.{layer}." + ".".join(path[1:-1]) + "." + leaf
    if path[0] == "lm_head":
        return "lm_head.weight"
    return f"model.{path[0]}.weight"


def hf_layout(cfg: LlamaConfig) -> Iterator[tuple[tuple[Any, ...], int | None, str, bool]]:
    """Yields (state path, layer index or None, HF name, transpose?) for every HF tensor, in order.

    Args:
      cfg: the model config (decides tied/untied and scanned/unrolled paths).

    Returns:
      An iterator; for scanned models the layer index selects a slice of the stacked parameter.
    """
    yield ("embed_tokens", "embedding"), None, "model.embed_tokens.weight", False
    for layer in range(cfg.n_layers):
        for sub in families.layer_params(cfg):
            path = ("layers", *sub) if cfg.scan_layers else ("layers", layer, *sub)
            yield (
                path,
                layer if cfg.scan_layers else None,
                _hf_name(("layers", *sub), layer),
                (sub[-1] == "kernel"),
            )
    yield ("norm", "scale"), None, "model.norm.weight", False
    if not cfg.tie_embeddings:
        yield ("lm_head", "kernel"), None, "lm_head.weight", True


def _open_tensors(path: str) -> dict[str, SafetensorsFile]:
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = {
            fn: SafetensorsFile(os.path.join(path, fn)) for fn in sorted(set(weight_map.values()))
        }
        return {name: files[fn] for name, fn in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        found = sorted(os.listdir(path))
        raise CheckpointError(
            f"{path}: no model.safetensors or model.safetensors.index.json (found {found}); "
            "only safetensors are read, never pickle"
        )
    st = SafetensorsFile(single)
    return {name: st for name in st.keys()}


def _check(cfg: LlamaConfig, tensors: dict[str, SafetensorsFile], shapes: dict, path: str) -> None:
    expected = {}
    for p, layer, name, transpose in hf_layout(cfg):
        shape = shapes[p][1:] if layer is not None else shapes[p]
        expected[name] = tuple(reversed(shape)) if transpose else tuple(shape)
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{path}: missing tensor {name!r}")
        got = tensors[name].shape(name)
        if got != shape:
            raise CheckpointError(
                f"{path}: shape mismatch for {name!r}: expected {shape}, got {got}"
            )
    for name in tensors:
        ignorable = name.endswith(_IGNORED_SUFFIXES) or (
            cfg.tie_embeddings and name == "lm_head.weight"
        )
        if name not in expected and not ignorable:
            raise CheckpointError(f"{path}: unexpected extra tensor {name!r}")


def load_hf(
    path: str | os.PathLike,
    *,
    mesh: jax.sharding.Mesh | None = None,
    param_dtype: str | None = None,
    dtype: str | None = None,
    **overrides: Any,
) -> tuple[Llama, LlamaConfig]:
    """Loads a Hugging Face checkpoint directory of any family in `families.MODEL_TYPES`.

    Args:
      path: directory with config.json and model.safetensors (or shards + index).
      mesh: place each parameter on this mesh per `apo_jax.sharding` rules (default: device 0).
      param_dtype: dtype of the loaded weights (default 'float32').
      dtype: compute dtype (default 'float32').
      **overrides: other LlamaConfig fields (remat, scan_layers, max_seq_len, ...).

    Returns:
      (model, cfg). Raises CheckpointError naming the problem when the checkpoint does not fit.
    """
    path = os.fspath(path)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path}: no config.json")
    for key, value in (("param_dtype", param_dtype), ("dtype", dtype)):
        if value is not None:
            overrides[key] = value
    try:
        cfg = families.config_from_hf(path, **overrides)
    except (ConfigError, KeyError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    tensors = _open_tensors(path)
    renamed = families.text_tensor_names(list(tensors))
    if renamed is not None:  # a multimodal Gemma 3: read its text decoder only
        tensors = {ours: _Renamed(tensors[stored], stored) for ours, stored in renamed.items()}
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    _check(cfg, tensors, {p: v.shape for p, v in flat.items()}, path)
    if mesh is not None:
        shardings = dict(nnx.to_flat_state(sharding.param_shardings(state, mesh)))
    by_path: dict[tuple, list[tuple[str, bool]]] = {}
    for p, _, name, transpose in hf_layout(cfg):
        by_path.setdefault(p, []).append((name, transpose))
    device0 = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for p, var in flat.items():
        target = shardings[p].get_value() if mesh is not None else device0
        stacked = p[0] == "layers" and cfg.scan_layers
        var.set_value(_read(tensors, by_path[p], var.shape, var.dtype, target, stacked))
    return nnx.merge(graphdef, state), cfg


class _Renamed:
    """A tensor of a safetensors file read under another name."""

    def __init__(self, st: SafetensorsFile, name: str):
        self.st, self.name = st, name

    def get(self, _: str) -> np.ndarray:
        return self.st.get(self.name)

    def shape(self, _: str) -> tuple[int, ...]:
        return self.st.shape(self.name)


def _read(tensors, entries, shape, dtype, target, stacked: bool) -> jax.Array:
    def hf_tensor(name: str, transpose: bool) -> np.ndarray:
        arr = tensors[name].get(name)
        return arr.T if transpose else arr

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        if stacked:
            layers = range(shape[0])[index[0]]
            parts = [np.asarray(hf_tensor(*entries[i])[index[1:]]) for i in layers]
            return np.stack(parts).astype(dtype)
        return np.asarray(hf_tensor(*entries[0])[index]).astype(dtype)

    return jax.make_array_from_callback(tuple(shape), target, shard)


def check_finite(arr: np.ndarray, name: str, out_dir: str) -> None:
    """Refuses to export a tensor holding NaN or infinity (a diverged run, or a dtype overflow)."""
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise CheckpointError(
            f"{out_dir}: refusing to export non-finite weights ({name}: {bad} of {arr.size} "
            f"values are NaN or infinite, in {arr.dtype}); the previous export, if any, is kept"
        )


def save_hf(
    model: Llama,
    cfg: LlamaConfig,
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_size: int = 4 * 1024**3,
    dtype: str | None = None,
) -> list[str]:
    """Writes a checkpoint that `transformers.AutoModelForCausalLM` loads (the family's class).

    Args:
      model: the model (any sharding; tensors are gathered one layer slice at a time).
      cfg: its config.
      out_dir: output directory (created).
      tokenizer_dir: copy the tokenizer files found there (`TOKENIZER_FILES`).
      max_shard_size: bytes per safetensors shard before starting a new one.
      dtype: dtype of the written tensors (default cfg.param_dtype), e.g. 'bfloat16'.

    Returns:
      The written weight file names.
    """
    out_dir = os.fspath(out_dir)
    try:
        hf_cfg = families.to_hf(cfg)  # before any file: a config the family cannot hold fails
    except ConfigError as e:
        raise CheckpointError(f"{out_dir}: {e}") from None
    os.makedirs(out_dir, exist_ok=True)
    np_dtype = np.dtype(jax.numpy.dtype(dtype or cfg.param_dtype))
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    layout = list(hf_layout(cfg))
    shards: list[list] = [[]]
    size = 0
    for entry in layout:
        var = flat[entry[0]]
        nbytes = (
            int(np.prod(var.shape[1:] if entry[1] is not None else var.shape)) * np_dtype.itemsize
        )
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    n = len(shards)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    weight_map, total = {}, 0
    # Every file is written under a temporary name and renamed when all are written: a full
    # disk leaves the previous export as it was (atomic.WriteError, one line naming the file).
    with atomic.Staged(out_dir) as staged:
        for fname, entries in zip(names, shards, strict=True):
            tensors = {}
            for p, layer, name, transpose in entries:
                value = flat[p].get_value()
                arr = np.asarray(jax.device_get(value[layer] if layer is not None else value))
                tensors[name] = (arr.T if transpose else arr).astype(np_dtype)
                check_finite(tensors[name], name, out_dir)
                weight_map[name] = fname
                total += tensors[name].nbytes
            write_safetensors(staged.path(fname), tensors)
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            with open(staged.path("model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
        hf_cfg["torch_dtype"] = hf_cfg["dtype"] = np_dtype.name
        with open(staged.path("config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_cfg, f, indent=2)
        if tokenizer_dir is not None:
            for fn in TOKENIZER_FILES:
                src = os.path.join(os.fspath(tokenizer_dir), fn)
                if os.path.exists(src):
                    shutil.copy(src, staged.path(fn))
    return names
