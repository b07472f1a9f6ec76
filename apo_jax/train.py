"""`python -m apo_jax.train --config=configs/apo_down.py[:preset] [--workdir=DIR] [--config.x=v]`.

The command line is `apo_jax.cli`; the run itself is `apo_jax.trainer.train_and_evaluate`.
"""

from apo_jax import cli

if __name__ == "__main__":
    cli.train_main()
