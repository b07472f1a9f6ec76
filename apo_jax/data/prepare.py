"""Raw preference pairs -> tokenized ArrayRecord shards, rejects.jsonl and manifest.json.

Run: ``python -m apo_jax.data.prepare --input pairs.jsonl --tokenizer TOKDIR --out shards/``.
Python: ``prepare(inputs, tokenizer_dir, out_dir, Settings(...)) -> manifest dict``.
Workers tokenize chunks of rows; the main process writes results in input order, so the output
is the same for any worker count.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from apo_jax.data import ingest, schema, shards, stats, tokenize

FORMAT = "apo_jax.pairs/v1"


class PrepareError(Exception):
    """A fatal problem (a reject under --strict); the message names the row."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What `prepare` does to the rows; recorded in the manifest."""

    max_length: int = 2048  # prompt + completion tokens per row, for each side
    max_prompt_length: int | None = None  # None: only max_length limits the prompt
    truncation: str = "none"  # none | keep_start | keep_end (of the prompt)
    fields: schema.FieldMap = schema.FieldMap()
    split: str = "train"  # for DatasetDicts and hub datasets
    records_per_shard: int = 10_000
    workers: int = 0  # 0: tokenize in this process
    chunk_size: int = 256  # rows per worker task
    strict: bool = False  # any reject is fatal
    progress: bool = False  # tqdm bar on stderr

    def __post_init__(self):
        if self.truncation not in ("none", "keep_start", "keep_end"):
            raise ValueError(
                f"truncation must be none, keep_start or keep_end, got {self.truncation!r}"
            )
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")


def _process_chunk(
    tokenizer_dir: str, settings: Settings, rows: list[ingest.RawRow]
) -> list[tuple]:
    """Worker: validates and tokenizes rows; returns ("ok", ...) or ("reject", Reject) per row."""
    tok = tokenize.load_tokenizer(tokenizer_dir)
    out = []
    for raw in rows:
        pair = ingest.parse_row(raw, settings.fields)
        if isinstance(pair, schema.Reject):
            out.append(("reject", pair))
            continue
        try:
            p, c, r = tokenize.encode_pair(
                tok,
                pair,
                max_length=settings.max_length,
                max_prompt_length=settings.max_prompt_length,
                truncation=settings.truncation,
            )
        except schema.RowError as e:
            out.append(
                (
                    "reject",
                    schema.Reject(
                        raw.source_index, raw.file, raw.line, e.field, e.reason, e.detail
                    ),
                )
            )
            continue
        sim = (stats.jaccard(c.tolist(), r.tolist()), stats.levenshtein(pair.chosen, pair.rejected))
        out.append(("ok", shards.PairRecord(p, c, r, raw.source_index), sim))
    return out


