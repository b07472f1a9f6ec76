"""KV-cache sampling: greedy, temperature and top-p, stop tokens, prompts of different lengths.

Prompts are left-padded to one length P (rounded up to a multiple of 16 to limit recompiles);
each row gets its own RoPE positions (0 at its first real token) and padded keys are masked, so a
row's tokens are what it would get alone. Sliding-window layers (Mistral, Gemma 3) count their
window in positions, so left padding never shifts it. One jitted function runs the prefill and a
`lax.while_loop` of single-token decode steps over a cache of length P + max_new_tokens, one
buffer per layer; the prefill runs the layers as the model has them (scanned by default), the
decode steps unrolled (`Llama.unrolled`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apo_jax.models.llama import Llama

PROMPT_BUCKET = 16
MAX_STOP_TOKENS = 8  # stop ids are a fixed-size traced array, so changing them never recompiles


def sample_token(
    logits_BxV: jax.Array, rng: jax.Array, temperature: float, top_p: float
) -> jax.Array:
    """Picks one token per row: argmax when temperature == 0, else nucleus sampling.

    Args:
      logits_BxV: float32 logits.
      rng: PRNG key.
      temperature: softmax temperature; a Python 0 means greedy (may be traced when > 0).
      top_p: keep the smallest set of tokens whose probability reaches top_p (1.0 = all).

    Returns:
      int32 token ids [B].
    """
    if isinstance(temperature, float | int) and temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / temperature
    if not isinstance(top_p, float | int) or top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        cum_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
        # the cutoff is the logit of the last token needed to reach top_p mass
        n_keep_B = jnp.sum(cum_BxV - jax.nn.softmax(sorted_BxV, axis=-1) < top_p, axis=-1)
        cutoff_B = jnp.take_along_axis(sorted_BxV, (n_keep_B - 1)[:, None], axis=-1)
        logits_BxV = jnp.where(logits_BxV < cutoff_B, -jnp.inf, logits_BxV)
    return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy"))
def _generate(
    graphdef,
    state,
    tokens_BxP,
    lengths_B,
    stops_S,
    rng,
    temperature,
    top_p,
    *,
    max_new_tokens,
    greedy,
):
    if greedy:
        temperature = 0.0
    model: Llama = nnx.merge(graphdef, state)
    cfg = model.cfg
    B, P = tokens_BxP.shape
    S = P + max_new_tokens
    pad_B = P - lengths_B
    key_valid_BxS = jnp.arange(S)[None, :] >= pad_B[:, None]
    shape = (B, cfg.n_kv_heads, S, cfg.head_dim)  # heads-major: `layers.cached_attention`
    cache = [(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))] * cfg.n_layers

    q_P, k_S = jnp.arange(P)[:, None], jnp.arange(S)[None, :]
    mask_BxPxS = ((k_S <= q_P) & key_valid_BxS[:, None, :]) | (
        k_S == q_P
    )  # diag: pad rows stay finite
    # slot s of row b holds position s - pad_b: a sliding window counts positions
    k_positions_BxS = jnp.arange(S)[None, :] - pad_B[:, None]
    q_positions_BxP = k_positions_BxS[:, :P]
    local_BxPxS = model.window_mask(mask_BxPxS, q_positions_BxP, k_positions_BxS)
    positions_BxP = jnp.maximum(q_positions_BxP, 0)
    hidden_BxPxD, cache = model.hidden_states(
        tokens_BxP, positions_BxP, mask_BxPxS, cache, 0, local_mask_BxTxS=local_BxPxS
    )
    rng, sub = jax.random.split(rng)
    token_B = sample_token(model.logits(hidden_BxPxD[:, -1:])[:, 0], sub, temperature, top_p)
    model = model.unrolled()  # the decode loop's layer weights, sliced once before it
    out_BxN = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(token_B)
    done_B = jnp.isin(token_B, stops_S)

    def cond(carry):
        i, _, _, done_B, _, _ = carry
        return (i + 1 < max_new_tokens) & ~jnp.all(done_B)

    def body(carry):
        i, token_B, cache, done_B, out_BxN, rng = carry
        index = P + i
        mask_Bx1xS = ((jnp.arange(S) <= index)[None, :] & key_valid_BxS)[:, None, :]
        positions_Bx1 = (lengths_B + i)[:, None]
        local_Bx1xS = model.window_mask(mask_Bx1xS, positions_Bx1, k_positions_BxS)
        hidden_Bx1xD, cache = model.hidden_states(
            token_B[:, None], positions_Bx1, mask_Bx1xS, cache, index, local_mask_BxTxS=local_Bx1xS
        )
        rng, sub = jax.random.split(rng)
        token_B = sample_token(model.logits(hidden_Bx1xD)[:, 0], sub, temperature, top_p)
        out_BxN = out_BxN.at[:, i + 1].set(token_B)
        return i + 1, token_B, cache, done_B | jnp.isin(token_B, stops_S), out_BxN, rng

    carry = (jnp.int32(0), token_B, cache, done_B, out_BxN, rng)
    return jax.lax.while_loop(cond, body, carry)[4]


def generate(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    rng: jax.Array | None = None,
    pad_id: int = 0,
    include_stop: bool = False,
    pad_to: int = 0,
) -> list[list[int]]:
    """Samples continuations of a batch of prompts with a KV cache.

    Args:
      model: the Llama.
      prompts: token-id lists, of any (nonzero) lengths.
      max_new_tokens: the most tokens generated per prompt.
      temperature: 0 = greedy (default); otherwise the softmax temperature.
      top_p: nucleus sampling mass (1.0 = off).
      stop_tokens: generation of a row ends at the first of these.
      seed: sampling seed (unused when greedy).
      rng: a PRNG key; overrides `seed` when given.
      pad_id: id used to left-pad prompts (never attended to).
      include_stop: keep the stop token at the end of a trimmed row.
      pad_to: left-pad prompts to at least this length, so callers that bucket prompt lengths
        choose the compiled shapes (dropped when it would overflow `max_seq_len`).

    Returns:
      One list of generated ids per prompt, trimmed at the first stop token.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    lengths = np.array([len(p) for p in prompts], np.int32)
    P = max(-(-int(lengths.max()) // PROMPT_BUCKET) * PROMPT_BUCKET, pad_to)
    if P + max_new_tokens > model.cfg.max_seq_len:
        P = int(lengths.max())
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    for row, p in enumerate(prompts):
        tokens[row, P - len(p) :] = p
    if rng is None:
        rng = jax.random.key(seed)
    if len(stop_tokens) > MAX_STOP_TOKENS:
        raise ValueError(f"at most {MAX_STOP_TOKENS} stop tokens, got {len(stop_tokens)}")
    stops = np.full((MAX_STOP_TOKENS,), -1, np.int32)
    stops[: len(stop_tokens)] = stop_tokens
    graphdef, state = nnx.split(model)
    out_BxN = _generate(
        graphdef,
        state,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        jnp.asarray(stops),
        rng,
        jnp.float32(max(temperature, 1e-6)),
        jnp.float32(top_p),
        max_new_tokens=max_new_tokens,
        greedy=temperature == 0.0,
    )
    results = []
    stops = set(int(t) for t in stop_tokens)
    for row in np.asarray(out_BxN).tolist():
        for j, tok in enumerate(row):
            if tok in stops:
                row = row[: j + 1] if include_stop else row[:j]
                break
        results.append(row)
    return results
