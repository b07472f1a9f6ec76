"""What `--config=` names: a built-in config by name, or a config file by path.

The built-in configs are the repository's top-level `configs/` directory, the one readable copy.
A wheel ships it as the package `apo_jax.configs` (setup.py maps that package to `configs/`), and a
source checkout finds it beside the `apo_jax` package, so every form works from any directory:

- `apo_zero` or `apo_zero:llama3_8b`: a built-in config (and its preset);
- `configs/apo_zero.py[:preset]`: a file when one exists at that path, else the built-in of that
  name (the README's commands, run from another directory or after `pip install .`);
- `/abs/path/my_run.py[:preset]` or any other existing file: that file.
"""

from __future__ import annotations

import importlib.util
import os

import apo_jax
from apo_jax.errors import UserError


class ConfigFileError(UserError):
    """`--config=` names neither an existing file nor a built-in config."""


def builtin_dir() -> str:
    """The directory of the built-in configs ('' when neither a checkout nor the package has it).

    A source checkout (the `apo_jax` package beside setup.py) reads its own `configs/`, whatever
    else is installed; an installed wheel reads the package `apo_jax.configs`.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(apo_jax.__file__)))
    if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(
        os.path.join(root, "configs")
    ):
        return os.path.join(root, "configs")
    try:
        spec = importlib.util.find_spec("apo_jax.configs")
    except ImportError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    return ""


def builtin_names() -> list[str]:
    """The built-in config names, sorted (`apo_down`, `apo_zero`, ...)."""
    here = builtin_dir()
    if not here:
        return []
    return sorted(n[:-3] for n in os.listdir(here) if n.endswith(".py") and n[0] not in "_.")


def resolve(value: str) -> str:
    """The `path.py[:preset]` that `value` (a `--config=` value) names.

    Raises:
      ConfigFileError: no such file and no built-in config of that name; the message lists them.
    """
    path, sep, preset = value.partition(":")
    if os.path.isfile(path):
        return value
    name = os.path.basename(path).removesuffix(".py")
    bare = os.sep not in path and "/" not in path
    under_configs = os.path.dirname(os.path.normpath(path)) == "configs"
    if (bare or under_configs) and name in builtin_names():
        return os.path.join(builtin_dir(), f"{name}.py") + sep + preset
    raise ConfigFileError(
        f"config file {path} does not exist: pass a built-in name "
        f"({', '.join(builtin_names()) or 'none installed'}, optionally :preset) or a config "
        "file's path"
    )
