"""`<out>/results.json`, `<out>/report.md` and the figures they link.

Every accuracy is recomputed here from the generations files (`correct` per held-out prompt), so
a check that reads the same files gets the same numbers.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from apo_jax.lab import analysis
from apo_jax.lab.steps import read_jsonl, write_json

NAMES = {
    "clair": "CLAIR",
    "stronger_preferred": "stronger-preferred",
    "onpolicy_judge": "on-policy judge",
    "offpolicy_judge": "off-policy judge",
    "dpo": "DPO",
    "apo_zero": "APO-zero",
    "apo_down": "APO-down",
    "sft": "SFT",
}


def _correct(out: str, rel_path: str) -> tuple[list[str], np.ndarray]:
    rows = read_jsonl(os.path.join(out, rel_path))
    return [r["id"] for r in rows], np.array([float(r["correct"]) for r in rows])


def matrices(out: str, base_rel: str, conditions: list[dict[str, Any]]):
    """(baseline 1 x P, {(source, objective): seeds x P}) from the generations files; sets each
    condition's `accuracy`."""
    ids, base = _correct(out, base_rel)
    rows: dict[tuple[str, str], list[np.ndarray]] = {}
    for c in sorted(conditions, key=lambda c: c["seed"]):
        cids, v = _correct(out, c["generations"])
        if cids != ids:
            raise ValueError(f"{c['generations']}: not the target's held-out prompts in order")
        rows.setdefault((c["dataset"], c["objective"]), []).append(v)
        c["accuracy"] = float(v.mean())  # each condition's own accuracy, for results.json
    return base[None], {k: np.stack(v) for k, v in rows.items()}


def rounds(out: str, base_rel: str, chain: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each round's accuracy and its change from the model it started from (round 1: the
    target), both with bootstrap intervals over the held-out prompts, from the generations."""
    ids, prev = _correct(out, base_rel)
    entries = []
    for c in chain:
        cids, v = _correct(out, c["generations"])
        if cids != ids:
            raise ValueError(f"{c['generations']}: not the target's held-out prompts in order")
        entries.append(
            {
                **c,
                "target_accuracy": float(prev.mean()),
                "accuracy": float(v.mean()),
                "ci95": analysis.interval(v[None]),
                "delta": float(v.mean() - prev.mean()),
                "delta_ci95": analysis.interval(v[None], prev[None]),
            }
        )
        prev = v
    return entries


def write(
    out: str,
    meta: dict[str, Any],
    target: dict[str, Any],
    pairs: dict[str, Any],
    conditions: list[dict[str, Any]],
    chain: list[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Writes results.json, report.md and figures/; returns the results (with `rounds` when
    `chain`, the CLAIR rounds of `run`, is given)."""
    base_rel = os.path.join("target", target["generations"])
    base, mats = matrices(out, base_rel, conditions)
    table = {
        f"{s}/{o}": {"dataset": s, "objective": o, **analysis.summary(m, base)}
        for (s, o), m in mats.items()
    }
    expected = {
        s: analysis.expected_apo(v["chosen_correct"], float(base.mean()))
        for s, v in pairs["sources"].items()
    }
    results = {
        "baseline": {
            "accuracy": float(base.mean()),
            "ci95": analysis.interval(base),
            "generations": base_rel,
            "prompts": int(base.shape[1]),
        },
        "conditions": conditions,
        "table": table,
        "contrastiveness": {
            s: {
                k: v[k]
                for k in (
                    "jaccard",
                    "levenshtein",
                    "jaccard_median",
                    "levenshtein_median",
                    "chosen_correct",
                    "rejected_correct",
                )
            }
            for s, v in pairs["sources"].items()
        },
        "pairs_per_source": pairs["pairs_per_source"],
        "claims": {
            "contrastive": analysis.claim_contrastive(mats),
            "anchored": analysis.claim_anchored(mats, expected),
        },
        "moved": sum(v["moved"] for v in table.values()),
        **meta,
    }
    if chain:
        results["rounds"] = rounds(out, base_rel, list(chain))
    if "real" in meta:
        results["text"] = {
            f"{c['dataset']}/{c['objective']}/s{c['seed']}": text_stats(
                read_jsonl(os.path.join(out, c["generations"]))
            )
            for c in conditions
        }
        results["text"]["target"] = text_stats(read_jsonl(os.path.join(out, base_rel)))
        for c in conditions:
            rows = read_jsonl(os.path.join(out, c["generations"]))
            c["families"] = _families(rows)
    results["figures"] = figures(out, conditions, pairs)
    write_json(os.path.join(out, "results.json"), results)
    with open(os.path.join(out, "report.md") + ".tmp", "w", encoding="utf-8") as f:
        f.write(markdown(results))
    os.replace(os.path.join(out, "report.md") + ".tmp", os.path.join(out, "report.md"))
    return results


