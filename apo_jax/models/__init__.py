"""Flax NNX Llama-3: config and presets, the model, HF safetensors in/out, sampling."""

from apo_jax.models.config import (
    PRESETS,
    ConfigError,
    Llama3RopeScaling,
    LlamaConfig,
    get_preset,
)
from apo_jax.models.llama import Llama

__all__ = [
    "PRESETS",
    "ConfigError",
    "Llama",
    "Llama3RopeScaling",
    "LlamaConfig",
    "get_preset",
]
