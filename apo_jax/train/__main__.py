"""`python -m apo_jax.train --config=configs/apo_down.py[:preset] [--workdir=DIR] [--config.x=v]`."""

from apo_jax.train import cli

if __name__ == "__main__":
    cli.train_main()
