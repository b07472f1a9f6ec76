"""The built-in run configs, one file per objective (`--config=<name>[:preset]`).

This directory is the one copy: a wheel ships it as the package `apo_jax.configs` (setup.py maps
that package here), and `apo_jax.config.files` finds it in a checkout or an installed wheel.
"""
