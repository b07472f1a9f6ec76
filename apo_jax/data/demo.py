"""The embedded demo: an in-process tokenizer with a Llama-3-style chat template and generated
CLAIR-style pairs on checkable tasks, prepared into shards and cached on disk.

``build_demo()`` needs nothing downloaded and takes a few seconds the first time; later calls
return the cached assets (keyed by :data:`VERSION`). Every chosen answer is a minimal correction
of its rejected answer: same wording, only the wrong part fixed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile

VERSION = "demo-v2"  # v2: manifests carry shard sizes and hashes (shards.verify)
SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
)
# Meta-Llama-3-8B-Instruct's chat template.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Llama-3's pre-tokenizer split: newlines before a word stay one piece, so the prompt/answer
# boundary after "<|end_header_id|>\n\n" tokenizes the same alone and in context.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SYSTEM = "You are a careful assistant. Answer briefly and exactly."


@dataclasses.dataclass(frozen=True)
class DemoAssets:
    """Paths of the demo's tokenizer, raw pair files and prepared shard directories."""

    root: str
    tokenizer_dir: str
    train_pairs: str  # JSONL, CLAIR layout
    eval_pairs: str
    train_shards: str
    eval_shards: str
    version: str = VERSION


def _arith(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice("+-*")
    true = {"+": a + b, "-": a - b, "*": a * b}[op]
    wrong = true + rng.choice([-10, -2, -1, 1, 2, 10])
    q = f"What is {a} {op} {b}?"
    text = "To compute {a} {op} {b}, we work it out step by step: {a} {op} {b} = {v}. The answer is {v}."
    return q, text.format(a=a, op=op, b=b, v=true), text.format(a=a, op=op, b=b, v=wrong)


def _sort(rng: random.Random) -> tuple[str, str, str]:
    xs = rng.sample(range(1, 60), rng.randint(4, 7))
    good = sorted(xs)
    bad = list(good)
    i = rng.randrange(len(bad) - 1)
    bad[i], bad[i + 1] = bad[i + 1], bad[i]
    q = f"Sort these numbers in ascending order: {', '.join(map(str, xs))}."
    text = "Here are the numbers in ascending order: {}."
    return q, text.format(", ".join(map(str, good))), text.format(", ".join(map(str, bad)))


def _count(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(
        [
            "banana",
            "mississippi",
            "parallel",
            "committee",
            "balloon",
            "assessment",
            "letter",
            "cocoa",
            "bookkeeper",
            "abracadabra",
            "tattoo",
            "referee",
        ]
    )
    letter = rng.choice(sorted(set(word)))
    n = word.count(letter)
    q = f"How many times does the letter '{letter}' appear in the word '{word}'?"
    text = "The letter '{l}' appears {n} time{s} in the word '{w}'."
    wrong = n + rng.choice([-1, 1]) if n > 1 else n + 1
    fmt = lambda k: text.format(l=letter, n=k, s="" if k == 1 else "s", w=word)  # noqa: E731
    return q, fmt(n), fmt(wrong)


def _compare(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(10, 999), 2)
    q = f"Which number is larger, {a} or {b}?"
    text = "Comparing {a} and {b}, the larger number is {v}."
    return q, text.format(a=a, b=b, v=max(a, b)), text.format(a=a, b=b, v=min(a, b))


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(
        [
            "planet",
            "garden",
            "silver",
            "window",
            "market",
            "rocket",
            "python",
            "orange",
            "castle",
            "bridge",
            "pencil",
            "forest",
        ]
    )
    good = word[::-1]
    i = rng.randrange(len(good) - 1)
    bad = good[:i] + good[i + 1] + good[i] + good[i + 2 :]
    q = f"Reverse the letters of the word '{word}'."
    text = "Written backwards, '{w}' becomes '{v}'."
    return q, text.format(w=word, v=good), text.format(w=word, v=bad)


TASKS = (_arith, _sort, _count, _compare, _reverse)


def generate_pairs(n: int, seed: int, multi_turn: float = 0.125) -> list[dict]:
    """Returns n CLAIR-layout rows; a `multi_turn` fraction has a system prompt and an earlier turn."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q, good, bad = rng.choice(TASKS)(rng)
        history = [{"role": "user", "content": q}]
        if rng.random() < multi_turn:
            q0, good0, _ = rng.choice(TASKS)(rng)
            history = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": q0},
                {"role": "assistant", "content": good0},
            ] + history
        rows.append(
            {
                "prompt": q,
                "chosen": history + [{"role": "assistant", "content": good}],
                "rejected": history + [{"role": "assistant", "content": bad}],
            }
        )
    return rows


def train_tokenizer(texts: list[str], out_dir: str, vocab_size: int = 768) -> str:
    """Trains a byte-level BPE with Llama-3 special tokens and chat template; saves it to out_dir."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        chat_template=LLAMA3_CHAT_TEMPLATE,
    )
    fast.save_pretrained(out_dir)
    return out_dir


def _write_jsonl(rows: list[dict], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _build(root: str, n_train: int, n_eval: int, seed: int, multi_turn: float) -> None:
    from apo_jax.data import prepare

    rows = generate_pairs(n_train + n_eval, seed, multi_turn)
    texts = [m["content"] for r in rows for side in ("chosen", "rejected") for m in r[side]]
    train_tokenizer(texts, os.path.join(root, "tokenizer"))
    _write_jsonl(rows[:n_train], os.path.join(root, "train.jsonl"))
    _write_jsonl(rows[n_train:], os.path.join(root, "eval.jsonl"))
    settings = prepare.Settings(max_length=256, records_per_shard=1024)
    for split in ("train", "eval"):
        manifest = prepare.prepare(
            os.path.join(root, f"{split}.jsonl"),
            os.path.join(root, "tokenizer"),
            os.path.join(root, f"{split}_shards"),
            settings,
        )
        if manifest["counts"]["rejected"]:  # generated data is valid by construction
            raise RuntimeError(
                f"demo {split} pairs rejected: {manifest['counts']['rejected_by_reason']}"
            )


def _point_manifests_at(root: str) -> None:
    """Rewrites the manifests' tokenizer dir to the final location (the build ran in a temp dir)."""
    tok_dir = os.path.join(root, "tokenizer")
    for split in ("train", "eval"):
        path = os.path.join(root, f"{split}_shards", "manifest.json")
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest["tokenizer"]["dir"] != tok_dir:
            manifest["tokenizer"]["dir"] = tok_dir
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=2)
            os.replace(path + ".tmp", path)


def build_demo(
    cache_dir: str | None = None,
    *,
    n_train: int = 3000,
    n_eval: int = 300,
    seed: int = 0,
    multi_turn: float = 0.125,
) -> DemoAssets:
    """Builds (once) and returns the demo assets.

    Args:
      cache_dir: parent directory; defaults to ``~/.cache/apo_jax/demo``. Assets live in
        ``cache_dir/<VERSION>-<n_train>-<n_eval>-<seed>`` and are reused when present.
      n_train, n_eval, seed: size and seed of the generated pair set.
      multi_turn: fraction of conversations with a system prompt and an earlier exchange (long
        rows; the training demo sets 0 so rows stay short).

    Returns:
      DemoAssets with the tokenizer dir, train/eval JSONL files and train/eval shard dirs.
    """
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "apo_jax", "demo")
    root = os.path.join(cache_dir, f"{VERSION}-{n_train}-{n_eval}-{seed}")
    if multi_turn != 0.125:
        root += f"-mt{multi_turn:g}"
    if not os.path.exists(os.path.join(root, "eval_shards", "manifest.json")):
        os.makedirs(cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".build-", dir=cache_dir)
        try:
            _build(tmp, n_train, n_eval, seed, multi_turn)
            try:
                os.rename(tmp, root)  # atomic; a concurrent builder may have won the race
            except OSError:
                if not os.path.exists(os.path.join(root, "eval_shards", "manifest.json")):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _point_manifests_at(root)
    return DemoAssets(
        root=root,
        tokenizer_dir=os.path.join(root, "tokenizer"),
        train_pairs=os.path.join(root, "train.jsonl"),
        eval_pairs=os.path.join(root, "eval.jsonl"),
        train_shards=os.path.join(root, "train_shards"),
        eval_shards=os.path.join(root, "eval_shards"),
    )


