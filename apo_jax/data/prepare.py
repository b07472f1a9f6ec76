"""Raw preference pairs -> tokenized ArrayRecord shards, rejects.jsonl and manifest.json.

Unpaired rows (TRL's KTO layout: ``prompt``, ``completion``, ``label``) are recognized by their
fields (or ``records="unpaired"``) and written as unpaired records with their KL completions
(:mod:`apo_jax.data.unpaired`), with the same rejects and manifest.

Command: ``python -m apo_jax.data.prepare --input=pairs.jsonl --tokenizer=TOKDIR --out=shards/``.
Python: ``prepare(inputs, tokenizer_dir, out_dir, Settings(...)) -> manifest dict``.
Workers tokenize chunks of rows; the main process writes results in input order, so the output
is the same for any worker count. Memory stays bounded whatever the rows hold: a JSONL line over
``max_row_bytes`` is skipped unread, text that cannot fit ``max_length`` is rejected before it is
tokenized, and the rows in flight are capped in bytes as well as in number.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from absl import flags

from apo_jax import commands, errors
from apo_jax.data import ingest, schema, shards, stats, tokenize
from apo_jax.data import unpaired as unpaired_lib

FORMAT = "apo_jax.pairs/v2"  # v2: shard entries carry bytes and sample_sha256
CHUNK_BYTES = 64 << 20  # raw bytes of rows per worker task, at most
STAGING_PREFIX = ".prepare-"  # out_dir/.prepare-<pid>: a prepare in progress, moved in when done


class PrepareError(errors.UserError):
    """Prepare cannot go on: a row rejected under ``strict`` (the message names the file, line,
    field and reason), or a file it cannot read or write."""


class SettingsError(errors.UserError, ValueError):
    """A :class:`Settings` field out of range; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What `prepare` does to the rows; recorded in the manifest."""

    max_length: int = 2048  # prompt + completion tokens per row, for each side
    max_prompt_length: int | None = None  # None: only max_length limits the prompt
    truncation: str = "none"  # none | keep_start | keep_end (of the prompt)
    fields: schema.FieldMap = schema.FieldMap()
    split: str = "train"  # for DatasetDicts and hub datasets
    records_per_shard: int = 10_000
    max_row_bytes: int = 64 << 20  # a JSONL line longer than this is rejected unread
    workers: int = 0  # 0: tokenize in this process
    chunk_size: int = 256  # rows per worker task
    strict: bool = False  # any reject is fatal
    progress: bool = False  # tqdm bar on stderr
    records: str = "auto"  # auto (from the first row's fields) | pairs | unpaired
    kl_group: int = 8  # unpaired: KL completions rotate within groups of this many records

    def __post_init__(self):
        if self.records not in ("auto", *unpaired_lib.RECORDS):
            raise SettingsError(f"--records must be auto, pairs or unpaired, got {self.records!r}")
        if self.truncation not in ("none", "keep_start", "keep_end"):
            raise SettingsError(
                f"--truncation must be none, keep_start or keep_end, got {self.truncation!r}"
            )
        if self.max_length < 2:
            raise SettingsError(f"--max_length must be >= 2, got {self.max_length}")
        for name in ("records_per_shard", "max_row_bytes", "chunk_size", "kl_group"):
            if getattr(self, name) < 1:
                raise SettingsError(f"--{name} must be >= 1, got {getattr(self, name)}")


def _process_chunk(
    tokenizer_dir: str, settings: Settings, rows: list[ingest.RawRow]
) -> list[tuple]:
    """Worker: validates and tokenizes rows; returns ("ok", ...) or ("reject", Reject) per row.

    A row that raises anything (a lone surrogate, nesting past the recursion limit, ...) becomes
    a reject naming the exception: one row never ends a prepare."""
    tok = tokenize.load_tokenizer(tokenizer_dir)
    out = []
    for raw in rows:
        try:
            out.append(_process_row(tok, settings, raw))
        except Exception as e:  # noqa: BLE001 - any failure of one row is that row's reject
            out.append(
                ("reject", schema.reject_of_exception(raw.source_index, raw.file, raw.line, e))
            )
    return out


def _process_row(tok: Any, settings: Settings, raw: ingest.RawRow) -> tuple:
    """("ok", record, similarity) or ("reject", Reject) for one row."""
    if settings.records == "unpaired":
        lengths = dict(
            max_length=settings.max_length,
            truncation=settings.truncation,
            max_prompt_length=settings.max_prompt_length,
        )
        return unpaired_lib.encode_row(tok, raw, settings.fields, **lengths)
    pair = ingest.parse_row(raw, settings.fields)
    if isinstance(pair, schema.Reject):
        return ("reject", pair)
    try:
        p, c, r = tokenize.encode_pair(
            tok,
            pair,
            max_length=settings.max_length,
            max_prompt_length=settings.max_prompt_length,
            truncation=settings.truncation,
        )
    except schema.RowError as e:
        reject = schema.Reject(raw.source_index, raw.file, raw.line, e.field, e.reason, e.detail)
        return ("reject", reject)
    sim = (stats.jaccard(c.tolist(), r.tolist()), stats.levenshtein(pair.chosen, pair.rejected))
    return ("ok", shards.PairRecord(p, c, r, raw.source_index), sim)


def _payload_bytes(raw: ingest.RawRow) -> int:
    return len(raw.payload) if isinstance(raw.payload, bytes) else 0


def _chunks(rows: Iterable[ingest.RawRow], size: int) -> Iterable[list[ingest.RawRow]]:
    """Chunks of at most ``size`` rows and about CHUNK_BYTES raw bytes (at least one row)."""
    chunk, nbytes = [], 0
    for raw in rows:
        chunk.append(raw)
        nbytes += _payload_bytes(raw)
        if len(chunk) >= size or nbytes >= CHUNK_BYTES:
            yield chunk
            chunk, nbytes = [], 0
    if chunk:
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
    pool = concurrent.futures.ProcessPoolExecutor(
        settings.workers, mp_context=ctx, initializer=_ignore_sigint
    )
    try:
        window: collections.deque = collections.deque()
        for chunk in chunks:
            window.append(pool.submit(_process_chunk, tokenizer_dir, settings, chunk))
            if len(window) >= 2 * settings.workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:  # on Ctrl-C (or any error) the queued chunks are dropped, not waited for
        pool.shutdown(wait=True, cancel_futures=True)


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the main process (which reports it in one line), so they print
    no traceback of their own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _clear_outputs(out_dir: str) -> None:
    """Removes a previous prepare's manifest (first), shards and rejects from ``out_dir``."""
    for name in (shards.MANIFEST, shards.REJECTS):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    for path in glob.glob(os.path.join(out_dir, shards.SHARD_PATTERN)):
        os.remove(path)


