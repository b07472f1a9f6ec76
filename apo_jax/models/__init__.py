"""Flax NNX decoder (Llama-3, Qwen2/3, Mistral, Gemma 3): config and presets, the model, HF
safetensors in/out, sampling."""

from apo_jax.models.config import (
    PRESETS,
    ConfigError,
    LinearRopeScaling,
    Llama3RopeScaling,
    LlamaConfig,
    get_preset,
)
from apo_jax.models.llama import Llama

__all__ = [
    "PRESETS",
    "ConfigError",
    "LinearRopeScaling",
    "Llama",
    "Llama3RopeScaling",
    "LlamaConfig",
    "get_preset",
]