def unpaired_shards(assets: DemoAssets, *, kl_group: int = 8) -> tuple[str, str]:
    """(train, eval) shards of the demo pairs split into unpaired records; built once.

    Each pair gives a desirable record (its chosen answer) and an undesirable one (its rejected
    answer), ordered as TRL's ``unpair_preference_dataset`` orders them; KL completions rotate
    within groups of ``kl_group`` records (:mod:`apo_jax.data.unpaired`).
    """
    from apo_jax.data import prepare, unpaired

    out = []
    for split, pairs in (("train", assets.train_pairs), ("eval", assets.eval_pairs)):
        shard_dir = os.path.join(assets.root, f"{split}_unpaired_kl{kl_group}_shards")
        out.append(shard_dir)
        if os.path.exists(os.path.join(shard_dir, "manifest.json")):
            continue
        tmp = tempfile.mkdtemp(prefix=".build-", dir=assets.root)
        try:
            rows = unpaired.unpair_file(pairs, os.path.join(tmp, f"{split}_unpaired.jsonl"))
            settings = prepare.Settings(
                max_length=256, records_per_shard=2048, kl_group=kl_group, records="unpaired"
            )
            manifest = prepare.prepare(rows, assets.tokenizer_dir, os.path.join(tmp, "s"), settings)
            if manifest["counts"]["rejected"]:  # generated data is valid by construction
                raise RuntimeError(f"demo unpaired {split} rows rejected: {manifest['counts']}")
            try:
                os.rename(os.path.join(tmp, "s"), shard_dir)  # atomic; a concurrent build may win
            except OSError:
                if not os.path.exists(os.path.join(shard_dir, "manifest.json")):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out[0], out[1]