def check_out_dir(out_dir: str, overwrite: bool) -> None:
    """The command's rule: a non-empty ``--out`` is replaced only with ``--overwrite``.

    Raises:
      PrepareError: ``out_dir`` holds files and ``overwrite`` is False.
    """
    if overwrite or not os.path.isdir(out_dir):
        return
    held = sorted(n for n in os.listdir(out_dir) if not n.startswith(STAGING_PREFIX))
    if held:
        raise PrepareError(
            f"--out={out_dir} is not empty (it holds {held[0]}"
            + (f" and {len(held) - 1} more" if len(held) > 1 else "")
            + "): pass --overwrite to replace its shards, or choose another --out"
        )


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


@dataclasses.dataclass
class _Tally:
    """What the writing loop counts: rows read, rejects by reason, lengths, contrastiveness."""

    read: int = 0
    by_reason: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    lengths: dict[str, list[int]] = dataclasses.field(
        default_factory=lambda: {
            k: [] for k in ("prompt", "chosen", "rejected", "row_max", "prefix_row")
        }
    )
    jaccard: list[float] = dataclasses.field(default_factory=list)
    levenshtein: list[int] = dataclasses.field(default_factory=list)
    labels: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def add_unpaired(self, rec: shards.UnpairedRecord) -> None:
        p, c, k = len(rec.prompt), len(rec.completion), len(rec.kl_completion)
        for key, n in (
            ("prompt", p),
            ("completion", c),
            ("kl_completion", k),
            ("row_max", p + max(c, k)),
            ("prefix_row", p + c + k),
        ):
            self.lengths.setdefault(key, []).append(n)
        self.labels[rec.label] += 1

    def add(self, rec: shards.PairRecord, jaccard: float, levenshtein: int) -> None:
        p, c, r = len(rec.prompt), len(rec.chosen), len(rec.rejected)
        for key, n in (
            ("prompt", p),
            ("chosen", c),
            ("rejected", r),
            ("row_max", p + max(c, r)),
            ("prefix_row", p + c + r),
        ):
            self.lengths[key].append(n)
        self.jaccard.append(jaccard)
        self.levenshtein.append(levenshtein)


