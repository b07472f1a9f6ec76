"""LoRA: low-rank adapters on a frozen base, as PEFT defines them, and their PEFT files.

A targeted `Linear` computes ``x @ W + scale * dropout(x) @ A @ B`` with ``A [in, r]`` drawn as
PEFT draws it (kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))), ``B [r, out]``
zero, and ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). The adapters are variables of
their own type (`layers.LoraParam`), so ``nnx.split(model, LoraParam, ...)`` separates the trainable
adapters from the frozen base; with scanned layers they are stacked on the same leading L axis as
the kernels, and they carry logical axes (the kernel's, plus 'lora_rank') for `apo_jax.sharding`.

The base without adapters is the reference: the same parameter arrays under the graph taken
before `attach`, so an online reference costs no second copy of the weights.

PEFT's adapter directory (`adapter_config.json` + `adapter_model.safetensors`) holds
``base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_A.weight [r, in]`` and
``...lora_B.weight [out, r]``, the transposes of our matrices; `save_peft` writes it and
`load_peft` reads it back (to continue training, to evaluate, to generate).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apo_jax import atomic, sharding
from apo_jax.errors import UserError
from apo_jax.models import hf
from apo_jax.models.layers import Linear, LoraKey, LoraParam
from apo_jax.models.safetensors_io import SafetensorsFile, write_safetensors

# Short names accepted in `lora.targets` -> the Hugging Face module names.
TARGETS = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}
_PARENT = {n: "self_attn" for n in ("q_proj", "k_proj", "v_proj", "o_proj")} | {
    n: "mlp" for n in ("gate_proj", "up_proj", "down_proj")
}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_NAME = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$"
)


def _field(default, help: str):
    """A field of the config tree (`apo_jax.config.fields.field`: default and one-line help),
    written here because this module is imported before the config package."""
    return dataclasses.field(default=default, metadata={"help": help})


class LoraError(UserError, ValueError):
    """A LoRA setting or adapter directory that cannot work; the message says why."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The fields of the config's `lora` block (rank 0 = LoRA off)."""

    rank: int = _field(0, "adapter rank r; 0 = off (every parameter trains)")
    alpha: float = _field(16.0, "scale = alpha / r (alpha / sqrt(r) with rslora)")
    dropout: float = _field(0.0, "dropout on the adapters' input during training steps, in [0, 1)")
    targets: str = _field(
        "q,k,v,o,gate,up,down",
        "adapted linears, comma-separated short or HF names (q, k, v, o, gate, up, down)",
    )
    rslora: bool = _field(False, "rank-stabilized scaling alpha / sqrt(r)")
    adapter: str = _field(
        "", "PEFT adapter dir to continue from (its r, alpha, dropout and targets are used)"
    )

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 0:
            raise LoraError(f"lora.rank must be an int >= 0 (0 = off), got {self.rank!r}")
        if self.alpha <= 0:
            raise LoraError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise LoraError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        self.modules  # noqa: B018 - validates the targets

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def modules(self) -> tuple[str, ...]:
        """The targeted Hugging Face module names, e.g. ('q_proj', 'v_proj')."""
        names = [t.strip() for t in str(self.targets).replace(" ", ",").split(",") if t.strip()]
        out = []
        for t in names:
            name = TARGETS.get(t, t)
            if name not in _PARENT:
                raise LoraError(
                    f"lora.targets: unknown module {t!r}; choose from {', '.join(TARGETS)}"
                )
            if name not in out:
                out.append(name)
        if not out:
            raise LoraError("lora.targets names no module; e.g. q,k,v,o,gate,up,down")
        return tuple(sorted(out, key=list(_PARENT).index))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def targeted(model: nnx.Module, modules: tuple[str, ...]) -> list[tuple[tuple, Linear]]:
    """(path, Linear) of every targeted linear of `model`, in a fixed order."""
    found = [
        (tuple(path), mod)
        for path, mod in nnx.iter_modules(model)
        if isinstance(mod, Linear) and path and path[-1] in modules
    ]
    return sorted(found, key=lambda pm: tuple(map(str, pm[0])))


