"""Contrastiveness statistics of preference pairs: token-level Jaccard and character Levenshtein.

Jaccard similarity is over *sets* of tokens (|A & B| / |A | B|), as in the APO/CLAIR paper's
token-level measure. Which tokens: tokenizer token ids when a tokenizer is known (prepared shard
dirs, or ``--tokenizer``), else word tokens (``\\w+`` runs and single punctuation marks). The
Levenshtein distance is the character-level edit distance (rapidfuzz) between the two answers.

Command: ``python -m apo_jax.data.stats --input=PATH [--tokenizer=DIR] [--out=DIR]``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
from absl import flags

from apo_jax import commands, errors

_WORD = re.compile(r"\w+|[^\w\s]")
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def word_tokens(text: str) -> list[str]:
    """Splits text into word tokens: runs of word characters and single punctuation marks."""
    return _WORD.findall(text)


def jaccard(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Returns |set(a) & set(b)| / |set(a) | set(b)| (1.0 when both are empty)."""
    sa, sb = set(a), set(b)
    union = len(sa | sb)
    return 1.0 if union == 0 else len(sa & sb) / union


def levenshtein(a: str | Sequence[Hashable], b: str | Sequence[Hashable]) -> int:
    """Returns the edit distance (insert/delete/substitute, cost 1) between two strings or sequences."""
    from rapidfuzz.distance import Levenshtein

    return int(Levenshtein.distance(a, b))


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Returns count, mean, min, max and quantiles of a list of numbers (None fields when empty)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return {"count": 0, "mean": None, "min": None, "max": None}
    out: dict[str, Any] = {
        "count": int(x.size),
        "mean": float(x.mean()),
        "min": float(x.min()),
        "max": float(x.max()),
    }
    for q, v in zip(QUANTILES, np.quantile(x, QUANTILES), strict=True):
        out["median" if q == 0.5 else f"p{round(q * 100)}"] = float(v)
    return out


def _raw_pairs(path: str, split: str) -> tuple[list[tuple[int, str, str]], int]:
    from apo_jax.data import ingest, schema

    pairs, skipped = [], 0
    for raw in ingest.read_rows(path, split=split):
        pair = ingest.parse_row(raw, schema.FieldMap())
        if isinstance(pair, schema.Reject):
            skipped += 1
        else:
            pairs.append((pair.source_index, pair.chosen, pair.rejected))
    return pairs, skipped


def _shard_pairs(
    shard_dir: str, tokenizer_dir: str | None
) -> tuple[list[dict[str, Any]], str, str]:
    """Per-pair stats of a prepared dir; Jaccard on token ids, Levenshtein on decoded text."""
    import os

    from apo_jax.data import shards, tokenize

    manifest = shards.read_manifest(shard_dir)
    if shards.record_kind(manifest) == "unpaired":
        raise StatsError(
            f"{shard_dir} holds unpaired records: contrastiveness compares the two "
            "completions of a pair; run it on the pair data instead"
        )
    tok_dir = tokenizer_dir or manifest["tokenizer"]["dir"]
    tok = tokenize.load_tokenizer(tok_dir) if os.path.isdir(tok_dir) else None
    rows = []
    for i, rec in enumerate(shards.read_records(shard_dir)):
        c, r = rec.chosen.tolist(), rec.rejected.tolist()
        if tok is not None:
            ct, rt = (tok.decode(x, skip_special_tokens=True) for x in (c, r))
            lev = levenshtein(ct, rt)
        else:
            lev = levenshtein(c, r)
        rows.append(
            {
                "index": i,
                "source_index": rec.source_index,
                "jaccard": jaccard(c, r),
                "levenshtein": lev,
            }
        )
    return rows, "tokenizer", "chars" if tok is not None else "tokens (tokenizer not found)"


