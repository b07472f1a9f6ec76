"""Model families: Hugging Face `config.json` in and out, and each family's tensor-name table.

Every family runs on the one decoder in `llama.py`; what differs is a handful of `LlamaConfig`
fields (docs/models.md):

| family (`model_type`) | what differs from Llama |
| --- | --- |
| `llama` | nothing |
| `qwen2` | bias on q/k/v; optional sliding layers (`use_sliding_window`) |
| `qwen3` | RMSNorm per head on q and k before RoPE; explicit head_dim; optional sliding layers |
| `mistral` | sliding-window attention in every layer (when `sliding_window` is set) |
| `gemma3` (`gemma3_text`) | (1 + w) RMSNorm, sqrt(D)-scaled embeddings, GeGLU, sandwich norms, q/k norm, `query_pre_attn_scalar`, sliding and global layers with their own RoPE |

`config_from_hf` dispatches on `model_type` (Llama included: this is the one family table);
`to_hf` writes a dict that `transformers.AutoConfig` (transformers 4 and 5) reads back to the
same model; `layer_params` lists the per-layer parameters whose names follow the family's
`*ForCausalLM`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from apo_jax.models.config import (
    ConfigError,
    LinearRopeScaling,
    Llama3RopeScaling,
    LlamaConfig,
    _gemma3_layer_types,
)

# model_type -> (family, architecture written by to_hf)
MODEL_TYPES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "gemma3_text": ("gemma3", "Gemma3ForCausalLM"),
}
_FAMILY_TYPE = {family: model_type for model_type, (family, _) in MODEL_TYPES.items()}

# The fields a family's Hugging Face class fixes; to_hf refuses a config that departs from them.
_PLAIN = dict(
    norm_offset=0.0,
    embed_scale=False,
    mlp_activation="silu",
    post_norms=False,
    rope_local_theta=None,
    query_pre_attn_scalar=None,
)
FIXED: dict[str, dict[str, Any]] = {
    "llama": dict(_PLAIN, qkv_bias=False, qk_norm=False, sliding_window=None),
    "qwen2": dict(_PLAIN, qkv_bias=True, qk_norm=False),
    "qwen3": dict(_PLAIN, qkv_bias=False, qk_norm=True),
    "mistral": dict(_PLAIN, qkv_bias=False, qk_norm=False, layer_types=None),
    "gemma3": dict(
        qkv_bias=False,
        qk_norm=True,
        norm_offset=1.0,
        embed_scale=True,
        mlp_activation="gelu_tanh",
        post_norms=True,
    ),
}

_ROPE_TYPES = ("default", "linear", "llama3")  # what `_rope` reads

_ATTN = (("q_proj", "kernel"), ("k_proj", "kernel"), ("v_proj", "kernel"), ("o_proj", "kernel"))
_MLP = (("gate_proj", "kernel"), ("up_proj", "kernel"), ("down_proj", "kernel"))


def layer_params(cfg: LlamaConfig) -> list[tuple[str, ...]]:
    """The state paths (under one layer) of every per-layer parameter, in Hugging Face order."""
    out = [("self_attn", *p) for p in _ATTN]
    if cfg.qkv_bias:
        out += [("self_attn", name, "bias") for name in ("q_proj", "k_proj", "v_proj")]
    if cfg.qk_norm:
        out += [("self_attn", "q_norm", "scale"), ("self_attn", "k_norm", "scale")]
    out += [("mlp", *p) for p in _MLP]
    norms = ["input_layernorm", "post_attention_layernorm"]
    if cfg.post_norms:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    return out + [(name, "scale") for name in norms]


def read_config_json(config: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """A parsed config.json from a dict, a file path or a checkpoint directory."""
    if isinstance(config, dict):
        return config
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def config_from_hf(config: dict[str, Any] | str | os.PathLike, **overrides: Any) -> LlamaConfig:
    """Builds the config of any supported family from a Hugging Face `config.json`.

    Args:
      config: the parsed dict, a path to `config.json`, or a checkpoint directory.
      **overrides: LlamaConfig fields that replace the read values (dtype, remat, ...).

    Returns:
      The LlamaConfig. Raises ConfigError for an unsupported model_type or variant.
    """
    hf = read_config_json(config)
    model_type = hf.get("model_type")
    if model_type == "gemma3":  # multimodal: the text decoder's config is nested
        hf = {**(hf.get("text_config") or {}), "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    readers = {
        "llama": _llama,
        "qwen2": _qwen,
        "qwen3": _qwen,
        "mistral": _mistral,
        "gemma3_text": _gemma3,
    }
    if model_type not in readers:
        raise ConfigError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(MODEL_TYPES))}"
        )
    fields = readers[model_type](hf)
    fields.update(overrides)
    return LlamaConfig().replace(**fields)


def _shape(hf: dict[str, Any], head_dim: int | None, max_len: int) -> dict[str, Any]:
    n_heads = int(hf["num_attention_heads"])
    return dict(
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or head_dim or hf["hidden_size"] // n_heads),
        mlp_dim=int(hf["intermediate_size"]),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_seq_len=int(hf.get("max_position_embeddings", max_len)),
    )


def _rope(
    params: dict[str, Any], theta: float, max_len: int, supported: tuple[str, ...] = _ROPE_TYPES
) -> tuple[float, Any]:
    """(theta, rope_scaling) from one rope-parameters dict (transformers 4 or 5 keys); the one
    place a config.json's RoPE is read. `supported`: the rope types the family takes."""
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", theta))
    if kind not in supported:
        raise ConfigError(f"unsupported rope type {kind!r}; supported: {', '.join(supported)}")
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, LinearRopeScaling(float(params["factor"]))
    if kind == "llama3":
        return theta, Llama3RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings", max_len)
            ),
        )
    raise AssertionError(kind)  # every supported type is handled above


