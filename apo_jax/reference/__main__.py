"""`python -m apo_jax.reference --config=...`: the reference pass alone (see apo_jax/train/cli.py)."""

from apo_jax.train import cli

if __name__ == "__main__":
    cli.reference_main()
