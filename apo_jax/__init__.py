"""apo_jax: align language models with preference pairs (APO, DPO and relatives) in JAX/Flax."""

__version__ = "0.1.0"
