"""Training: `train_and_evaluate(config, workdir)` runs one experiment top to bottom.

`python -m apo_jax.train` is the command line (`apo_jax.train.cli`); `loop` is the run;
docs/architecture.md lists the package's modules.
"""

from apo_jax.train.loop import precompute_reference, train_and_evaluate

__all__ = ["precompute_reference", "train_and_evaluate"]
