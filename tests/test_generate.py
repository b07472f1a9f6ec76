"""KV-cache generation: greedy equals transformers token for token; stops; sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apo_jax.models.generate import generate, sample_token
from apo_jax.models.hf import load_hf

PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [7], [200, 13, 13, 150]]
N = 10  # one max_new_tokens everywhere: one compilation per (greedy, sampling)


@pytest.fixture(scope="module")
def pair(make_hf_llama):
    path, hf_model = make_hf_llama(n_kv_heads=2, llama3=True)
    model, _ = load_hf(path, scan_layers=True)
    return model, hf_model


def test_greedy_matches_transformers(pair):
    import torch

    model, hf_model = pair
    got = generate(model, PROMPTS, max_new_tokens=N)
    for prompt, row in zip(PROMPTS, got, strict=True):
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=N,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        assert row == ref, (prompt, row, ref)
    assert len({tuple(r) for r in got}) == len(PROMPTS)


def test_stop_tokens_trim_rows(pair):
    model, _ = pair
    full = generate(model, PROMPTS, max_new_tokens=N)
    stop = full[0][3]
    cut = generate(model, PROMPTS, max_new_tokens=N, stop_tokens=[stop])
    first = full[0].index(stop)
    assert cut[0] == full[0][:first]
    for f, c in zip(full, cut, strict=True):  # every row stops at its own first stop token
        assert c == (f[: f.index(stop)] if stop in f else f)
    kept = generate(model, PROMPTS, max_new_tokens=N, stop_tokens=[stop], include_stop=True)
    assert kept[0] == full[0][: first + 1]


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(pair):
    model, _ = pair
    a = generate(model, PROMPTS, max_new_tokens=N, temperature=1.0, top_p=0.9, seed=1)
    b = generate(model, PROMPTS, max_new_tokens=N, temperature=1.0, top_p=0.9, seed=1)
    assert a == b
    greedy = generate(model, PROMPTS, max_new_tokens=N)
    nucleus_of_one = generate(
        model, PROMPTS, max_new_tokens=N, temperature=1.0, top_p=1e-6, rng=jax.random.key(2)
    )
    assert nucleus_of_one == greedy


def test_sample_token_top_p_keeps_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draws = np.asarray(jax.vmap(lambda k: sample_token(logits, k, 1.0, 0.75))(keys))
    assert set(np.unique(draws)) == {0, 1}  # 0.5 < 0.75 <= 0.8: tokens 0 and 1 only
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(None, [[1]], max_new_tokens=0)