def pair_stats(
    path: str, *, tokenizer_dir: str | None = None, out_dir: str | None = None, split: str = "train"
) -> dict[str, Any]:
    """Contrastiveness of every pair in a raw pair file or a prepared shard dir, and aggregates.

    Args:
      path: a pair file/dataset (anything `prepare` reads) or a prepared shard directory.
      tokenizer_dir: for raw pairs, Jaccard over this tokenizer's tokens instead of word tokens;
        for shard dirs, the tokenizer that decodes text for Levenshtein (default: the manifest's).
      out_dir: when given, writes ``pair_stats.jsonl``, ``summary.json`` and ``histograms.png``.
      split: split for DatasetDicts and hub datasets.

    Returns:
      {"path", "jaccard_tokens", "levenshtein_unit", "count", "skipped", "jaccard": summary,
       "levenshtein": summary, "per_pair": [{"index", "source_index", "jaccard", "levenshtein"}]}.
    """
    import json
    import os

    from apo_jax.data import shards

    skipped = 0
    if os.path.isdir(path) and os.path.exists(os.path.join(path, shards.MANIFEST)):
        rows, unit_j, unit_l = _shard_pairs(path, tokenizer_dir)
    else:
        encode = word_tokens
        unit_j, unit_l = "word", "chars"
        if tokenizer_dir:
            from apo_jax.data import tokenize

            backend = tokenize.load_tokenizer(tokenizer_dir).backend_tokenizer
            encode, unit_j = (
                (lambda s: backend.encode(s, add_special_tokens=False).ids),
                "tokenizer",
            )
        pairs, skipped = _raw_pairs(path, split)
        rows = [
            {
                "index": i,
                "source_index": src,
                "jaccard": jaccard(encode(c), encode(r)),
                "levenshtein": levenshtein(c, r),
            }
            for i, (src, c, r) in enumerate(pairs)
        ]
    result = {
        "path": path,
        "jaccard_tokens": unit_j,
        "levenshtein_unit": unit_l,
        "count": len(rows),
        "skipped": skipped,
        "jaccard": summarize([r["jaccard"] for r in rows]),
        "levenshtein": summarize([r["levenshtein"] for r in rows]),
        "per_pair": rows,
    }
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "pair_stats.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump({k: v for k, v in result.items() if k != "per_pair"}, f, indent=2)
        result["histogram"] = plot_histograms(
            rows, os.path.join(out_dir, "histograms.png"), unit_j, unit_l
        )
    return result


def plot_histograms(rows: list[dict[str, Any]], png_path: str, unit_j: str, unit_l: str) -> str:
    """Writes side-by-side histograms of Jaccard similarity and Levenshtein distance; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_j, ax_l) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_j.hist([r["jaccard"] for r in rows], bins=40, range=(0, 1), color="tab:blue")
    ax_j.set(xlabel=f"Jaccard similarity ({unit_j} tokens)", ylabel="pairs")
    ax_l.hist([r["levenshtein"] for r in rows], bins=40, color="tab:orange")
    ax_l.set(xlabel=f"Levenshtein distance ({unit_l})", ylabel="pairs")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


class StatsError(errors.UserError):
    """An input whose statistics cannot be computed (an unreadable manifest or file)."""


def _flag_values() -> flags.FlagValues:
    fv = flags.FlagValues()
    kw = {"flag_values": fv}
    flags.DEFINE_string("input", None, "raw pair file or dataset, or a prepared shard dir", **kw)
    flags.DEFINE_string("tokenizer", None, "Jaccard over this tokenizer's tokens (raw pairs)", **kw)
    flags.DEFINE_string("out", None, "dir for pair_stats.jsonl, summary.json, histograms.png", **kw)
    flags.DEFINE_string("split", "train", "split of a DatasetDict or hub dataset", **kw)
    flags.mark_flag_as_required("input", flag_values=fv)
    return fv


def _print_table(res: dict[str, Any]) -> None:
    print(f"{res['count']} pairs ({res['skipped']} unreadable skipped) from {res['path']}")
    for name, unit in (
        ("jaccard", res["jaccard_tokens"] + " tokens"),
        ("levenshtein", res["levenshtein_unit"]),
    ):
        s = res[name]
        if s["count"]:
            print(
                f"{name:12s} [{unit}] mean {s['mean']:.3f} median {s['median']:.3f} "
                f"p10 {s['p10']:.3f} p90 {s['p90']:.3f} min {s['min']:.3f} max {s['max']:.3f}"
            )


def run(argv: Sequence[str]) -> int:
    """Parses the flags, computes the statistics and prints the aggregate table.

    Raises:
      UserError: a flag that does not parse, or an input that cannot be read.
    """
    fv = _flag_values()
    usage = "python -m apo_jax.data.stats --input=PATH [--tokenizer=DIR] [--out=DIR]"
    if commands.parse(fv, argv, usage, __doc__.splitlines()[0])[1:]:
        raise commands.FlagError(f"unexpected arguments {list(argv)[1:]}: use --input=PATH")
    try:
        res = pair_stats(fv.input, tokenizer_dir=fv.tokenizer, out_dir=fv.out, split=fv.split)
    except (OSError, ValueError, KeyError) as e:
        raise StatsError(
            f"{fv.input}: cannot compute statistics ({type(e).__name__}: {e})"
        ) from None
    _print_table(res)
    if fv.out:
        print(f"wrote {fv.out}/pair_stats.jsonl, summary.json, histograms.png")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command: :func:`run` under :func:`apo_jax.errors.guard` (one-line errors, exit 2)."""
    return errors.guard(lambda: run(sys.argv if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