def _write(
    tokenizer_dir: str,
    settings: Settings,
    rows: Iterable[ingest.RawRow],
    writer: shards.ShardWriter,
) -> _Tally:
    """Tokenizes the rows, writes records to ``writer`` and rejects to rejects.jsonl."""
    from tqdm import tqdm

    tally = _Tally()
    unpaired = settings.records == "unpaired"
    if unpaired:
        tally.lengths = {
            k: [] for k in ("prompt", "completion", "kl_completion", "row_max", "prefix_row")
        }
    bar = tqdm(desc="prepare", unit="row" if unpaired else "pair", disable=not settings.progress)
    rejects_path = os.path.join(writer.out_dir, shards.REJECTS)
    with open(rejects_path, "w", encoding="utf-8", errors="backslashreplace") as rejects:

        def accepted() -> Iterable[tuple]:
            for chunk in _results(tokenizer_dir, settings, rows):
                for item in chunk:
                    tally.read += 1
                    if item[0] == "ok":
                        yield item
                        continue
                    rej = item[1]
                    if settings.strict:
                        raise PrepareError(
                            f"{rej.file}:{rej.line}: {rej.field}: {rej.reason} {rej.detail}".strip()
                            + " (--strict)"
                        )
                    tally.by_reason[rej.reason] += 1
                    rejects.write(json.dumps(rej.to_json(), ensure_ascii=False) + "\n")
                bar.update(len(chunk))

        if unpaired:
            examples = (item[1] for item in accepted())
            for rec in unpaired_lib.with_kl(examples, settings.kl_group, settings.max_length):
                writer.write(rec)
                tally.add_unpaired(rec)
        else:
            for item in accepted():
                writer.write(item[1])
                tally.add(item[1], *item[2])
    bar.close()
    return tally