def _chunks(rows: Iterable[ingest.RawRow], size: int) -> Iterable[list[ingest.RawRow]]:
    it = iter(rows)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _jax_backend_started() -> bool:
    """True when JAX has started a backend here (its threads make fork unsafe); grain imports jax."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge._backends)
    except (ImportError, AttributeError):  # private API moved: be safe
        return True


def _results(
    tokenizer_dir: str, settings: Settings, rows: Iterable[ingest.RawRow]
) -> Iterable[list[tuple]]:
    """Yields chunk results in input order, keeping a bounded window of chunks in flight."""
    chunks = _chunks(rows, settings.chunk_size)
    if settings.workers <= 0:
        for chunk in chunks:
            yield _process_chunk(tokenizer_dir, settings, chunk)
        return
    ctx = multiprocessing.get_context("spawn" if _jax_backend_started() else "fork")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no Rust thread pool across fork
    with concurrent.futures.ProcessPoolExecutor(settings.workers, mp_context=ctx) as pool:
        window: collections.deque = collections.deque()
        for chunk in chunks:
            window.append(pool.submit(_process_chunk, tokenizer_dir, settings, chunk))
            if len(window) >= 2 * settings.workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _clear_outputs(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for path in glob.glob(os.path.join(out_dir, shards.SHARD_PATTERN)):
        os.remove(path)
    for name in (shards.MANIFEST, shards.REJECTS):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def _tokenizer_info(tokenizer_dir: str) -> dict[str, Any]:
    tok = tokenize.load_tokenizer(tokenizer_dir)
    try:  # fail once, here, rather than reject every row for a tokenizer-level problem
        tok.apply_chat_template(
            [{"role": "user", "content": "ping"}], tokenize=False, add_generation_prompt=True
        )
    except Exception as e:  # noqa: BLE001 - no template, or a package it needs (jinja2) missing
        raise tokenize.TokenizerError(
            f"{tokenizer_dir}: cannot render its chat template: {type(e).__name__}: {e}"
        ) from None
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return {
        "dir": os.path.abspath(tokenizer_dir),
        "fingerprint": tokenize.tokenizer_fingerprint(tokenizer_dir),
        "class": type(tok).__name__,
        "vocab_size": len(tok),
        "chat_template": tok.chat_template,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_id": int(pad) if pad is not None else 0,
    }


def prepare(
    inputs: str | Sequence[str], tokenizer_dir: str, out_dir: str, settings: Settings | None = None
) -> dict[str, Any]:
    """Tokenizes preference pairs into shards; returns the manifest (also written to out_dir).

    Args:
      inputs: files (.jsonl/.json/.parquet), `save_to_disk` dirs or hub dataset names.
      tokenizer_dir: a local Hugging Face tokenizer directory with a chat template.
      out_dir: where shards, rejects.jsonl and manifest.json go (old ones are replaced).
      settings: length policy, field names, workers; defaults to ``Settings()``.

    Raises:
      ingest.InputError: an input cannot be read at all.
      tokenize.TokenizerError: the tokenizer is missing or has no chat template.
      PrepareError: a row was rejected and ``settings.strict`` is set.
    """
    settings = settings or Settings()
    inputs = ingest.check_inputs(inputs)
    tok_info = _tokenizer_info(tokenizer_dir)  # fail fast on a bad tokenizer
    rows = ingest.read_rows(inputs, split=settings.split)
    _clear_outputs(out_dir)
    start = time.perf_counter()
    writer = shards.ShardWriter(out_dir, settings.records_per_shard)
    by_reason: collections.Counter = collections.Counter()
    lengths: dict[str, list[int]] = {
        "prompt": [],
        "chosen": [],
        "rejected": [],
        "row_max": [],
        "prefix_row": [],
    }
    jac, lev = [], []
    read = 0
    from tqdm import tqdm

    bar = tqdm(desc="prepare", unit="pair", disable=not settings.progress)
    with open(os.path.join(out_dir, shards.REJECTS), "w", encoding="utf-8") as rejects:
        for chunk in _results(tokenizer_dir, settings, rows):
            for item in chunk:
                read += 1
                if item[0] == "reject":
                    rej = item[1]
                    if settings.strict:
                        writer.close()
                        raise PrepareError(
                            f"{rej.file}:{rej.line}: {rej.field}: {rej.reason} {rej.detail}".strip()
                        )
                    by_reason[rej.reason] += 1
                    rejects.write(json.dumps(rej.to_json(), ensure_ascii=False) + "\n")
                    continue
                rec, (j, d) = item[1], item[2]
                writer.write(rec)
                for key, n in (
                    ("prompt", len(rec.prompt)),
                    ("chosen", len(rec.chosen)),
                    ("rejected", len(rec.rejected)),
                ):
                    lengths[key].append(n)
                lengths["row_max"].append(len(rec.prompt) + max(len(rec.chosen), len(rec.rejected)))
                lengths["prefix_row"].append(len(rec.prompt) + len(rec.chosen) + len(rec.rejected))
                jac.append(j)
                lev.append(d)
            bar.update(len(chunk))
    bar.close()
    paths = writer.close()
    seconds = time.perf_counter() - start
    manifest = {
        "format": FORMAT,
        "record_layout": "int64[4] (source_index, n_prompt, n_chosen, n_rejected) + int32 ids",
        "inputs": [os.path.abspath(p) if os.path.exists(p) else p for p in inputs],
        "tokenizer": tok_info,
        "settings": _settings_json(settings),
        "counts": {
            "read": read,
            "written": writer.count,
            "rejected": sum(by_reason.values()),
            "rejected_by_reason": dict(sorted(by_reason.items())),
        },
        "shards": _shard_entries(paths, settings.records_per_shard, writer.count),
        "lengths": {k: stats.summarize(v) for k, v in lengths.items()},
        "contrastiveness": {
            "jaccard_tokens": stats.summarize(jac),
            "levenshtein_chars": stats.summarize(lev),
        },
        "seconds": round(seconds, 3),
    }
    manifest["shard_fingerprint"] = shards.shard_fingerprint(out_dir) if paths else None
    with open(os.path.join(out_dir, shards.MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
    return manifest


def _settings_json(settings: Settings) -> dict[str, Any]:
    d = dataclasses.asdict(settings)
    for key in ("workers", "progress", "chunk_size"):  # do not change the output
        d.pop(key)
    return d


def _shard_entries(paths: list[str], per_shard: int, total: int) -> list[dict[str, Any]]:
    counts = [min(per_shard, total - i * per_shard) for i in range(len(paths))]
    return [
        {"file": os.path.basename(p), "records": n, "sha256": shards.file_sha256(p)}
        for p, n in zip(paths, counts, strict=True)
    ]


def summary_line(manifest: dict[str, Any]) -> str:
    """One line: read = written + rejected, with reasons."""
    c = manifest["counts"]
    reasons = ", ".join(f"{k}={v}" for k, v in c["rejected_by_reason"].items()) or "none"
    return f"read {c['read']} = written {c['written']} + rejected {c['rejected']} ({reasons})"


def _parse_args(argv: Sequence[str] | None) -> Any:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m apo_jax.data.prepare", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--input",
        "-i",
        nargs="+",
        required=True,
        help="JSONL/JSON/Parquet files, dataset dirs or names",
    )
    p.add_argument(
        "--tokenizer", required=True, help="Hugging Face tokenizer directory with a chat template"
    )
    p.add_argument(
        "--out", required=True, help="output directory for shards, manifest.json, rejects.jsonl"
    )
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--max-prompt-length", type=int, default=None)
    p.add_argument("--truncation", choices=("none", "keep_start", "keep_end"), default="none")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--chosen-field", default="chosen")
    p.add_argument("--rejected-field", default="rejected")
    p.add_argument("--system-field", default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--records-per-shard", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--strict", action="store_true", help="any rejected row is fatal")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: prints the summary line; exit 2 on unusable input/tokenizer, 1 on a --strict reject."""
    args = _parse_args(argv)
    try:
        fields = schema.FieldMap(
            args.prompt_field, args.chosen_field, args.rejected_field, args.system_field
        )
        settings = Settings(
            max_length=args.max_length, max_prompt_length=args.max_prompt_length, truncation=args.truncation,
            fields=fields, split=args.split, records_per_shard=args.records_per_shard, workers=args.workers,
            strict=args.strict, progress=not args.no_progress,
        )  # fmt: skip
        manifest = prepare(args.input, args.tokenizer, args.out, settings)
    except (ingest.InputError, tokenize.TokenizerError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PrepareError as e:
        print(f"error (--strict): {e}", file=sys.stderr)
        return 1
    print(summary_line(manifest))
    print(f"shards in {args.out}; rejects in {os.path.join(args.out, shards.REJECTS)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