def attach(model: nnx.Module, cfg: LoraConfig, *, seed: int, mesh: Any = None) -> nnx.Module:
    """Adds adapters (A random, B zero) to the targeted linears of `model`, in place.

    Args:
      model: a Llama (scanned or unrolled; concrete or inside `nnx.eval_shape`).
      cfg: the LoRA settings (rank > 0).
      seed: seeds A's draw.
      mesh: place the adapters on this mesh per the sharding rules (None: leave them).

    Returns:
      The same model. The adapters are float32 whatever the base's dtype.
    """
    key = jax.random.key(seed)
    for i, (_, lin) in enumerate(targeted(model, cfg.modules)):
        kernel = lin.kernel
        *lead, d_in, d_out = kernel.shape
        axes = tuple(kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim)
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(
            jax.random.fold_in(key, i), (*lead, d_in, cfg.rank), jnp.float32, -bound, bound
        )
        lin.lora_a = LoraParam(a, out_sharding=(*axes[:-1], "lora_rank"), eager_sharding=False)
        b = jnp.zeros((*lead, cfg.rank, d_out), jnp.float32)
        lin.lora_b = LoraParam(
            b, out_sharding=(*axes[:-2], "lora_rank", axes[-1]), eager_sharding=False
        )
        lin.lora_scale = cfg.scale
        if cfg.dropout:
            bits = jnp.zeros((*lead, 3), jnp.uint32)
            lin.lora_key = LoraKey(bits, out_sharding=(*axes[:-2], None), eager_sharding=False)
            lin.lora_dropout = cfg.dropout
    if mesh is not None:
        state = nnx.state(model, (LoraParam, LoraKey))
        nnx.update(model, jax.device_put(state, sharding.param_shardings(state, mesh)))
    return model


def split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, adapters, frozen): the adapters alone, and every other variable."""
    return nnx.split(model, LoraParam, ...)


def base_state(frozen: nnx.State) -> nnx.State:
    """The frozen state without the dropout keys: the base model's parameters."""
    return nnx.split_state(frozen, LoraKey, ...)[1]


def fill_dropout_keys(frozen: nnx.State, key: jax.Array) -> nnx.State:
    """`frozen` with each `LoraKey` a fresh key (one per layer) and its flag on."""
    leaves, treedef = jax.tree.flatten(frozen, is_leaf=lambda x: isinstance(x, nnx.Variable))
    out = []
    for i, var in enumerate(leaves):
        if isinstance(var, LoraKey):
            lead = var.shape[:-1]
            keys = jax.random.split(jax.random.fold_in(key, i), math.prod(lead))
            bits = jax.random.key_data(keys).reshape(*lead, 2).astype(jnp.uint32)
            var = var.replace(jnp.concatenate([bits, jnp.ones((*lead, 1), jnp.uint32)], -1))
        out.append(var)
    return jax.tree.unflatten(treedef, out)


def _pairs(adapters: nnx.State) -> dict[tuple, tuple[Any, Any]]:
    """Linear path -> (lora_a, lora_b) arrays."""
    flat = dict(nnx.to_flat_state(adapters))
    return {
        p[:-1]: (flat[p].get_value(), flat[(*p[:-1], "lora_b")].get_value())
        for p in flat
        if p[-1] == "lora_a"
    }


def merged_base(base: nnx.State, adapters: nnx.State, cfg: LoraConfig) -> nnx.State:
    """The base parameters with each adapted kernel replaced by W + scale * A @ B."""
    flat = dict(nnx.to_flat_state(base))
    for path, (a, b) in _pairs(adapters).items():
        var = flat[(*path, "kernel")]
        w = var.get_value()
        delta = jnp.einsum("...ir,...ro->...io", jnp.asarray(a, jnp.float32), jnp.asarray(b))
        flat[(*path, "kernel")] = var.replace(
            (jnp.asarray(w, jnp.float32) + cfg.scale * delta).astype(w.dtype)
        )
    return nnx.from_flat_state(flat)


def _layer_entries(path: tuple, arr: np.ndarray, n_layers: int):
    """(layer index, per-layer matrix) of a scanned [L, ...] or unrolled adapter."""
    if isinstance(path[1], int):  # unrolled: ('layers', i, 'self_attn', 'q_proj')
        yield path[1], arr
    else:
        for layer in range(n_layers):
            yield layer, arr[layer]


def save_peft(
    adapters: nnx.State,
    cfg: LoraConfig,
    n_layers: int,
    out_dir: str,
    *,
    base_path: str = "",
    tokenizer_dir: str | None = None,
) -> None:
    """Writes a PEFT adapter directory that `peft.PeftModel.from_pretrained(base, out_dir)` loads.

    Args:
      adapters: the adapter state (host or device arrays).
      cfg: the LoRA settings they were made with.
      n_layers: the model's layer count (scanned adapters hold all layers on one axis).
      out_dir: the directory (created).
      base_path: the base model's directory, recorded as `base_model_name_or_path`.
      tokenizer_dir: copy the tokenizer files found there.
    """
    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    for path, (a, b) in _pairs(adapters).items():
        name = path[-1]
        for (layer, a_l), (_, b_l) in zip(
            _layer_entries(path, np.asarray(jax.device_get(a)), n_layers),
            _layer_entries(path, np.asarray(jax.device_get(b)), n_layers),
            strict=True,
        ):
            prefix = f"base_model.model.model.layers.{layer}.{_PARENT[name]}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a_l.T, np.float32)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b_l.T, np.float32)
    atomic.write_file(
        os.path.join(out_dir, ADAPTER_WEIGHTS),  # a full disk keeps the old file
        lambda tmp: write_safetensors(tmp, dict(sorted(tensors.items()))),
    )
    peft_cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": os.path.abspath(base_path) if base_path else None,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "target_modules": list(cfg.modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
    }
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(peft_cfg, f, indent=2)
    if tokenizer_dir:
        for fn in hf.TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, fn)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(out_dir, fn))


