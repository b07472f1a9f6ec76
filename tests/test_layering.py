"""No loop between the package's parts: the import graph of apo_jax's subpackages and top-level
modules is acyclic (a back edge is an import that closes a loop), beside `import_cycles.py`'s
module-level check.

A part is `apo_jax.<name>` (a subpackage with everything under it, or a top-level module).
Entry points stand apart: a command's `__main__` module may import any part and none imports it,
and `apo_jax.data.examples` (the scripts that write the shipped example files, checked with the
eval checkers) is a part of its own above `data` and `eval`.
"""

import ast
import graphlib
import itertools
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "apo_jax")
APART = ("apo_jax.data.examples",)


def _part(module: str) -> str:
    if module.endswith(".__main__"):
        return module
    for name in APART:
        if module == name or module.startswith(name + "."):
            return name
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _modules():
    for dirpath, _, files in os.walk(ROOT):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                yield path, rel.removesuffix(".__init__")


def _imports(path: str):
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "apo_jax":
                yield from ((f"apo_jax.{a.name}", node.lineno) for a in node.names)
            elif node.module.startswith("apo_jax."):
                yield node.module, node.lineno
        elif isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names if a.name.startswith("apo_jax."))


def import_graph() -> dict[str, dict[str, list[str]]]:
    """{part: {imported part: ['file:line', ...]}} over every module of apo_jax."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path, module in _modules():
        here = _part(module)
        edges = graph.setdefault(here, {})
        for target, line in _imports(path):
            there = _part(target)
            if there not in (here, "apo_jax"):
                edges.setdefault(there, []).append(f"{os.path.relpath(path, ROOT)}:{line}")
    return graph


def test_the_parts_of_the_package_import_each_other_without_a_loop():
    graph = import_graph()
    sorter = graphlib.TopologicalSorter({part: set(deps) for part, deps in graph.items()})
    try:
        order = list(sorter.static_order())
    except graphlib.CycleError as e:
        loop = e.args[1]
        where = [f"{a} -> {b} ({', '.join(graph[a][b][:3])})" for a, b in itertools.pairwise(loop)]
        raise AssertionError("import loop between parts: " + "; ".join(where)) from None
    assert order.index("apo_jax.errors") < order.index("apo_jax.train")


def test_the_check_sees_a_loop_when_there_is_one():
    graph = import_graph()
    assert "apo_jax.train" in graph["apo_jax.lab"]  # the lab trains through train/
    graph["apo_jax.train"]["apo_jax.lab"] = ["(added)"]
    sorter = graphlib.TopologicalSorter({part: set(deps) for part, deps in graph.items()})
    try:
        sorter.prepare()
    except graphlib.CycleError:
        return
    raise AssertionError("a loop train -> lab -> train went unseen")


def test_lower_parts_never_import_the_training_run_or_the_commands_above_it():
    graph = import_graph()
    top = {"apo_jax.train", "apo_jax.lab", "apo_jax.plot"}
    lower = ("models", "losses", "layouts", "data", "logprobs", "sharding", "optim", "config")
    for name in lower:
        reached = top & set(graph[f"apo_jax.{name}"])
        assert not reached, f"apo_jax.{name} imports {reached}: {graph[f'apo_jax.{name}']}"
