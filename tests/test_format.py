"""The code is formatted and linted by ruff, with no opt-outs (`ruff` is pinned in the test extras).

Formatting is checked, not fixed: run `ruff format .` (and `ruff check --fix .`) before committing.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("apo_jax", "configs", "tests", "bench", "setup.py")


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, *SOURCES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def test_every_python_file_is_as_ruff_format_writes_it():
    proc = _ruff("format", "--check", "--diff")
    assert proc.returncode == 0, f"run `ruff format .`:\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}"


def test_ruff_check_finds_nothing():
    proc = _ruff("check")
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}{proc.stderr[-2000:]}"


def test_no_formatter_opt_outs():
    opt_outs = []
    for folder in SOURCES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8") as f:
                    for i, line in enumerate(f, 1):
                        if any(f"fmt: {word}" in line for word in ("skip", "off")):
                            opt_outs.append(f"{os.path.relpath(path, ROOT)}:{i}")
    assert not opt_outs, f"formatter opt-outs: {opt_outs[:20]}"
