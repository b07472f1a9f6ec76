"""The config tree is the one source: every field has help, and docs/training.md's table is its."""

import dataclasses

import pytest

from apo_jax import config as config_lib
from apo_jax.config import doc, fields, presets
from apo_jax.config.tree import RunConfig

ROWS = list(fields.rows(RunConfig))


@pytest.mark.parametrize("name,default,help", ROWS, ids=[r[0] for r in ROWS])
def test_every_field_has_one_line_help(name, default, help):
    assert help.strip(), f"config.{name} has no help: give it one in its field(...) declaration"
    assert "\n" not in help, f"config.{name}'s help must be one line (a table cell)"


def test_the_doc_table_is_current():
    with open(doc.DOC, encoding="utf-8") as f:
        text = f.read()
    assert doc.splice(text, doc.table()) == text, (
        "docs/training.md's config field table is stale: run python -m apo_jax.config.doc"
    )


def test_a_stale_table_is_caught():
    with open(doc.DOC, encoding="utf-8") as f:
        text = f.read()
    stale = doc.splice(text, doc.table().replace("| `seed` | `0` |", "| `seed` | `1` |"))
    assert stale != text and doc.splice(stale, doc.table()) == text
    with pytest.raises(ValueError, match="lacks the markers"):
        doc.splice("no markers here", doc.table())


@pytest.mark.parametrize("preset", presets.RUN_PRESETS)
def test_the_config_dict_is_the_tree(preset):
    """Every ConfigDict field is a row of the table (demo.* and distributed.* included), and the
    paper presets change only the fields paper_overrides names (besides preset and loss.name)."""
    c = presets.base_config("kto", preset)
    leaves = dict(_leaves(c.to_dict()))
    defaults = {name: default for name, default, _ in ROWS}
    assert sorted(leaves) == sorted(defaults)
    changed = {k for k, v in leaves.items() if v != defaults[k]}
    over = presets.demo_overrides("kto") if preset == "demo" else presets.paper_overrides(preset)
    assert changed <= {"preset", "loss.name", *over}


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_field_checks_name_the_field():
    c = presets.with_overrides(presets.base_config("apo_down", None), {"batch_size": 0})
    with pytest.raises(config_lib.ConfigError, match=r"^config.batch_size must be > 0, got 0$"):
        config_lib.validate(c, device_count=1)
    c = presets.with_overrides(presets.base_config("apo_down", None), {"data.verify": "some"})
    with pytest.raises(
        config_lib.ConfigError, match="^config.data.verify must be fast, full or off"
    ):
        config_lib.validate(c, device_count=1)


def test_validate_returns_the_tree_with_validated_values():
    rc = config_lib.validate(presets.base_config("apo_down", None), device_count=1)
    assert isinstance(rc, RunConfig)
    assert (rc.loss.beta, rc.data.seq_len, rc.samples.num_prompts) == (10.0, 128, 64)  # demo -1s
    assert rc.reference.mode == "precomputed" and rc.data.layout is None  # auto, resolved later
    assert rc.mesh.data == 1 and rc.data.buckets is None
    assert dataclasses.is_dataclass(rc.optim) and rc.optim.learning_rate == 2e-5
