"""Per-op times of a compiled XLA:CPU program, from a `jax.profiler` trace.

    from op_profile import traced_ops
    print(traced_ops(compiled, run, calls=2, top=15))

XLA:CPU's thunk executor records one trace event per executed HLO instruction (`hlo_op` in the
event's args). `traced_ops` runs `run()` under `jax.profiler.trace`, reads the trace's
`*.trace.json.gz`, sums the time of each instruction (control flow such as `while` and `call` is
left out: its body's instructions are counted themselves) and names each one from the compiled
module's text: its kind (a fusion holding a `dot` is a matmul, one holding a `reduce` a reduction,
and so on) and the JAX operation it came from (`metadata op_name`; `transpose(...)` marks the
backward pass). Durations are summed over threads, so shares are of busy time, not wall time.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
from collections.abc import Callable

_COMP = re.compile(r"^%?([\w.\-]+) \(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+(?: \S+)*? ([\w\-]+)\(")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_OPNAME = re.compile(r'op_name="([^"]*)"')
CONTROL = {"while", "call", "conditional", "async-start", "async-done"}
KINDS = (  # first match wins
    ("matmul", {"dot", "convolution"}),
    ("gather/scatter", {"gather", "scatter", "dynamic-slice", "dynamic-update-slice"}),
    ("reduction", {"reduce", "reduce-window", "sort"}),
    ("copy/transpose", {"copy", "transpose", "concatenate", "pad", "slice"}),
)


def parse_hlo(text: str) -> dict[str, dict]:
    """Instruction name -> {opcode, calls, op_name, ops (opcodes inside, called computations
    included)} for every instruction of the module text."""
    comps: dict[str, list[str]] = collections.defaultdict(list)
    instrs: dict[str, dict] = {}
    current = ""
    for line in text.splitlines():
        m = _COMP.match(line)
        if m and "=" not in line.split("(")[0]:
            current = m.group(1)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, opcode = m.group(1), m.group(2)
        op_name = _OPNAME.search(line)
        instrs[name] = {
            "opcode": opcode,
            "calls": _CALLS.findall(line),
            "op_name": op_name.group(1) if op_name else "",
        }
        comps[current].append(name)

    def inner(comp: str, seen: set[str]) -> set[str]:
        if comp in seen:
            return set()
        seen.add(comp)
        out: set[str] = set()
        for n in comps.get(comp, ()):
            out.add(instrs[n]["opcode"])
            for c in instrs[n]["calls"]:
                out |= inner(c, seen)
        return out

    for info in instrs.values():
        ops = {info["opcode"]}
        if info["opcode"] not in CONTROL:
            for c in info["calls"]:
                ops |= inner(c, set())
        info["ops"] = ops
    return instrs


def kind(info: dict) -> str:
    if info["opcode"] in CONTROL:
        return "control"
    for name, ops in KINDS:
        if info["ops"] & ops:
            return name
    return "elementwise"


def short(op_name: str) -> str:
    """The JAX operation an instruction came from, e.g. 'bwd .../dot_general'."""
    parts = [p for p in op_name.split("/") if not p.startswith("jit(")]
    direction = "bwd" if "transpose(" in op_name else "fwd"
    return f"{direction} {'/'.join(parts[-3:])}" if parts else "?"


def read_trace(trace_dir: str) -> dict[str, float]:
    """hlo_op -> summed microseconds over every trace event of the run."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(files[-1]) as f:
        events = json.load(f)["traceEvents"]
    times: dict[str, float] = collections.Counter()
    for e in events:
        op = (e.get("args") or {}).get("hlo_op")
        if e.get("ph") == "X" and op:
            times[op] += float(e.get("dur", 0.0))
    return times


def traced_ops(compiled, run: Callable[[], object], calls: int = 2, top: int = 15) -> str:
    """Runs ``run()`` ``calls`` times under the profiler; returns Markdown tables of the time per
    kind of instruction and of the ``top`` instructions (ms per call)."""
    import jax

    instrs = parse_hlo(compiled.as_text())
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(calls):
                run()
        times = read_trace(tmp)
    leaf = {op: us for op, us in times.items() if op in instrs and kind(instrs[op]) != "control"}
    unknown = sum(us for op, us in times.items() if op not in instrs)
    total = sum(leaf.values()) or 1.0
    by_kind: dict[str, float] = collections.Counter()
    by_source: dict[tuple[str, str], float] = collections.Counter()
    for op, us in leaf.items():
        by_kind[kind(instrs[op])] += us
        by_source[(kind(instrs[op]), short(instrs[op]["op_name"]))] += us
    lines = ["| kind | ms per call | share |", "| --- | --- | --- |"]
    for k, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {us / calls / 1e3:.1f} | {us / total:.0%} |")
    lines += ["", "| kind | from (JAX op) | ms per call | share |", "| --- | --- | --- | --- |"]
    for (k, src), us in sorted(by_source.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {k} | `{src}` | {us / calls / 1e3:.1f} | {us / total:.0%} |")
    lines.append(
        f"\nbusy time {total / calls / 1e3:.1f} ms per call over {len(leaf)} instructions"
        f" ({unknown / calls / 1e3:.1f} ms in events not in the module)"
    )
    return "\n".join(lines)
