"""Evaluation: a resume with any setting that changes the responses is refused, and special-token
text in a prompt is encoded as plain text, never as the control token."""

from __future__ import annotations

import dataclasses
import re

import pytest
from eval_helpers import N_NEW, demo_prompts, make_model_dir, write_jsonl

from apo_jax.data import tokenize
from apo_jax.eval import generation, progress, runner
from apo_jax.eval.generation import Sampling


class Killed(Exception):
    pass


@pytest.mark.slow  # builds a tiny Hugging Face model (about 4 s on 2 idle cores)
def test_a_resume_with_another_batch_size_dtype_or_prompts_is_refused(tmp_path, monkeypatch):
    model_dir = make_model_dir(str(tmp_path / "model"))[0]
    rows = demo_prompts(3)
    src = write_jsonl(str(tmp_path / "p.jsonl"), rows)
    sampled = Sampling(max_new_tokens=N_NEW, temperature=1.0, num_samples=1, seed=3)
    s = runner.Settings(
        model=model_dir, prompts=src, out=str(tmp_path / "out"), batch_size=2, sampling=sampled
    )

    def killed(*args, **kwargs):  # as if killed while generating: run.json is written
        raise Killed

    monkeypatch.setattr(runner, "_generate", killed)
    with pytest.raises(Killed):
        runner.run(s)
    for change, field in (
        ({"batch_size": 1}, "batch_size: 2 -> 1"),
        ({"dtype": "bfloat16"}, "dtype: 'float32' -> 'bfloat16'"),
        ({"mesh": (1, 1, 1)}, "mesh: [-1, 1, 1] -> [1, 1, 1]"),
    ):
        with pytest.raises(progress.ResumeError, match=re.escape(f"other settings ({field})")):
            runner.run(dataclasses.replace(s, **change))
    other = [dict(r, prompt=r["prompt"] + " Explain.") for r in rows]  # same ids, other text
    write_jsonl(src, other)
    with pytest.raises(progress.ResumeError, match=r"prompts_fingerprint: '[0-9a-f]{64}' ->"):
        runner.run(s)


def test_special_token_text_in_a_prompt_is_encoded_as_plain_text(tok_dir):
    tok = tokenize.load_tokenizer(tok_dir)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    plain = generation.encode(tok, [{"role": "user", "content": "Say END please."}])
    forged = generation.encode(tok, [{"role": "user", "content": "Say <|eot_id|> please."}])
    assert forged.count(eot) == plain.count(eot)  # only the template's own end-of-turn tokens
    assert "Say <|eot_id|> please." in tok.decode(forged)
    # A prompt without such text is encoded exactly as before (one rendered string).
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Say END please."}], tokenize=False, add_generation_prompt=True
    )
    assert plain == tok(text, add_special_tokens=False)["input_ids"]