def figures(out: str, conditions: list[dict[str, Any]], pairs: dict[str, Any]) -> dict[str, str]:
    """logps.png (chosen/rejected log-probs per objective, seed 0) and contrastiveness.png."""
    from apo_jax import plot

    fig_dir = os.path.join(out, "figures")
    shard_dirs = [os.path.join(out, "pairs", v["shards"]) for v in pairs["sources"].values()]
    written = {
        "contrastiveness": os.path.relpath(plot.plot_contrastiveness(shard_dirs, fig_dir), out)
    }
    plt = plot._pyplot()
    objectives = list(dict.fromkeys(c["objective"] for c in conditions))
    fig, axes = plt.subplots(
        1, len(objectives), figsize=(4.5 * len(objectives), 3.6), squeeze=False
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    sources = list(pairs["sources"])
    for ax, objective in zip(axes[0], objectives, strict=True):
        for c in conditions:
            if c["objective"] != objective or c["seed"] != 0:
                continue
            series = plot.read_metrics(os.path.join(out, c["run"]))
            color = colors[sources.index(c["dataset"]) % len(colors)]
            for side, style in (("chosen", "-"), ("rejected", "--")):
                pts = series.get(f"train/logps/{side}", [])
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    style,
                    color=color,
                    label=f"{NAMES[c['dataset']]} {side}",
                )
        ax.set(title=NAMES.get(objective, objective), xlabel="step", ylabel="sequence log-prob")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    os.makedirs(fig_dir, exist_ok=True)
    fig.tight_layout()
    fig.savefig(os.path.join(fig_dir, "logps.png"), dpi=100)
    plt.close(fig)
    written["logps"] = os.path.join("figures", "logps.png")
    return written


def _families(rows: list[dict[str, Any]]) -> dict[str, float]:
    fams: dict[str, list[float]] = {}
    for r in rows:
        fams.setdefault(r["family"], []).append(float(r["correct"]))
    return {f: sum(v) / len(v) for f, v in sorted(fams.items())}


def repetitive(text: str) -> bool:
    """True when some word 3-gram occurs three times or more (looping text)."""
    words = text.split()
    grams: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - 2):
        g = tuple(words[i : i + 3])
        grams[g] = grams.get(g, 0) + 1
    return max(grams.values(), default=0) >= 3


