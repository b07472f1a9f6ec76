"""The config tree's field form: each field declares its default, a one-line help and a check.

A section of the tree is a frozen dataclass whose fields are made with `field` (a value) or
`section` (a nested section). The metadata they carry is read three ways: `config_dict` writes the
ml_collections ConfigDict that configs/*.py return and the command line overrides, `check` runs
the fields' checks on a ConfigDict's values, and `rows` lists every field for docs/training.md.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import ml_collections

from apo_jax.errors import ConfigError

Check = Callable[[Any], "str | None"]  # what is wrong with a value ("must be > 0, got -1"), or None


def field(default: Any, help: str, check: Check | None = None) -> Any:
    """A config value: its default, a one-line help for the docs table, an optional check."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check})


def section(cls: type, help: str) -> Any:
    """A nested section of the tree (a dataclass whose fields carry help)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "section": cls})


def at_least(low: float, shown: str = "") -> Check:
    """`value >= low`; `shown` replaces the bound in the message (e.g. '0 (or -1)')."""
    return lambda v: None if v >= low else f"must be >= {shown or low}, got {v}"


def above(low: float) -> Check:
    return lambda v: None if v > low else f"must be > {low}, got {v}"


def one_of(choices: Sequence[str], shown: str = "") -> Check:
    """`value in choices`; the message lists them as `shown` or 'a, b or c'."""
    text = shown or ", ".join(choices[:-1]) + " or " + choices[-1]
    return lambda v: None if v in choices else f"must be {text}, got {v!r}"


def _section_of(f: dataclasses.Field) -> type | None:
    return f.metadata.get("section")


def config_dict(cls: type) -> ml_collections.ConfigDict:
    """The ConfigDict of `cls`'s defaults, nested as the tree (field order kept)."""
    c = ml_collections.ConfigDict()
    for f in dataclasses.fields(cls):
        sub = _section_of(f)
        c[f.name] = config_dict(sub) if sub else f.default
    return c


def check(cls: type, values: Mapping[str, Any], prefix: str = "config.") -> None:
    """Runs the field checks of `cls` and its sections on `values` (a nested dict).

    Raises:
      ConfigError: 'config.<field> <what is wrong>' for the first field that fails.
    """
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        sub = _section_of(f)
        if sub:
            check(sub, values[f.name], f"{prefix}{f.name}.")
        elif f.metadata.get("check") and (wrong := f.metadata["check"](values[f.name])):
            raise ConfigError(f"{prefix}{f.name} {wrong}")


def build(cls: type, values: Mapping[str, Any], name: str, **resolved: Any) -> Any:
    """`cls` from the ConfigDict block `values`, with `resolved` replacing raw fields; a field
    the block lacks takes its default (a config file written before the field existed)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"config.{name}: unknown field {unknown[0]!r}")
    try:
        return cls(**{**values, **resolved})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.{name}: {e}") from None


def rows(cls: type, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """(dotted name, default, help) of every value field of the tree, in declaration order."""
    for f in dataclasses.fields(cls):
        sub = _section_of(f)
        if sub:
            yield from rows(sub, f"{prefix}{f.name}.")
        else:  # optim, lora and distributed declare their help as plain `help` metadata
            yield f"{prefix}{f.name}", f.default, f.metadata.get("help", "")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} of a nested config dict, values normalised as JSON stores them: the form
    the field checks, figure labels and the resume comparison read a run's `config.json` in."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.loads(json.dumps(value, default=str))
    return out
