"""Tests of the chunked sequence log-probs against the full-logits computation."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from apo_jax.logprobs import naive_sequence_logps, sequence_logps

B, T, D, V = 3, 13, 8, 37


def _inputs(seed=0, dtype=jnp.float32):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(k1, (B, T, D), dtype)
    unembed = (jax.random.normal(k2, (D, V)) * 0.5).astype(dtype)
    ids = jax.random.randint(k3, (B, T), 0, V)
    # Prompt of 4 tokens, completion after it, right padding of a row-dependent length.
    t = jnp.arange(T)[None, :]
    lengths = jnp.asarray([T, T - 3, 7])[:, None]
    mask = ((t >= 4) & (t < lengths)).astype(jnp.int32)
    del k4
    return hidden, unembed, ids, mask


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])
def test_chunked_equals_naive(chunk):
    h, w, ids, mask = _inputs()
    got, n_got = sequence_logps(h, w, ids, mask, chunk_size=chunk)
    want, n_want = naive_sequence_logps(h, w, ids, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_array_equal(n_got, n_want)


def test_matches_explicit_log_softmax_loop():
    h, w, ids, mask = _inputs(1)
    logp = np.asarray(jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, w), axis=-1))
    ids_np, mask_np = np.asarray(ids), np.asarray(mask)
    want = np.zeros(B)
    for b in range(B):
        for t in range(1, T):
            if mask_np[b, t]:
                want[b] += logp[b, t - 1, ids_np[b, t]]
    got, counts = sequence_logps(h, w, ids, mask, chunk_size=4)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_array_equal(counts, mask_np[:, 1:].sum(1))


def test_gradients_equal_naive():
    h, w, ids, mask = _inputs(2)
    weights = jnp.asarray([1.0, -2.0, 0.5])

    def f(fn, h, w):
        return jnp.sum(fn(h, w, ids, mask)[0] * weights)

    chunked = jax.grad(lambda h, w: f(lambda *a: sequence_logps(*a, chunk_size=5), h, w), (0, 1))(
        h, w
    )
    naive = jax.grad(lambda h, w: f(naive_sequence_logps, h, w), (0, 1))(h, w)
    for g, n in zip(chunked, naive, strict=True):
        np.testing.assert_allclose(g, n, rtol=1e-4, atol=1e-6)


def test_masked_tokens_do_not_count():
    h, w, ids, mask = _inputs(3)
    # Change every token outside the completion: the sums must not move.
    other = jnp.where(mask == 1, ids, (ids + 7) % V)
    a, _ = sequence_logps(h, w, ids, mask, chunk_size=4)
    b, _ = sequence_logps(h, w, other, mask, chunk_size=4)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    # And the hidden state at the last real position of a row predicts nothing.
    h2 = h.at[:2, T - 4].add(100.0)  # row 1's last real token is T - 4
    c, _ = sequence_logps(h2, w, ids, mask, chunk_size=4)
    np.testing.assert_allclose(c[1], a[1], rtol=1e-6)
    assert not np.allclose(c[0], a[0])  # row 0 has no padding: the same position does count


def test_bfloat16_inputs_accumulate_in_float32():
    h, w, ids, mask = _inputs(4)
    h16, w16 = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    got, counts = sequence_logps(h16, w16, ids, mask, chunk_size=4)
    assert got.dtype == jnp.float32 and counts.dtype == jnp.float32
    want, _ = naive_sequence_logps(h16.astype(jnp.float32), w16.astype(jnp.float32), ids, mask)
    # bf16 products summed in float32: close to the float32 result on the same rounded inputs.
    np.testing.assert_allclose(got, want, rtol=1e-2)


def test_bfloat16_hidden_runs_every_head_matmul_in_bfloat16_with_float32_master_weights():
    h, w, ids, mask = _inputs(5)
    h16 = h.astype(jnp.bfloat16)  # compute dtype; w stays float32 (master weights)

    def loss(h, w):
        return sequence_logps(h, w, ids, mask, chunk_size=4)[0].sum()

    grad = jax.grad(loss, argnums=(0, 1))
    dots = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                dots.append(tuple(v.aval.dtype for v in eqn.invars))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(grad)(h16, w).jaxpr)
    assert len(dots) >= 3, dots  # forward (and its recomputation), d hidden, d unembedding
    assert all(d == (jnp.bfloat16, jnp.bfloat16) for d in dots), dots
    d_h, d_w = grad(h16, w)
    assert d_h.dtype == jnp.bfloat16 and d_w.dtype == jnp.float32
    want_h, want_w = jax.grad(
        lambda h, w: naive_sequence_logps(h, w, ids, mask)[0].sum(), argnums=(0, 1)
    )(h16.astype(jnp.float32), w)
    np.testing.assert_allclose(np.asarray(d_w), want_w, rtol=3e-2, atol=3e-2)
    np.testing.assert_allclose(np.asarray(d_h, np.float32), want_h, rtol=3e-2, atol=3e-2)


def test_chunked_never_holds_full_logits():
    b, t, d, v = 4, 512, 16, 4096
    args = (
        jax.ShapeDtypeStruct((b, t, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((b, t), jnp.int32),
        jax.ShapeDtypeStruct((b, t), jnp.int32),
    )

    def temp_bytes(fn):
        loss = lambda h, w, i, m: jnp.sum(fn(h, w, i, m)[0])  # noqa: E731
        compiled = jax.jit(jax.grad(loss, (0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full_logits = b * t * v * 4
    naive = temp_bytes(naive_sequence_logps)
    chunked = temp_bytes(lambda *a: sequence_logps(*a, chunk_size=32))
    assert naive >= full_logits
    assert chunked < full_logits / 4, (chunked, naive)


@pytest.mark.parametrize("chunk", [1, 5, 13, 64])
def test_token_logps_equal_explicit_log_softmax_and_its_gradient(chunk):
    from apo_jax.logprobs import token_logps

    h, w, ids, _ = _inputs(3)
    weights_BxT = jax.random.normal(jax.random.key(4), (B, T))

    def explicit(h):
        logp_BxTxV = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, w), axis=-1)
        return jnp.take_along_axis(logp_BxTxV, ids[..., None], axis=-1)[..., 0]

    got = token_logps(h, w, ids, chunk_size=chunk)
    assert got.shape == (B, T)
    np.testing.assert_allclose(got, explicit(h), rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda h: jnp.sum(token_logps(h, w, ids, chunk_size=chunk) * weights_BxT))(h)
    g_want = jax.grad(lambda h: jnp.sum(explicit(h) * weights_BxT))(h)
    np.testing.assert_allclose(g, g_want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 4, 13])
def test_token_logps_where_equals_all_positions_at_the_needed_ones(chunk):
    from apo_jax.logprobs import token_logps

    h, w, ids, _ = _inputs(6)
    # Needed positions scattered through each row, a different number per row, one row empty.
    where_BxT = jax.random.bernoulli(jax.random.key(7), 0.4, (B, T)).at[2].set(False)
    weights_BxT = jax.random.normal(jax.random.key(8), (B, T))

    def loss(h, w, where):
        logps = token_logps(h, w, ids, chunk_size=chunk, where_BxT=where)
        return jnp.sum(jnp.sin(jnp.where(where_BxT, logps, 0.0) * weights_BxT))

    got = token_logps(h, w, ids, chunk_size=chunk, where_BxT=where_BxT)
    full = token_logps(h, w, ids, chunk_size=chunk)
    np.testing.assert_allclose(got, jnp.where(where_BxT, full, 0.0), rtol=1e-5, atol=1e-6)
    g_got = jax.grad(loss, (0, 1))(h, w, where_BxT)
    g_want = jax.grad(loss, (0, 1))(h, w, None)
    for a, b in zip(g_got, g_want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_token_logps_where_skips_the_chunks_no_row_needs():
    """Rows need 4 positions each (one chunk after sorting); every other hidden state is NaN.

    A chunk that ran would put NaN into the unembedding gradient (0 * NaN), so finite
    gradients show that the head never touched those chunks, forward or backward.
    """
    from apo_jax.logprobs import token_logps

    h, w, ids, _ = _inputs(9)
    where_BxT = jnp.zeros((B, T), bool).at[0, 2:6].set(True).at[1, 7:11].set(True)
    where_BxT = where_BxT.at[2, jnp.array([0, 3, 9, 12])].set(True)
    h_nan = jnp.where(where_BxT[..., None], h, jnp.nan)

    def loss(h, w):
        return jnp.sum(jax.nn.sigmoid(token_logps(h, w, ids, chunk_size=4, where_BxT=where_BxT)))

    value, (d_h, d_w) = jax.value_and_grad(loss, (0, 1))(h_nan, w)
    want, (d_h_want, d_w_want) = jax.value_and_grad(loss, (0, 1))(h, w)
    assert np.isfinite(value) and np.all(np.isfinite(d_w)) and np.all(np.isfinite(d_h))
    np.testing.assert_allclose(value, want, rtol=1e-6)
    np.testing.assert_allclose(d_w, d_w_want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(d_h, d_h_want, rtol=1e-5, atol=1e-7)
    # Without `where` every chunk runs, and the NaN reaches the gradient: the check can fail.
    full = jax.grad(lambda h: jnp.sum(token_logps(h, w, ids, chunk_size=4) * where_BxT))(h_nan)
    assert not np.all(np.isfinite(full))