def text_stats(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean response length (words) and the share of repetitive responses."""
    n = max(len(rows), 1)
    return {
        "mean_words": sum(len(r["response"].split()) for r in rows) / n,
        "repetition_rate": sum(repetitive(r["response"]) for r in rows) / n,
    }


def _ci(ci: list[float]) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def markdown(r: dict[str, Any]) -> str:
    """The report: setup, the table, contrastiveness, the two claims, figures."""
    sources = list(r["contrastiveness"])
    objectives = list(dict.fromkeys(c["objective"] for c in r["conditions"]))
    if "real" in r:
        lines = _real_header(r)
    else:
        lines = _toy_header(r)
    lines += [
        "## Held-out accuracy (mean over seeds; 95% interval over seeds and prompts)",
        "",
        "| pair source | " + " | ".join(NAMES.get(o, o) for o in objectives) + " |",
        "| --- |" + " --- |" * len(objectives),
    ]
    return _body(r, lines, sources, objectives)


def _toy_header(r: dict[str, Any]) -> list[str]:
    s, b = r["settings"], r["baseline"]
    return [
        "# Lab report: the paper's experiment in miniature",
        "",
        f"Target: SFT of a `{s['model']}` model for {s['sft_steps']} steps on {s['n_sft']} "
        f"demonstrations. Held-out greedy accuracy of the target: **{b['accuracy']:.3f}** "
        f"{_ci(b['ci95'])} on {b['prompts']} prompts. Every cell: {s['steps']} steps, batch "
        f"{s['batch_size']}, learning rate {s['lr']:g}, beta {s['beta']:g}; "
        f"{r['pairs_per_source']} pairs per source on the same prompts; {s['seeds']} seed(s). "
        f"Wall time {r['seconds'] / 60:.1f} min ({r['steps_run']} of {r['steps_total']} steps run, "
        "the rest cached).",
        "",
        _times(r["step_seconds"]),
        "",
    ]


def _body(r: dict[str, Any], lines: list[str], sources: list[str], objectives: list[str]) -> str:
    for src in sources:
        cells = []
        for o in objectives:
            t = r["table"].get(f"{src}/{o}")
            cells.append(
                ""
                if t is None
                else f"{t['accuracy']:.3f} {_ci(t['ci95'])}, "
                f"{t['delta']:+.3f}{' *' if t['moved'] else ''}"
            )
        lines.append(f"| {NAMES.get(src, src)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each cell: accuracy [interval], change from the target; `*` marks a change whose "
        f"paired interval excludes 0 ({r['moved']} of {len(r['table'])} conditions).",
        "",
        "## Pair sources",
        "",
        "| source | Jaccard (mean / median) | Levenshtein chars (mean / median) | chosen right | "
        "rejected right |",
        "| --- | --- | --- | --- | --- |",
    ]
    for src, c in r["contrastiveness"].items():
        lines.append(
            f"| {NAMES.get(src, src)} | {c['jaccard']:.3f} / {c['jaccard_median']:.3f} | "
            f"{c['levenshtein']:.1f} / {c['levenshtein_median']:.1f} | "
            f"{c['chosen_correct']:.2f} | {c['rejected_correct']:.2f} |"
        )
    lines += ["", "## The paper's claims at this scale", ""]
    lines += _claim_lines(
        "(i) Contrastive CLAIR pairs teach more than the other sources",
        r["claims"]["contrastive"],
        "CLAIR minus {k}",
    )
    lines += _claim_lines(
        "(ii) The prescribed APO variant beats less controllable objectives",
        r["claims"]["anchored"],
        "prescribed APO minus {k}",
    )
    if r.get("rounds"):
        lines += _round_lines(r["rounds"])
    if "real" in r:
        lines += _real_tables(r)
    lines += [
        "## Figures",
        "",
        f"![log-probs]({r['figures']['logps']})",
        "",
        f"![contrastiveness]({r['figures']['contrastiveness']})",
        "",
    ]
    return "\n".join(lines)


def _round_lines(rounds_: list[dict[str, Any]]) -> list[str]:
    """The rounds section: each round against the model it started from, and the verdict."""
    obj = NAMES[rounds_[0]["objective"]]
    lines = [
        "## CLAIR rounds",
        "",
        f"Round 1 is the CLAIR cell trained with {obj} (the prescribed variant), seed 0; each "
        "later round takes the previous round's model as the target, samples it again on the "
        "same pair prompts, revises with the same reviser, re-runs the reference pass on its "
        f"weights and trains {obj} with the same settings. Intervals are over held-out "
        "prompts (one seed).",
        "",
        "| round | pairs | chosen right | started from | accuracy | change |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for e in rounds_:
        lines.append(
            f"| {e['round']} | {e['pairs']} | {e['chosen_correct']:.2f} | "
            f"{e['target_accuracy']:.3f} | {e['accuracy']:.3f} {_ci(e['ci95'])} | "
            f"{e['delta']:+.3f} {_ci(e['delta_ci95'])} |"
        )
    for e in rounds_[1:]:
        lo, hi = e["delta_ci95"]
        word = "adds" if lo > 0 else "takes away" if hi < 0 else "makes no change measurable here"
        lines.append(
            f"\n**Round {e['round']} {word}**: {e['delta']:+.3f} {_ci(e['delta_ci95'])} "
            f"over round {e['round'] - 1}."
        )
    return lines + [""]


def _claim_lines(title: str, claim: dict[str, Any], label: str) -> list[str]:
    out = [f"**{title}: {claim['verdict']}.**", ""]
    if "why" in claim:
        out.append(f"Not measurable in this grid: {claim['why']}.")
    if claim.get("expected"):
        out.append(
            "Prescribed variant per source (chosen answers right more often than the "
            "target: APO-zero, else APO-down): "
            + ", ".join(f"{NAMES.get(k, k)} {NAMES[v]}" for k, v in claim["expected"].items())
            + "."
        )
    for k, c in claim["comparisons"].items():
        out.append(f"- {label.format(k=NAMES.get(k, k))}: {c['diff']:+.3f} {_ci(c['ci95'])}")
    return out + [""]


def _times(t: dict[str, Any]) -> str:
    return (
        f"Step times when run: world {t['world']:.0f} s, target {t['target']:.0f} s, pairs "
        f"{t['pairs']:.0f} s, {t['cells']} cells {t['cell_mean']:.0f} s each. The full default "
        f"grid (4 sources x 4 objectives x 3 seeds, world, target and pairs counted twice for "
        f"their larger sizes) would take about {t['full_grid_estimate'] / 60:.0f} min on this "
        "machine at that pace."
    )


def _real_header(r: dict[str, Any]) -> list[str]:
    """Setup of a real-target run: target, machine, command, families, cells, phases."""
    s, b, x = r["settings"], r["baseline"], r["real"]
    m, sc = x["machine"], x["screen"]
    tuning = "full fine-tuning" if s["full"] else f"LoRA rank {s['lora_rank']} (base as reference)"
    fams = ", ".join(
        f"{f} {v:.2f}{'' if f in sc['kept'] else ' (dropped)'}"
        for f, v in sc["val_accuracy"].items()
    )
    lines = [
        "# Lab report: the paper's experiment on a real instruct model",
        "",
        f"Target: `{s['model']}` (HF directory `{s['target_hf']}`). Commit `{m['commit']}`; "
        f"CPU: {m['cpu']}, {m['cores']} cores; load average {m['load_start']} at the start and "
        f"{m['load']} at the end (the machine is shared).",
        "",
        f"Command: `{x['command']}`",
        "",
        f"Families (target's greedy validation accuracy, kept in ({s['low']}, {s['high']})): "
        f"{fams}. Held out (no pairs): **{sc['heldout']}**. Pair prompts: {sc['pair_prompts']} "
        f"from {', '.join(sc['trained'])}.",
        "",
        f"Target's greedy test accuracy (strict checker `final_number`): **{b['accuracy']:.3f}** "
        f"{_ci(b['ci95'])} on {b['prompts']} test prompts; per family: "
        + ", ".join(f"{f} {v:.3f}" for f, v in x["target_families"].items())
        + ".",
        "",
        f"Every cell: {tuning}, {s['steps']} steps of batch {s['batch_size']} "
        f"({s['steps'] * s['batch_size']} pair presentations), learning rate {s['lr']:g} "
        f"({x['lr']['how']}), beta {s['beta']:g}; {r['pairs_per_source']} pairs per source on the "
        f"same prompts; {s['seeds']} seed(s); greedy answers of at most {s['max_new_tokens']} "
        "tokens.",
        "",
        f"Wall time {r['seconds'] / 60:.1f} min ({r['steps_run']} of {r['steps_total']} steps run "
        "here, the rest cached). Phase times (as run): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in x["phases"].items())
        + ".",
        "",
    ]
    if x["lr"].get("sweep"):
        lines += [
            "Learning-rate sweep (validation accuracy): "
            + ", ".join(f"{k}: {v['val_accuracy']:.3f}" for k, v in x["lr"]["sweep"].items())
            + ".",
            "",
        ]
    return lines


def _real_tables(r: dict[str, Any]) -> list[str]:
    """Per-family accuracy and text statistics of every cell."""
    fams = list(r["real"]["target_families"])
    held = r["real"]["screen"]["heldout"]
    lines = [
        "## Per family, length and repetition",
        "",
        f"Accuracy per family (held-out family: {held}); mean response length in words; share "
        "of responses with a word 3-gram repeated three times or more.",
        "",
        "| model | " + " | ".join(fams) + " | words | repetitive |",
        "| --- |" + " --- |" * (len(fams) + 2),
    ]
    t = r["text"]["target"]
    lines.append(
        "| target | "
        + " | ".join(f"{r['real']['target_families'][f]:.3f}" for f in fams)
        + f" | {t['mean_words']:.1f} | {t['repetition_rate']:.3f} |"
    )
    for c in r["conditions"]:
        name = f"{c['dataset']}/{c['objective']}/s{c['seed']}"
        t = r["text"][name]
        lines.append(
            f"| {NAMES.get(c['dataset'], c['dataset'])} {NAMES.get(c['objective'])} "
            f"s{c['seed']} | "
            + " | ".join(f"{c['families'].get(f, 0):.3f}" for f in fams)
            + f" | {t['mean_words']:.1f} | {t['repetition_rate']:.3f} |"
        )
    return lines + [""]
