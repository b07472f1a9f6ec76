"""Chat-template split: prompt/completion boundary, prefix checks, length policy, demo tokenizer."""

from __future__ import annotations

import os
import shutil

import pytest

from apo_jax.data import demo, schema, tokenize

HEADER = "<|start_header_id|>{}<|end_header_id|>\n\n"


def _tok(path):
    return tokenize.load_tokenizer(str(path))


def test_single_turn_boundary(tok_dir):
    tok = _tok(tok_dir)
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    p, c, r = tokenize.split_pair(tok, prompt, "2 + 3 = 5.", "2 + 3 = 6.")
    assert tok.decode(p) == "<|begin_of_text|>" + HEADER.format(
        "user"
    ) + "What is 2 + 3?<|eot_id|>" + HEADER.format("assistant")
    assert tok.decode(c) == "2 + 3 = 5.<|eot_id|>"
    assert tok.decode(r) == "2 + 3 = 6.<|eot_id|>"
    full = tok.apply_chat_template(
        prompt + [{"role": "assistant", "content": "2 + 3 = 5."}], tokenize=False
    )
    assert p + c == tok(full, add_special_tokens=False)["input_ids"]


def test_multi_turn_keeps_history_and_completion_is_last_answer(tok_dir):
    tok = _tok(tok_dir)
    prompt = [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "1 + 1 = 2."},
        {"role": "user", "content": "And 2 + 2?"},
    ]
    p, c, _ = tokenize.split_pair(tok, prompt, "2 + 2 = 4.", "2 + 2 = 5.")
    text = tok.decode(p)
    for piece in ("Be exact.", "What is 1 + 1?", "1 + 1 = 2.", "And 2 + 2?"):
        assert piece in text
    assert text.endswith("And 2 + 2?<|eot_id|>" + HEADER.format("assistant"))
    assert text.count("<|begin_of_text|>") == 1
    assert tok.decode(c) == "2 + 2 = 4.<|eot_id|>"


def _with_template(src, dst, template):
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "chat_template.jinja"), "w") as f:
        f.write(template)
    tokenize.load_tokenizer.cache_clear()
    return tokenize.load_tokenizer(str(dst))


def test_template_not_prefix_consistent_is_rejected(tok_dir, tmp_path):
    # The generation prompt says "assistant" but the rendered answer turn says "model".
    bad = demo.LLAMA3_CHAT_TEMPLATE.replace(
        "message['role']", "('model' if message['role'] == 'assistant' else message['role'])"
    )
    tok = _with_template(tok_dir, tmp_path / "t", bad)
    with pytest.raises(schema.RowError) as e:
        tokenize.split_pair(tok, [{"role": "user", "content": "Hi"}], "Hello.", "Hey.")
    assert e.value.reason == schema.TEMPLATE_NOT_PREFIX


def test_template_without_end_of_turn_is_rejected(tok_dir, tmp_path):
    bad = demo.LLAMA3_CHAT_TEMPLATE.replace("+ '<|eot_id|>'", "")
    tok = _with_template(tok_dir, tmp_path / "t", bad)
    with pytest.raises(schema.RowError) as e:
        tokenize.split_pair(tok, [{"role": "user", "content": "Hi"}], "Hello.", "Hey.")
    assert e.value.reason == schema.NO_END_OF_TURN


def _pair(prompt_text):
    return schema.Pair(
        ({"role": "user", "content": prompt_text},), "Yes it is.", "No it is not.", 0, "f", 1
    )


def test_length_policy(tok_dir):
    tok = _tok(tok_dir)
    long_pair = _pair("Sort these numbers in ascending order: " + ", ".join(map(str, range(60))))
    p, c, r = tokenize.encode_pair(
        tok, long_pair, max_length=4096, max_prompt_length=None, truncation="none"
    )
    limit = len(p) // 2 + max(len(c), len(r))
    with pytest.raises(schema.RowError) as e:
        tokenize.encode_pair(
            tok, long_pair, max_length=limit, max_prompt_length=None, truncation="none"
        )
    assert e.value.reason == schema.PAIR_TOO_LONG
    with pytest.raises(schema.RowError) as e:
        tokenize.encode_pair(
            tok, long_pair, max_length=4096, max_prompt_length=len(p) - 1, truncation="none"
        )
    assert e.value.reason == schema.PROMPT_TOO_LONG
    with pytest.raises(schema.RowError) as e:  # so long in bytes that no tokenizing is needed
        tokenize.encode_pair(
            tok, long_pair, max_length=4096, max_prompt_length=10, truncation="none"
        )
    assert (e.value.reason, e.value.field) == (schema.TOO_MANY_BYTES, "prompt")
    with pytest.raises(schema.RowError) as e:
        tokenize.encode_pair(
            tok, long_pair, max_length=len(c) + 1, max_prompt_length=None, truncation="keep_end"
        )
    assert e.value.reason == schema.COMPLETION_TOO_LONG

    end, c2, _ = tokenize.encode_pair(
        tok, long_pair, max_length=limit, max_prompt_length=None, truncation="keep_end"
    )
    assert (
        end.tolist() == p[len(p) - len(end) :].tolist() and len(end) + max(len(c), len(r)) == limit
    )
    assert c2.tolist() == c.tolist()  # completions are never cut
    start, _, _ = tokenize.encode_pair(
        tok, long_pair, max_length=limit, max_prompt_length=None, truncation="keep_start"
    )
    assert len(start) + max(len(c), len(r)) == limit
    assert tok.decode(start).startswith("<|begin_of_text|>")
    assert tok.decode(start).endswith(HEADER.format("assistant"))  # generation header kept


def test_demo_tokenizer_is_deterministic(tmp_path):
    texts = [m["content"] for r in demo.generate_pairs(100, seed=3) for m in r["chosen"]]
    a = demo.train_tokenizer(texts, str(tmp_path / "a"), vocab_size=400)
    b = demo.train_tokenizer(texts, str(tmp_path / "b"), vocab_size=400)
    assert tokenize.tokenizer_fingerprint(a) == tokenize.tokenizer_fingerprint(b)
    tok = tokenize.load_tokenizer(a)
    assert tok.eos_token == "<|eot_id|>" and tok.bos_token == "<|begin_of_text|>"


def test_longest_token_bytes_bounds_the_bytes_of_any_text(tok_dir):
    tok = _tok(tok_dir)
    per_token = tokenize.longest_token_bytes(tok)
    assert per_token == len("<|finetune_right_pad_id|>")  # the longest vocabulary string
    texts = ["    " * 50, "é" * 300, "Sort 1, 2, 3." * 40, "\U0001f600" * 30, "x\n\n" * 90]
    for text in texts:
        assert len(text.encode("utf-8")) <= per_token * len(tokenize._encode(tok, text))


def test_find_special_token(tok_dir):
    tok = _tok(tok_dir)
    assert tokenize.find_special_token(tok, "plain <|eot text |>") is None
    assert (
        tokenize.find_special_token(tok, "a<|start_header_id|>b<|eot_id|>") == "<|start_header_id|>"
    )
    assert (
        tokenize.find_special_token(tok, "<|end_of_text|>") == "<|end_of_text|>"
    )  # special, not eos
