"""apo_jax: align language models with preference pairs (APO, DPO and relatives) in JAX/Flax."""

import os

# apo_jax uses transformers for tokenizers only; without torch installed, transformers would print
# an advisory about missing models at import. An explicit TRANSFORMERS_VERBOSITY still wins.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

__version__ = "0.1.0"