def _flat_rope(
    hf: dict[str, Any], max_len: int, supported: tuple[str, ...] = _ROPE_TYPES
) -> tuple[float, Any]:
    """RoPE of a family with one rope for every layer: transformers 4's `rope_theta` +
    `rope_scaling` or transformers 5's `rope_parameters` (which wins)."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    return _rope(params, hf.get("rope_theta", 10_000.0), max_len, supported)


def _check_act(hf: dict[str, Any], key: str, want: str) -> None:
    if hf.get(key, want) != want:
        raise ConfigError(f"unsupported {key} {hf[key]!r}; {hf.get('model_type')} uses {want!r}")


def _sliding(hf: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """Qwen2/Qwen3: sliding layers only with use_sliding_window, from max_window_layers on."""
    window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
    if window is None:  # transformers drops the window, whatever layer_types says
        return dict(sliding_window=None, layer_types=None)
    start = int(hf.get("max_window_layers", 28))
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= start else "full_attention" for i in range(n_layers)
    ]
    if "sliding_attention" not in types:
        return dict(sliding_window=None, layer_types=None)
    return dict(sliding_window=int(window), layer_types=tuple(types))


def _llama(hf: dict[str, Any]) -> dict[str, Any]:
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConfigError(f"unsupported Llama variant: {key}=true")
    _check_act(hf, "hidden_act", "silu")
    fields = _shape(hf, None, 2048)
    theta, scaling = _flat_rope(hf, fields["max_seq_len"], supported=("default", "llama3"))
    fields.update(
        family="llama",
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    return fields


def _qwen(hf: dict[str, Any]) -> dict[str, Any]:
    qwen3 = hf["model_type"] == "qwen3"
    _check_act(hf, "hidden_act", "silu")
    if qwen3 and hf.get("attention_bias"):  # would put a bias on o_proj too
        raise ConfigError("unsupported Qwen3 variant: attention_bias=true")
    fields = _shape(hf, 128 if qwen3 else None, 32768)
    theta, scaling = _flat_rope(hf, fields["max_seq_len"])
    fields.update(
        family=hf["model_type"],
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=not qwen3,
        qk_norm=qwen3,
        **_sliding(hf, fields["n_layers"]),
    )
    return fields


def _mistral(hf: dict[str, Any]) -> dict[str, Any]:
    _check_act(hf, "hidden_act", "silu")
    fields = _shape(hf, None, 131072)
    theta, scaling = _flat_rope(hf, fields["max_seq_len"])
    window = hf.get("sliding_window", 4096)  # MistralConfig's default when the key is absent
    fields.update(
        family="mistral",
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=None if window is None else int(window),
    )
    return fields


# Gemma3TextConfig's defaults: a multimodal checkpoint's text_config leaves most of them out.
_GEMMA3_DEFAULTS = dict(
    vocab_size=262_208,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    rms_norm_eps=1e-6,
    max_position_embeddings=131_072,
)

# Where a multimodal Gemma 3 checkpoint keeps the text decoder ("model." of Gemma3ForCausalLM):
# the Hub's transformers-4 files, then what transformers 5 writes. Vision tensors are skipped.
MULTIMODAL_PREFIXES = ("language_model.model.", "model.language_model.")
MULTIMODAL_SKIPPED = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
    "language_model.lm_head.",
)


def text_tensor_names(names: list[str]) -> dict[str, str] | None:
    """For a multimodal Gemma 3 checkpoint: {Gemma3ForCausalLM name: stored name}; else None."""
    for prefix in MULTIMODAL_PREFIXES:
        if prefix + "embed_tokens.weight" in names:
            out = {}
            for n in names:
                if n.startswith(prefix):
                    out["model." + n[len(prefix) :]] = n
                elif not n.startswith(MULTIMODAL_SKIPPED):
                    out[n] = n
            return out
    return None


def _gemma3(hf: dict[str, Any]) -> dict[str, Any]:
    hf = {**_GEMMA3_DEFAULTS, **hf}
    _check_act(hf, "hidden_activation", "gelu_pytorch_tanh")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key) is not None:
            raise ConfigError(f"unsupported Gemma 3 variant: {key}={hf[key]}")
    for key in ("use_bidirectional_attention", "attention_bias"):
        if hf.get(key):
            raise ConfigError(f"unsupported Gemma 3 variant: {key}=true")
    fields = _shape(hf, 256, 131072)
    n = fields["n_layers"]
    period = int(hf.get("sliding_window_pattern", 6))
    types = hf.get("layer_types") or _gemma3_layer_types(n, period)
    rope = dict(hf.get("rope_parameters") or {})
    if "full_attention" not in rope:  # transformers 4: rope_theta/rope_scaling/rope_local_base_freq
        rope = {
            "full_attention": {**(hf.get("rope_scaling") or {}), **rope},
            "sliding_attention": {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)},
        }
        rope["full_attention"].setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
    theta, scaling = _rope(rope["full_attention"], 1_000_000.0, fields["max_seq_len"])
    local_theta, local_scaling = _rope(rope.get("sliding_attention") or {}, 10_000.0, 0)
    if local_scaling is not None:
        raise ConfigError("unsupported Gemma 3 variant: scaled RoPE in sliding layers")
    window = hf.get("sliding_window", 4096)
    fields.update(
        family="gemma3",
        rope_theta=theta,
        rope_scaling=scaling,
        rope_local_theta=local_theta,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        qk_norm=True,
        norm_offset=1.0,
        embed_scale=True,
        mlp_activation="gelu_tanh",
        post_norms=True,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
        sliding_window=None if window is None else int(window),
        layer_types=tuple(types) if "sliding_attention" in types else None,
    )
    return fields


def _check_fixed(cfg: LlamaConfig) -> None:
    for field, want in FIXED[cfg.family].items():
        if getattr(cfg, field) != want:
            raise ConfigError(
                f"family {cfg.family!r} has {field}={want!r}, this config has "
                f"{getattr(cfg, field)!r}: Hugging Face's class cannot hold it"
            )
    if cfg.family == "gemma3" and isinstance(cfg.rope_scaling, Llama3RopeScaling):
        raise ConfigError("family 'gemma3' cannot hold llama3 rope scaling")


def _rope_dict(theta: float, scaling: Any) -> dict[str, Any]:
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    if isinstance(scaling, LinearRopeScaling):
        return {"rope_type": "linear", "rope_theta": theta, "factor": scaling.factor}
    return {"rope_type": "llama3", "rope_theta": theta, **scaling.__dict__}


# The key order of a Llama config.json as exports have always written it, so a re-export is the
# same bytes (reference fingerprints hash config.json).
_LLAMA_KEYS = tuple(
    "architectures model_type vocab_size hidden_size intermediate_size num_hidden_layers "
    "num_attention_heads num_key_value_heads head_dim hidden_act max_position_embeddings "
    "rms_norm_eps rope_parameters tie_word_embeddings attention_bias mlp_bias torch_dtype "
    "dtype".split()
)


def _scalar(cfg: LlamaConfig) -> int | float:
    value = cfg.query_pre_attn_scalar or cfg.head_dim
    return int(value) if float(value).is_integer() else float(value)  # transformers wants an int


def to_hf(cfg: LlamaConfig) -> dict[str, Any]:
    """Returns the family's Hugging Face `config.json` dict (what `AutoConfig` reads back).

    Raises ConfigError when a field departs from what the family's class can hold.
    """
    _check_fixed(cfg)  # a llama with biases or q/k norms would be written as plain llama
    model_type = _FAMILY_TYPE[cfg.family]
    out: dict[str, Any] = {
        "architectures": [MODEL_TYPES[model_type][1]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": cfg.param_dtype,  # transformers 4 name
        "dtype": cfg.param_dtype,  # transformers 5 name
    }
    rope = _rope_dict(cfg.rope_theta, cfg.rope_scaling)
    types = list(cfg.layer_types or ["full_attention"] * cfg.n_layers)
    if cfg.family == "gemma3":
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
        out.update(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=_scalar(cfg),
            sliding_window=cfg.sliding_window,
            layer_types=types,
            attention_bias=False,
            rope_parameters={"full_attention": rope, "sliding_attention": local},
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
        )
        return out
    out.update(hidden_act="silu", rope_parameters=rope)
    if cfg.family == "llama":
        out.update(attention_bias=False, mlp_bias=False)
        return {key: out[key] for key in _LLAMA_KEYS}
    if cfg.family == "mistral":
        out["sliding_window"] = cfg.sliding_window
        return out
    sliding = cfg.sliding_window is not None and any(cfg.sliding_layers)
    out.update(
        use_sliding_window=sliding,
        sliding_window=cfg.sliding_window,
        layer_types=list(types if cfg.layer_types else ["sliding_attention"] * cfg.n_layers)
        if sliding
        else ["full_attention"] * cfg.n_layers,
        max_window_layers=cfg.n_layers,
    )
    if cfg.family == "qwen3":
        out["attention_bias"] = False
    return out