def prepare(
    inputs: str | Sequence[str], tokenizer_dir: str, out_dir: str, settings: Settings | None = None
) -> dict[str, Any]:
    """Tokenizes preference pairs into shards; returns the manifest (also written to out_dir).

    Args:
      inputs: files (.jsonl/.jsonl.gz/.json/.parquet), `save_to_disk` dirs or hub dataset names.
      tokenizer_dir: a local Hugging Face tokenizer directory with a chat template.
      out_dir: where shards, rejects.jsonl and manifest.json go (old ones are replaced, once the
        new ones are complete: they are written under ``out_dir/.prepare-<pid>`` and moved in;
        a failure, a full disk included, leaves the old ones as they were).
      settings: length policy, field names, workers; defaults to ``Settings()``.

    Raises:
      ingest.InputError: an input cannot be read at all.
      tokenize.TokenizerError: the tokenizer is missing or has no chat template.
      PrepareError: a row was rejected and ``settings.strict`` is set, or ``out_dir`` cannot be
        written.
    """
    from apo_jax.models.convert import resolve_model_path

    settings = settings or Settings()
    tokenizer_dir = resolve_model_path(tokenizer_dir)  # a .gguf file: its converted directory
    inputs = ingest.check_inputs(inputs)
    tok_info = _tokenizer_info(tokenizer_dir)  # fail fast on a bad tokenizer
    rows = ingest.read_rows(inputs, split=settings.split, max_row_bytes=settings.max_row_bytes)
    if settings.records == "auto":
        kind, rows = unpaired_lib.detect(rows, settings.fields)
        settings = dataclasses.replace(settings, records=kind)
    start = time.perf_counter()
    staging = os.path.join(out_dir, f"{STAGING_PREFIX}{os.getpid()}")
    try:
        os.makedirs(out_dir, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        writer = shards.ShardWriter(staging, settings.records_per_shard)
        try:
            tally = _write(tokenizer_dir, settings, rows, writer)
        finally:
            paths = writer.close()
        manifest = {
            "format": FORMAT,
            "records": settings.records,
            "record_layout": _RECORD_LAYOUTS[settings.records],
            "inputs": [os.path.abspath(p) if os.path.exists(p) else p for p in inputs],
            "tokenizer": tok_info,
            "settings": _settings_json(settings),
            "counts": {
                "read": tally.read,
                "written": writer.count,
                "rejected": sum(tally.by_reason.values()),
                "rejected_by_reason": dict(sorted(tally.by_reason.items())),
            },
            "shards": _shard_entries(paths, settings.records_per_shard, writer.count),
            "lengths": {k: stats.summarize(v) for k, v in tally.lengths.items()},
            **_record_stats(tally, settings.records),
            "seconds": round(time.perf_counter() - start, 3),
            "shard_fingerprint": shards.shard_fingerprint(staging) if paths else None,
        }
        errors.check_interrupted()  # a Ctrl-C lost on its way up still publishes nothing
        _write_manifest(staging, manifest)
        _publish(staging, out_dir)
    except OSError as e:
        raise PrepareError(
            f"{_final_name(e.filename, staging, out_dir)}: {e.strerror or e}; nothing was "
            f"replaced in {out_dir} (its previous shards, if any, are as they were)"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _final_name(filename: Any, staging: str, out_dir: str) -> str:
    """The file an error names, as it would have been called in ``out_dir``."""
    if not filename:
        return out_dir
    name = str(filename)
    return os.path.join(out_dir, os.path.basename(name)) if name.startswith(staging) else name


def _publish(staging: str, out_dir: str) -> None:
    """Moves a finished directory's files from ``staging`` into ``out_dir``, replacing the old
    outputs: the old manifest goes first and the new one comes last, so ``out_dir`` holds a
    manifest only when its shards are complete. Renames within one directory need no space."""
    _clear_outputs(out_dir)
    names = sorted(os.listdir(staging))
    for name in [n for n in names if n != shards.MANIFEST] + [shards.MANIFEST]:
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))


_RECORD_LAYOUTS = {
    "pairs": "int64[4] (source_index, n_prompt, n_chosen, n_rejected) + int32 ids",
    "unpaired": "int64[6] (-2, source_index, n_prompt, n_completion, n_kl, label) + int32 ids",
}


def _record_stats(tally: _Tally, records: str) -> dict[str, Any]:
    if records == "unpaired":
        return {"labels": {"desirable": tally.labels[True], "undesirable": tally.labels[False]}}
    return {
        "contrastiveness": {
            "jaccard_tokens": stats.summarize(tally.jaccard),
            "levenshtein_chars": stats.summarize(tally.levenshtein),
        }
    }


def _write_manifest(out_dir: str, manifest: dict[str, Any]) -> None:
    path = os.path.join(out_dir, shards.MANIFEST)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
    os.replace(path + ".tmp", path)  # a manifest exists only for a finished directory


def _settings_json(settings: Settings) -> dict[str, Any]:
    d = dataclasses.asdict(settings)
    for key in ("workers", "progress", "chunk_size"):  # do not change the output
        d.pop(key)
    return d


def _shard_entries(paths: list[str], per_shard: int, total: int) -> list[dict[str, Any]]:
    counts = [min(per_shard, total - i * per_shard) for i in range(len(paths))]
    return [shards.shard_entry(p, n) for p, n in zip(paths, counts, strict=True)]


def summary_line(manifest: dict[str, Any]) -> str:
    """One line: read = written + rejected, with reasons."""
    c = manifest["counts"]
    reasons = ", ".join(f"{k}={v}" for k, v in c["rejected_by_reason"].items()) or "none"
    return f"read {c['read']} = written {c['written']} + rejected {c['rejected']} ({reasons})"


