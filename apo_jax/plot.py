"""Figures of training dynamics: ``python -m apo_jax.plot <workdir>... --out=<dir>``.

Reads each workdir's ``metrics.jsonl`` (``train/...`` at every log interval, ``eval/...`` at every
held-out evaluation) and writes PNGs: loss, chosen and rejected rewards, chosen and rejected
log-probs (whether both likelihoods rise, fall or part is what separates DPO, APO-zero and
APO-down), margins, reward accuracies, grad norm, learning rate, and ``overview.png`` with all of
them. Train curves are solid, held-out ones dashed with markers; each run has one colour, and its
legend entry names the config fields that differ between the runs (from ``<workdir>/config.json``,
else the newest checkpoint's run facts, else just the directory name).
``--datasets=a,b`` adds ``contrastiveness.png``: Jaccard and Levenshtein histograms of several
pair datasets side by side (statistics from :mod:`apo_jax.data.stats`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags

from apo_jax import commands, errors
from apo_jax.config.fields import flatten

Series = dict[str, list[tuple[int, float]]]  # "train/loss" -> [(step, value)]
# (file name, title, metric names, splits, y label)
PANELS = (
    ("loss", "loss", ("loss",), ("train", "eval"), "loss"),
    (
        "rewards_train",
        "rewards (train)",
        ("rewards/chosen", "rewards/rejected"),
        ("train",),
        "beta x log-ratio",
    ),
    (
        "rewards_eval",
        "rewards (held-out)",
        ("rewards/chosen", "rewards/rejected"),
        ("eval",),
        "beta x log-ratio",
    ),
    (
        "logps_train",
        "log-probs (train)",
        ("logps/chosen", "logps/rejected"),
        ("train",),
        "sequence log-prob",
    ),
    (
        "logps_eval",
        "log-probs (held-out)",
        ("logps/chosen", "logps/rejected"),
        ("eval",),
        "sequence log-prob",
    ),
    ("margins", "reward margin", ("rewards/margins",), ("train", "eval"), "chosen - rejected"),
    ("accuracies", "reward accuracy", ("rewards/accuracies",), ("train", "eval"), "fraction"),
    ("grad_norm", "grad norm", ("grad_norm",), ("train",), "global L2 norm"),
    ("learning_rate", "learning rate", ("learning_rate",), ("train",), "learning rate"),
)
SPLIT_STYLE = {
    "train": {"linestyle": "-"},
    "eval": {"linestyle": "--", "marker": "o", "markersize": 3},
}
SIDE_ALPHA = {"chosen": 1.0, "rejected": 0.45}  # rejected drawn fainter, same colour


class PlotError(errors.UserError):
    """A workdir or dataset that cannot be plotted."""


def read_metrics(workdir: str) -> Series:
    """Every metric of `workdir`/metrics.jsonl as (step, value) lists, in file order.

    A torn last line (the run was killed mid-write) is skipped; names without a split prefix are
    read as train metrics.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise PlotError(f"{workdir}: no metrics.jsonl (is it a training workdir?)")
    series: Series = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                step = int(record.pop("step"))
            except (ValueError, KeyError, TypeError):
                continue
            for name, value in record.items():
                if isinstance(value, int | float):
                    key = (
                        name
                        if "/" in name and name.split("/")[0] in ("train", "eval")
                        else f"train/{name}"
                    )
                    series.setdefault(key, []).append((step, float(value)))
    return series


def run_config(workdir: str) -> dict[str, Any]:
    """The run's config, flattened (``loss.beta``): config.json, else checkpoint meta, else {}."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        ckpts = os.path.join(workdir, "checkpoints")
        steps = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
        path = os.path.join(ckpts, str(max(steps)), "meta", "metadata") if steps else ""
    if not path or not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return flatten(data) if isinstance(data, dict) else {}


def legend_labels(
    workdirs: Sequence[str], configs: Sequence[dict[str, Any]], most: int = 4
) -> list[str]:
    """Each run's directory name plus the config fields whose values differ between the runs."""
    names = [os.path.basename(os.path.abspath(w)) for w in workdirs]
    keys = sorted({k for c in configs for k in c})
    differing = [
        k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1
    ]
    differing = [k for k in differing if k not in ("step", "data")][:most]
    labels = []
    for name, cfg in zip(names, configs, strict=True):
        fields = ", ".join(f"{k}={cfg.get(k)}" for k in differing)
        labels.append(f"{name} ({fields})" if fields else name)
    return labels