def is_adapter_dir(path: str) -> bool:
    return bool(path) and os.path.exists(os.path.join(path, ADAPTER_CONFIG))


def read_adapter_config(path: str) -> tuple[LoraConfig, str]:
    """(LoraConfig, base model directory) of a PEFT adapter directory."""
    with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as f:
        c = json.load(f)
    if c.get("peft_type", "LORA") != "LORA" or c.get("use_dora") or c.get("modules_to_save"):
        raise LoraError(f"{path}: only plain LoRA adapters are read (no DoRA, no modules_to_save)")
    if c.get("rank_pattern") or c.get("alpha_pattern") or c.get("bias", "none") != "none":
        raise LoraError(f"{path}: per-module ranks, alphas and biases are not supported")
    targets = c.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    cfg = LoraConfig(
        rank=int(c["r"]),
        alpha=float(c["lora_alpha"]),
        dropout=float(c.get("lora_dropout") or 0.0),
        targets=",".join(targets),
        rslora=bool(c.get("use_rslora")),
        adapter=path,
    )
    return cfg, c.get("base_model_name_or_path") or ""


def load_peft(model: nnx.Module, path: str, cfg: LoraConfig) -> nnx.Module:
    """Sets the adapters of `model` (attached with `cfg`) from the PEFT directory `path`."""
    st = SafetensorsFile(os.path.join(path, ADAPTER_WEIGHTS))
    by_name: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name in st.keys():
        m = _PEFT_NAME.match(name.replace(".default.", "."))
        if m is None:
            raise LoraError(f"{path}: tensor {name!r} is not a LoRA A/B matrix of a decoder layer")
        layer, _, module, ab = m.groups()
        by_name.setdefault((module, ab), {})[int(layer)] = np.asarray(st.get(name)).T
    for path_, lin in targeted(model, cfg.modules):
        module = path_[-1]
        for ab, var in (("A", lin.lora_a), ("B", lin.lora_b)):
            per_layer = by_name.get((module, ab), {})
            if isinstance(path_[1], int):
                arr = per_layer.get(path_[1])
            else:
                arr = np.stack([per_layer[i] for i in sorted(per_layer)]) if per_layer else None
            if arr is None or arr.shape != var.shape:
                got = None if arr is None else arr.shape
                raise LoraError(
                    f"{path}: {module}.lora_{ab} has shape {got}, the model needs {var.shape}"
                )
            target = getattr(var.get_value(), "sharding", None)
            value = jnp.asarray(arr, jnp.float32)
            var.set_value(jax.device_put(value, target) if target is not None else value)
    return model


def load_merged(path: str, *, mesh: Any = None, **kwargs: Any) -> tuple[nnx.Module, Any]:
    """A Hugging Face directory or a PEFT adapter directory as one model (adapters merged in).

    Args:
      path: a checkpoint directory (config.json) or an adapter directory whose
        `base_model_name_or_path` is a local checkpoint directory.
      mesh, **kwargs: as `hf.load_hf`.

    Returns:
      (model, cfg) with plain kernels, ready to evaluate or generate.
    """
    if not is_adapter_dir(path):
        return hf.load_hf(path, mesh=mesh, **kwargs)
    cfg, base = read_adapter_config(path)
    if not base or not os.path.isdir(base):
        raise LoraError(f"{path}: its base model {base!r} is not a local directory")
    model, model_cfg = hf.load_hf(base, mesh=mesh, **kwargs)
    graphdef, base_params = nnx.split(model)
    attach(model, cfg, seed=0, mesh=mesh)
    load_peft(model, path, cfg)
    _, adapters, _ = split(model)
    return nnx.merge(graphdef, merged_base(base_params, adapters, cfg)), model_cfg


def config_dir(path: str, name: str = "config.json") -> str:
    """The directory holding `name` (config.json, tokenizer.json, ...) for `path`: the path itself,
    or, for an adapter directory without it and without a config.json, the adapter's base."""
    if os.path.exists(os.path.join(path, name)):
        return path
    if is_adapter_dir(path) and not os.path.exists(os.path.join(path, "config.json")):
        return read_adapter_config(path)[1]
    return path
