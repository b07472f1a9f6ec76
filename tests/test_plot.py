"""`apo_jax.plot` on real metrics.

tests/data/demo_metrics.jsonl is the metrics.jsonl of a real run of the embedded demo
(`python -m apo_jax.train --config=configs/apo_down.py:demo`, 187 steps, held-out evaluation
every 50 steps), copied unchanged.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from apo_jax import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_METRICS = os.path.join(ROOT, "tests", "data", "demo_metrics.jsonl")


def _workdir(path, config=None, scale=1.0, torn=False):
    os.makedirs(path)
    with (
        open(DEMO_METRICS, encoding="utf-8") as f,
        open(os.path.join(path, "metrics.jsonl"), "w") as g,
    ):
        for line in f:
            row = json.loads(line)
            g.write(json.dumps({k: v if k == "step" else v * scale for k, v in row.items()}) + "\n")
        if torn:
            g.write('{"step": 190, "train/lo')
    if config is not None:
        with open(os.path.join(path, "config.json"), "w") as g:
            json.dump(config, g)
    return str(path)


def test_read_metrics_of_a_real_run(tmp_path):
    series = plot.read_metrics(_workdir(tmp_path / "run", torn=True))
    assert [s for s, _ in series["eval/loss"]] == [50, 100, 150, 187]
    assert len(series["train/loss"]) == 19 and series["train/loss"][0][0] == 10
    assert series["train/logps/chosen"][-1][1] < series["train/logps/chosen"][0][1]
    with pytest.raises(plot.PlotError, match="no metrics.jsonl"):
        plot.read_metrics(str(tmp_path))


def test_runs_overlaid_with_legends_from_their_configs(tmp_path):
    runs = [
        _workdir(tmp_path / "apo", {"loss": {"name": "apo_down", "beta": 0.1}, "seed": 0}),
        _workdir(tmp_path / "dpo", {"loss": {"name": "dpo", "beta": 0.1}, "seed": 0}, scale=0.8),
    ]
    written = plot.plot_runs(runs, str(tmp_path / "png"))
    names = sorted(os.path.basename(p) for p in written)
    assert names == sorted([f"{p[0]}.png" for p in plot.PANELS] + ["overview.png"])
    assert len(names) == 10
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    overview = written[str(tmp_path / "png" / "overview.png")]
    assert overview["loss"] == [
        ("apo (loss.name=apo_down) train", 19),
        ("apo (loss.name=apo_down) held-out", 4),
        ("dpo (loss.name=dpo) train", 19),
        ("dpo (loss.name=dpo) held-out", 4),
    ]
    assert [label for label, _ in overview["log-probs (held-out)"]] == [
        "apo (loss.name=apo_down) chosen",
        "apo (loss.name=apo_down) rejected",
        "dpo (loss.name=dpo) chosen",
        "dpo (loss.name=dpo) rejected",
    ]
    assert len(overview["learning rate"]) == 2  # train only
    assert (
        written[str(tmp_path / "png" / "margins.png")]["reward margin"] == overview["reward margin"]
    )


def test_legend_falls_back_to_checkpoint_meta_then_directory_name(tmp_path):
    a = _workdir(tmp_path / "a")
    meta = tmp_path / "a" / "checkpoints" / "187" / "meta"
    meta.mkdir(parents=True)
    (meta / "metadata").write_text(json.dumps({"step": 187, "loss": "apo_zero", "preset": "demo"}))
    b = _workdir(tmp_path / "b")
    assert plot.run_config(a) == {"step": 187, "loss": "apo_zero", "preset": "demo"}
    assert plot.legend_labels([a, b], [plot.run_config(a), plot.run_config(b)]) == [
        "a (loss=apo_zero, preset=demo)",
        "b (loss=None, preset=None)",
    ]
    assert plot.legend_labels([b], [{}]) == ["b"]


def test_command_plots_runs_and_contrastiveness_side_by_side(tmp_path):
    from apo_jax.data import demo

    sets = []
    for name, seed in (("clair", 0), ("other", 1)):
        sets.append(str(tmp_path / f"{name}.jsonl"))
        with open(sets[-1], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in demo.generate_pairs(40, seed=seed))
    run = _workdir(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [
        sys.executable,
        "-m",
        "apo_jax.plot",
        run,
        f"--out={tmp_path / 'png'}",
        f"--datasets={','.join(sets)}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "png" / "contrastiveness.png").stat().st_size > 10_000
    assert "wrote" in proc.stdout and "overview.png" in proc.stdout
    shutil.rmtree(tmp_path / "png")
    bad = subprocess.run(
        cmd[:3] + [f"--out={tmp_path / 'png'}", "--datasets=/nonexistent.jsonl"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert bad.stderr.startswith("error: --datasets: /nonexistent.jsonl")
