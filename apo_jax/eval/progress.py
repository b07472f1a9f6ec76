"""Resume bookkeeping of an evaluation run: the progress log and the run identity.

``progress.jsonl`` holds every finished response, appended, flushed and fsynced as it completes;
a rerun reads it back (skipping a line torn by a kill) and generates only what is missing.
``run.json`` pins what the responses depend on; a rerun with other weights, tokenizer, sampling
settings, batch size, dtype, mesh or prompts is refused instead of mixing two runs' answers in
one output directory.
"""

from __future__ import annotations

import json
import os
from typing import Any

from apo_jax.errors import UserError

Key = tuple[int, int]  # (row index, sample index)


class ResumeError(UserError):
    """An output directory that holds another run's generations."""


class ProgressLog:
    """The append-only resume log of finished responses (see the module docstring)."""

    def __init__(self, path: str):
        self.path = path
        self.corrupt_lines = 0
        self._file = None

    def load(self, ids: dict[int, Any], num_samples: int) -> dict[Key, dict[str, Any]]:
        """Finished rows by (index, sample); refuses a log written for other prompts."""
        done: dict[Key, dict[str, Any]] = {}
        if not os.path.exists(self.path):
            return done
        with open(self.path, "rb") as f:
            lines = f.read().splitlines()
        for line in lines:
            try:
                row = json.loads(line)
                key = (int(row["index"]), int(row["sample"]))
            except (ValueError, KeyError, TypeError):
                self.corrupt_lines += 1  # a torn last line from a kill mid-write
                continue
            if key[0] not in ids or row.get("id") != ids[key[0]] or key[1] >= num_samples:
                raise ResumeError(
                    f"{self.path}: row {key[0]} (id {row.get('id')!r}) does not match the "
                    "current prompts: this --out holds generations of other prompts; use a new "
                    "--out or delete it"
                )
            done[key] = row
        return done

    def append(self, key: Key, row_id: Any, gen: dict[str, Any]) -> None:
        """Appends one finished row, flushed and fsynced so a kill cannot lose it."""
        if self._file is None:
            needs_newline = os.path.exists(self.path) and os.path.getsize(self.path) > 0
            if needs_newline:
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    needs_newline = f.read(1) != b"\n"
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            if needs_newline:
                self._file.write("\n")
        line = {"index": key[0], "sample": key[1], "id": row_id, **gen}
        self._file.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def check_run_identity(out: str, identity: dict[str, Any]) -> None:
    path = os.path.join(out, "run.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
        # A key an older run.json lacks is not compared (that version did not record it).
        changed = sorted(k for k in identity if k in before and before[k] != identity[k])
        if changed:
            detail = "; ".join(f"{k}: {before.get(k)!r} -> {identity[k]!r}" for k in changed)
            raise ResumeError(
                f"--out={out} holds generations made with other settings ({detail}); use a new "
                "--out, or delete it to start over"
            )
        return
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(identity, f, indent=2)
    os.replace(path + ".tmp", path)
