"""Compares two metrics.jsonl files ignoring wall-clock keys (tokens_per_sec, flops_per_sec, mfu)."""
import json, sys
TIMING = ("tokens_per_sec", "flops_per_sec", "mfu")
def rows(p):
    out = []
    for line in open(p):
        r = json.loads(line)
        out.append({k: v for k, v in r.items() if not k.endswith(TIMING)})
    return out
a, b = rows(sys.argv[1]), rows(sys.argv[2])
print(f"{len(a)} vs {len(b)} rows; identical (exact floats, timing keys dropped): {a == b}")
if a != b:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            print("first difference at row", i, {k: (x.get(k), y.get(k)) for k in set(x) | set(y) if x.get(k) != y.get(k)}); break
    sys.exit(1)
