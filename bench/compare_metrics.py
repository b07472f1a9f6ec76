"""Compares two metrics.jsonl files row by row, ignoring wall-clock keys.

Usage: python bench/compare_metrics.py A/metrics.jsonl B/metrics.jsonl
Exit 0 when every row is equal (exact floats) once keys ending in tokens_per_sec, flops_per_sec
or mfu are dropped; else prints the first differing row and exits 1.
"""

import json
import sys

TIMING = ("tokens_per_sec", "flops_per_sec", "mfu")


def rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [{k: v for k, v in json.loads(line).items() if not k.endswith(TIMING)} for line in f]


def main(a_path: str, b_path: str) -> int:
    a, b = rows(a_path), rows(b_path)
    print(f"{len(a)} vs {len(b)} rows; identical (exact floats, timing keys dropped): {a == b}")
    if a == b:
        return 0
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            diff = {k: (x.get(k), y.get(k)) for k in set(x) | set(y) if x.get(k) != y.get(k)}
            print("first difference at row", i, diff)
            break
    return 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
