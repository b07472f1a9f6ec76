"""`python -m apo_jax.reference --config=...`: the reference pass alone (see apo_jax/cli.py)."""

from apo_jax import cli

if __name__ == "__main__":
    cli.reference_main()