def _flag_values() -> flags.FlagValues:
    fv = flags.FlagValues()
    d, kw = Settings(), {"flag_values": fv}
    flags.DEFINE_multi_string(
        "input",
        None,
        "pair file (.jsonl, .jsonl.gz, .json, .parquet), save_to_disk dir or hub name",
        **kw,
    )
    flags.DEFINE_string(
        "tokenizer", None, "HF tokenizer dir with a chat template, or a .gguf file", **kw
    )
    flags.DEFINE_string("out", None, "output dir: shards, manifest.json, rejects.jsonl", **kw)
    flags.DEFINE_integer("max_length", d.max_length, "prompt + completion tokens, each side", **kw)
    flags.DEFINE_integer("max_prompt_length", None, "prompt tokens at most (default: none)", **kw)
    flags.DEFINE_enum(
        "truncation",
        d.truncation,
        ["none", "keep_start", "keep_end"],
        "a too long prompt: reject it (none), keep its start or its end",
        **kw,
    )
    flags.DEFINE_string("prompt_field", d.fields.prompt, "input field of the prompt", **kw)
    flags.DEFINE_string("chosen_field", d.fields.chosen, "input field of the chosen side", **kw)
    flags.DEFINE_string(
        "rejected_field", d.fields.rejected, "input field of the rejected side", **kw
    )
    flags.DEFINE_string("system_field", None, "input field of a system prompt, put first", **kw)
    flags.DEFINE_string("split", d.split, "split of a DatasetDict or hub dataset", **kw)
    flags.DEFINE_integer("records_per_shard", d.records_per_shard, "records per shard file", **kw)
    flags.DEFINE_integer(
        "max_row_bytes",
        d.max_row_bytes,
        "a longer JSONL line is rejected unread (too_many_bytes)",
        **kw,
    )
    flags.DEFINE_integer(
        "workers",
        min(8, os.cpu_count() or 1),
        "tokenizer processes (0: tokenize in this one)",
        **kw,
    )
    flags.DEFINE_bool("strict", False, "stop at the first rejected row (exit 2)", **kw)
    flags.DEFINE_enum(
        "records",
        d.records,
        ["auto", "pairs", "unpaired"],
        "pairs (prompt/chosen/rejected) or unpaired (prompt/completion/label); "
        "auto: from the first row's fields",
        **kw,
    )
    flags.DEFINE_integer(
        "kl_group",
        d.kl_group,
        "unpaired: records per KL rotation group (TRL: the per-device batch size)",
        **kw,
    )
    flags.DEFINE_string("completion_field", d.fields.completion, "unpaired: completion field", **kw)
    flags.DEFINE_string("label_field", d.fields.label, "unpaired: bool label field", **kw)
    flags.DEFINE_bool("progress", True, "show a progress bar on stderr", **kw)
    flags.DEFINE_bool("overwrite", False, "replace the shards of a non-empty --out", **kw)
    for name in ("input", "tokenizer", "out"):
        flags.mark_flag_as_required(name, flag_values=fv)
    return fv


def run(argv: Sequence[str]) -> int:
    """Parses the flags, prepares the shards and prints the summary; returns the exit status.

    Raises:
      UserError: a flag, input or tokenizer problem, or a reject under ``--strict``.
    """
    fv = _flag_values()
    usage = "python -m apo_jax.data.prepare --input=PATH --tokenizer=DIR --out=DIR [flags]"
    if commands.parse(fv, argv, usage, __doc__.splitlines()[0])[1:]:
        raise commands.FlagError(f"unexpected arguments {list(argv)[1:]}: use --input=PATH")
    fields = schema.FieldMap(
        fv.prompt_field,
        fv.chosen_field,
        fv.rejected_field,
        fv.system_field,
        fv.completion_field,
        fv.label_field,
    )
    settings = Settings(
        max_length=fv.max_length,
        max_prompt_length=fv.max_prompt_length,
        truncation=fv.truncation,
        fields=fields,
        split=fv.split,
        records_per_shard=fv.records_per_shard,
        max_row_bytes=fv.max_row_bytes,
        workers=fv.workers,
        strict=fv.strict,
        progress=fv.progress,
        records=fv.records,
        kl_group=fv.kl_group,
    )
    check_out_dir(fv.out, fv.overwrite)
    manifest = prepare(fv.input, fv.tokenizer, fv.out, settings)
    print(summary_line(manifest))
    print(f"shards in {fv.out}; rejects in {os.path.join(fv.out, shards.REJECTS)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command: :func:`run` under :func:`apo_jax.errors.guard` (one-line errors, exit 2)."""
    return errors.guard(lambda: run(sys.argv if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
