"""``python -m apo_jax.clair KIND --flag_name=value ...``: see :mod:`apo_jax.clair.cli`."""

import sys

from apo_jax.clair import cli

sys.exit(cli.main())