def _draw(ax, runs: Sequence[tuple[str, Series]], panel: tuple) -> list[tuple[str, int]]:
    """Draws one panel; returns its lines as (label, number of points)."""
    _, title, metrics, splits, ylabel = panel
    drawn = []
    for color, (label, series) in enumerate(runs):
        for split in splits:
            for metric in metrics:
                points = series.get(f"{split}/{metric}", [])
                if not points:
                    continue
                side = metric.rsplit("/", 1)[-1]
                line_label = label + (
                    "" if len(splits) == 1 else f" {'held-out' if split == 'eval' else 'train'}"
                )
                line_label += f" {side}" if len(metrics) > 1 else ""
                ax.plot(
                    *zip(*points, strict=True),
                    color=f"C{color}",
                    alpha=SIDE_ALPHA.get(side, 1.0),
                    label=line_label,
                    **SPLIT_STYLE[split],
                )
                drawn.append((line_label, len(points)))
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=6)
    return drawn


def plot_runs(workdirs: Sequence[str], out_dir: str) -> dict[str, dict[str, list[tuple[str, int]]]]:
    """Writes one PNG per panel and overview.png for the runs in `workdirs`.

    Args:
      workdirs: training workdirs (each with metrics.jsonl).
      out_dir: where the PNGs go (created).

    Returns:
      {png path: {panel title: [(line label, points)]}}, what each figure shows.
    """
    plt = _pyplot()
    labels = legend_labels(workdirs, [run_config(w) for w in workdirs])
    runs = list(zip(labels, [read_metrics(w) for w in workdirs], strict=True))
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for panel in PANELS:
        fig, ax = plt.subplots(figsize=(6, 4))
        written[_save(fig, out_dir, panel[0])] = {panel[1]: _draw(ax, runs, panel)}
    fig, axes = plt.subplots(3, 3, figsize=(15, 11))
    overview = {p[1]: _draw(ax, runs, p) for ax, p in zip(axes.flat, PANELS, strict=True)}
    written[_save(fig, out_dir, "overview")] = overview
    return written


def plot_contrastiveness(datasets: Sequence[str], out_dir: str) -> str:
    """Writes contrastiveness.png: per dataset (columns), Jaccard and Levenshtein histograms."""
    from apo_jax.data import stats

    plt = _pyplot()
    results = []
    for path in datasets:
        try:
            results.append(stats.pair_stats(path))
        except Exception as e:  # unreadable input: say which one
            raise PlotError(f"--datasets: {path}: {type(e).__name__}: {e}") from None
    fig, axes = plt.subplots(
        2, len(results), figsize=(4 * len(results), 6), squeeze=False, sharex="row", sharey="row"
    )
    for col, (path, res) in enumerate(zip(datasets, results, strict=True)):
        rows = res["per_pair"]
        axes[0, col].hist([r["jaccard"] for r in rows], bins=40, range=(0, 1), color="tab:blue")
        name = os.path.join(*os.path.abspath(path).split(os.sep)[-2:])  # parent/name: unambiguous
        axes[0, col].set(
            title=f"{name} ({len(rows)} pairs)",
            xlabel=f"Jaccard similarity ({res['jaccard_tokens']} tokens)",
            ylabel="pairs",
        )
        axes[1, col].hist([r["levenshtein"] for r in rows], bins=40, color="tab:orange")
        axes[1, col].set(xlabel=f"Levenshtein distance ({res['levenshtein_unit']})", ylabel="pairs")
    os.makedirs(out_dir, exist_ok=True)
    return _save(fig, out_dir, "contrastiveness")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, f"{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    fig.clf()
    _pyplot().close(fig)
    return path


USAGE = "python -m apo_jax.plot WORKDIR... [--datasets=a,b] --out=DIR"


def flag_values() -> flags.FlagValues:
    """The command's flags, in their own FlagValues (see apo_jax.commands)."""
    fv = flags.FlagValues()
    kw = {"flag_values": fv}
    flags.DEFINE_string("out", None, "Directory for the PNG files.", **kw)
    flags.DEFINE_list(
        "datasets", [], "Pair files or shard dirs for contrastiveness histograms.", **kw
    )
    flags.mark_flag_as_required("out", flag_values=fv)
    return fv


def run(argv: Sequence[str]) -> list[str]:
    """Plots the workdirs given as arguments (and --datasets) into --out; returns the files.

    Raises:
      UserError: a flag that does not parse, no input given, or a workdir that cannot be read.
    """
    fv = flag_values()
    workdirs = commands.parse(fv, argv, USAGE, __doc__.splitlines()[0])[1:]
    if not workdirs and not fv.datasets:
        raise PlotError("give one or more training workdirs (and/or --datasets=a,b)")
    written = list(plot_runs(workdirs, fv.out)) if workdirs else []
    if fv.datasets:
        written.append(plot_contrastiveness(fv.datasets, fv.out))
    print("\n".join(f"wrote {p}" for p in written))
    return written


def main(argv: Sequence[str] | None = None) -> None:
    """The command: :func:`run` under :func:`apo_jax.errors.guard` (one-line errors)."""
    errors.guard(lambda: run(sys.argv if argv is None else argv))


if __name__ == "__main__":
    main()
