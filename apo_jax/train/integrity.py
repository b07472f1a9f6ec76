"""Checks before training that the data, its tokenizer and the model belong together.

- `verify_shards`: every shard file against its manifest (`data.shards.verify`: sizes and the
  hashes of each file's ends by default, every byte with `config.data.verify=full`), so a
  truncated, damaged or swapped shard stops the run in one line naming the file.
- `check_tokenizer`: the shards' tokenizer (the manifest's fingerprint, vocabulary size and
  pad/bos/eos ids) against the model's: the tokenizer saved in the Hugging Face checkpoint when it
  has one (compared token by token when the fingerprints differ), the ids in its config.json, and
  the eval shards' tokenizer. A mismatch is refused in one line.
- `data_identity`: the train and eval shards' fingerprints, recorded in every checkpoint and
  compared on resume (`workdir.check_data`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from typing import Any

from apo_jax.data import shards
from apo_jax.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_MODEL_FILES = ("config.json", "generation_config.json")
log = logging.getLogger("apo_jax")


class TokenizerMismatchError(UserError):
    """The shards were tokenized with another tokenizer than the model's."""


def verify_shards(shard_dirs: tuple[str, ...], mode: str) -> None:
    """`data.shards.verify` on each directory ('fast', 'full'; 'off' skips). Raises ShardError."""
    if mode == "off":
        return
    for d in filter(None, shard_dirs):
        shards.verify(d, full=mode == "full")


def data_identity(train: str, eval_: str) -> dict[str, str]:
    """{"train": fingerprint, "eval": fingerprint or ""} of the shard directories: the manifest's
    `shard_fingerprint` (a sha256 of every shard's bytes, made by prepare; `verify_shards` ties
    the files to the manifest), hashed from the files when the manifest has none."""

    def one(shard_dir: str) -> str:
        if not shard_dir:
            return ""
        return shards.read_manifest(shard_dir).get("shard_fingerprint") or (
            shards.shard_fingerprint(shard_dir)
        )

    return {"train": one(train), "eval": one(eval_)}


def has_tokenizer(directory: str) -> bool:
    return bool(directory) and any(
        os.path.exists(os.path.join(directory, f)) for f in TOKENIZER_FILES
    )


@functools.lru_cache(maxsize=8)
def _identity(directory: str) -> dict[str, Any]:
    """The token-level identity of a tokenizer directory: a hash of its vocabulary (token -> id,
    added tokens included), its size and its special ids, as `data.prepare` records them."""
    from apo_jax.data import tokenize

    tok = tokenize.load_tokenizer(directory)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return {
        "vocab": hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16],
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_id": int(pad) if pad is not None else 0,
    }


def _ids(info: dict[str, Any]) -> dict[str, Any]:
    return {k: info.get(k) for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_id")}


def _differences(a: dict[str, Any], b: dict[str, Any]) -> str:
    return ", ".join(f"{k} {a[k]} vs {b[k]}" for k in a if k in b and a[k] != b[k])


def check_tokenizer(manifest: dict[str, Any], model_dir: str, eval_manifest: dict | None) -> None:
    """Refuses shards tokenized differently from the model (see the module docstring).

    Args:
      manifest: the train shards' manifest.
      model_dir: the Hugging Face checkpoint the model starts from ('' = a random init).
      eval_manifest: the eval shards' manifest (None: no eval shards).

    Raises:
      TokenizerMismatchError: naming both sides and what differs.
    """
    tok = manifest.get("tokenizer", {})
    if eval_manifest is not None:
        other = eval_manifest.get("tokenizer", {})
        diff = _differences(_ids(tok), _ids(other))
        if tok.get("fingerprint") != other.get("fingerprint") and (
            diff or not _same_vocab(tok, other)
        ):
            raise TokenizerMismatchError(
                f"the train and eval shards were tokenized with different tokenizers "
                f"({tok.get('dir')} vs {other.get('dir')}{': ' + diff if diff else ''}): "
                "prepare both with the same --tokenizer"
            )
    if not model_dir:
        return
    _check_model_config(tok, model_dir)
    if not has_tokenizer(model_dir):
        return
    if tok.get("fingerprint") in _fingerprints(model_dir):
        return
    model_side = _identity(os.path.abspath(model_dir))
    diff = _differences(_ids(tok), model_side)
    if not diff and has_tokenizer(tok.get("dir", "")):
        if _identity(os.path.abspath(tok["dir"]))["vocab"] != model_side["vocab"]:
            diff = "same size, other token ids"
    elif not diff:
        log.warning(
            "the shards' tokenizer %s is gone: only its size and special ids were "
            "compared with the model's",
            tok.get("dir"),
        )
    if diff:
        raise TokenizerMismatchError(
            f"the shards were tokenized with {tok.get('dir', '?')}, not the tokenizer of the "
            f"model {model_dir} ({diff}): re-prepare the data with --tokenizer={model_dir}"
        )


def _fingerprints(model_dir: str) -> set[str]:
    """`tokenize.tokenizer_fingerprint` of the directory, and of its tokenizer files alone (a
    model directory also holds config.json and friends that a tokenizer directory lacks)."""
    from apo_jax.data import tokenize

    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if name in _MODEL_FILES or name.endswith(".safetensors.index.json"):
            continue
        if os.path.isfile(path) and (
            name.endswith((".json", ".jinja", ".model")) or name == "merges.txt"
        ):
            h.update(name.encode())
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return {tokenize.tokenizer_fingerprint(model_dir), h.hexdigest()}


def _same_vocab(a: dict[str, Any], b: dict[str, Any]) -> bool:
    dirs = [x.get("dir", "") for x in (a, b)]
    if not all(has_tokenizer(d) for d in dirs):
        return True  # nothing more to compare than the ids
    return (
        _identity(os.path.abspath(dirs[0]))["vocab"] == _identity(os.path.abspath(dirs[1]))["vocab"]
    )


def _check_model_config(tok: dict[str, Any], model_dir: str) -> None:
    """The vocabulary size and bos/eos ids of the model's config.json against the shards'."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    problems = []
    vocab = tok.get("vocab_size")
    if vocab and cfg.get("vocab_size") and int(vocab) > int(cfg["vocab_size"]):
        problems.append(f"vocab_size {vocab} > the model's {cfg['vocab_size']}")
    bos = cfg.get("bos_token_id")
    if bos is not None and tok.get("bos_token_id") is not None and bos != tok["bos_token_id"]:
        problems.append(f"bos_token_id {tok['bos_token_id']} vs the model's {bos}")
    eos = cfg.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else [eos]
    if (
        eos is not None
        and tok.get("eos_token_id") is not None
        and tok["eos_token_id"] not in eos_ids
    ):
        problems.append(f"eos_token_id {tok['eos_token_id']} vs the model's {eos}")
    if problems:
        raise TokenizerMismatchError(
            f"the shards' tokenizer ({tok.get('dir', '?')}) does not fit the model {model_dir}: "
            f"{', '.join(problems)}; re-prepare the data with --tokenizer={model_dir}"
        )
