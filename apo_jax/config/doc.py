"""The field table of docs/training.md, written from the config tree.

  python -m apo_jax.config.doc           rewrites the table between its markers in the doc
  python -m apo_jax.config.doc --check   exits 1 when the table is stale (tests/test_config_doc.py)

Each row is a field of `tree.RunConfig` (sections included): its name, default, the demo preset's
value where it differs, and the field's help. The paper presets' overrides follow the table.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from apo_jax.config import fields, presets
from apo_jax.config.tree import RunConfig

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "training.md")
START = "<!-- config-fields: written by python -m apo_jax.config.doc from apo_jax/config -->"
END = "<!-- /config-fields -->"


def _value(v: Any) -> str:
    return '`""`' if v == "" else f"`{v!r}`" if isinstance(v, float) else f"`{v}`"


def _lookup(c: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        c = c[part]
    return c


def table() -> str:
    """The markdown table of every field, and the paper presets' overrides."""
    demo = presets.base_config("apo_zero", "demo")
    lines = ["| field | default | demo | meaning |", "| --- | --- | --- | --- |"]
    for name, default, help in fields.rows(RunConfig):
        shown = _lookup(demo, name)
        differs = _value(shown) if shown != default or type(shown) is not type(default) else ""
        meaning = help.replace("|", r"\|").replace("<", r"\<")  # a table cell, not HTML
        lines.append(f"| `{name}` | {_value(default)} | {differs} | {meaning} |")
    paper = presets.paper_overrides("<preset>")
    sets = ", ".join(f"`{k}={v}`" for k, v in paper.items())
    names = ", ".join(f"`{p}`" for p in presets.PAPER_PRESETS)
    lines += ["", f"The paper presets ({names}) set {sets} over the defaults."]
    return "\n".join(lines)


def splice(text: str, body: str) -> str:
    """`text` with what lies between the markers replaced by `body`."""
    head, start, rest = text.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError(f"the doc lacks the markers {START} ... {END}")
    return f"{head}{START}\n{body}\n{END}{tail}"


def main(argv: list[str]) -> int:
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    new = splice(text, table())
    if "--check" in argv:
        if new != text:
            print(
                f"{os.path.normpath(DOC)}: the config field table is stale; run "
                "python -m apo_jax.config.doc"
            )
            return 1
        return 0
    with open(DOC, "w", encoding="utf-8") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
