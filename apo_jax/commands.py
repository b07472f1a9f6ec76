"""Command lines of the data and CLAIR commands: absl flags, ``--help``, one-line errors.

Each command builds its own ``absl.flags.FlagValues`` (so commands never clash in one process,
e.g. under pytest) and parses ``--flag_name=value`` arguments like ``python -m apo_jax.train``.
``--help`` prints every flag with its one-line meaning; a flag that does not parse is a
:class:`FlagError`, which :func:`apo_jax.errors.guard` shows as one line with exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from apo_jax import errors

HELP_ARGS = ("-h", "--help", "-help", "--helpfull", "--helpshort")
_ABSL_BUILTINS = ("flagfile", "undefok")


class FlagError(errors.UserError):
    """A command line that does not parse: an unknown flag, a bad value, a missing flag."""


def _left(flag: flags.Flag) -> str:
    if flag.boolean:
        return f"--[no]{flag.name}"
    if isinstance(flag, flags.MultiFlag):
        return f"--{flag.name}=... (repeatable)"
    if flag.default is None:
        return f"--{flag.name}=..."
    return f"--{flag.name}={flag.default_as_str.strip(chr(39))}"


def help_text(fv: flags.FlagValues, usage: str, about: str) -> str:
    """The ``--help`` text: usage, what the command does, then one line per flag.

    Args:
      fv: the command's flags.
      usage: the usage line, e.g. ``python -m apo_jax.data.prepare --input=... [flags]``.
      about: one or more lines saying what the command does.

    Returns:
      The text, ending with a newline.
    """
    rows = []
    for module_flags in fv.flags_by_module_dict().values():
        for flag in module_flags:
            if flag.name in _ABSL_BUILTINS:
                continue
            meaning = flag.help.split("\n")[0].rstrip(";")  # absl appends notes on new lines
            default = f" (default {'true' if flag.default else 'false'})" if flag.boolean else ""
            rows.append((_left(flag), f"{meaning}{default}"))
    width = max((len(left) for left, _ in rows), default=0)
    lines = [f"usage: {usage}", "", about.strip(), "", "flags (--flag_name=value):"]
    lines += [f"  {left.ljust(width)}  {right}" for left, right in rows]
    return "\n".join(lines) + "\n"


def parse(fv: flags.FlagValues, argv: Sequence[str], usage: str, about: str) -> list[str]:
    """Parses ``argv`` (``argv[0]`` is the program) into ``fv``; returns the positional arguments.

    ``--help`` (or ``-h``) prints :func:`help_text` to stdout and exits with status 0.

    Raises:
      FlagError: an unknown flag, a value of the wrong type, or a required flag missing.
    """
    if any(arg in HELP_ARGS for arg in argv[1:]):
        sys.stdout.write(help_text(fv, usage, about))
        raise SystemExit(0)
    try:
        return fv(list(argv))
    except flags.Error as e:
        raise FlagError(f"{e} (see --help)") from None


def positive(fv: flags.FlagValues, *names: str) -> None:
    """Registers validators: each named integer flag must be >= 1 when set."""
    for name in names:
        flags.register_validator(
            name, lambda v: v is None or v >= 1, f"--{name} must be >= 1", flag_values=fv
        )


def use_compile_cache() -> None:
    """Keeps compiled programs across runs in JAX's persistent cache, so a rerun or a resume of
    the same model and shapes loads its steps instead of compiling them again.

    The directory is ``$JAX_COMPILATION_CACHE_DIR`` when set, else ``$APO_JAX_COMPILE_CACHE``,
    else ``~/.cache/apo_jax/jax_cache``; ``APO_JAX_COMPILE_CACHE=off`` turns it off. Programs that
    compile in under a second are not kept. Call before the first compilation.
    """
    import os

    where = os.environ.get("APO_JAX_COMPILE_CACHE", "")
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or where == "off":
        return
    import jax

    path = where or os.path.join(os.path.expanduser("~"), ".cache", "apo_jax", "jax_cache")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
