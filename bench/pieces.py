"""Where benchmark 1's step time goes, piece by piece: each CPU speed change against its baseline.

    python bench/pieces.py [--repeats 5]

At benchmark 1's shapes (8 rows x 512 tokens, d 512, 8 heads, 2 kv heads, vocab 32000, float32),
forward+backward of each piece, the candidates of a piece timed interleaved (median):
- log-prob head, half of every row prompt: all positions vs only the completion tokens
  (`logprobs.token_logps(..., where_BxT=...)`), loss nonlinear in the log-probs so that XLA keeps
  the forward;
- attention of one layer: `jax.nn.dot_product_attention` (XLA, causal) vs
  `layers.blocked_causal_attention`;
- the 8-layer decoder body: layers under `lax.scan` vs unrolled (blocked attention).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from common import STEP_MODEL, dot_flops_per_s, machine, median, table, time_interleaved
from flax import nnx

from apo_jax.logprobs import token_logps
from apo_jax.models.layers import blocked_causal_attention
from apo_jax.models.llama import Llama

B, T = 8, 512


def grad_runner(loss, *args):
    g = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
    return lambda: jax.block_until_ready(g(*args))


def head_fns(cfg):
    ks = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(ks[0], (B, T, cfg.d_model))
    w = 0.02 * jax.random.normal(ks[1], (cfg.d_model, cfg.vocab_size))
    targets = jax.random.randint(ks[2], (B, T), 1, cfg.vocab_size)
    # As the step sees a half-prompt row: positions T/2 - 1 .. T - 2 predict the completion.
    t_BxT = jnp.arange(T)[None, :].repeat(B, 0)
    where = (t_BxT >= T // 2 - 1) & (t_BxT < T - 1)

    def loss(where_or_none):
        def f(h, w):
            logps = token_logps(h, w, targets, where_BxT=where_or_none)
            return jnp.sum(jax.nn.sigmoid(1e-3 * jnp.sum(jnp.where(where, logps, 0.0), -1)))

        return f

    return {
        "head: all positions": grad_runner(loss(None), h, w),
        "head: completion tokens only": grad_runner(loss(where), h, w),
    }


def attention_fns(cfg):
    H, K, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (B, T, H, Dh))
    k = jax.random.normal(ks[1], (B, T, K, Dh))
    v = jax.random.normal(ks[2], (B, T, K, Dh))

    def xla(q, k, v):
        return jnp.sum(jnp.sin(jax.nn.dot_product_attention(q, k, v, is_causal=True)))

    def blocked(q, k, v):
        return jnp.sum(jnp.sin(blocked_causal_attention(q, k, v, None, Dh**-0.5)))

    return {
        "attention (1 layer): xla": grad_runner(xla, q, k, v),
        "attention (1 layer): blocked": grad_runner(blocked, q, k, v),
    }


def body_fns(cfg):
    ids = jax.random.randint(jax.random.key(2), (B, T), 1, cfg.vocab_size)
    out = {}
    for name, scan in (("scan", True), ("unrolled", False)):
        graphdef, params = nnx.split(Llama(cfg.replace(scan_layers=scan), rngs=nnx.Rngs(0)))

        def loss(params, graphdef=graphdef):
            hidden = nnx.merge(graphdef, params)(ids, return_hidden=True)
            return jnp.sum(jnp.sin(hidden))

        out[f"decoder body (8 layers): {name}"] = grad_runner(loss, params)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cfg = STEP_MODEL
    ceilings = [dot_flops_per_s()]
    rows = []
    for group in (head_fns(cfg), attention_fns(cfg), body_fns(cfg)):
        times = time_interleaved(group, args.repeats)
        base = median(next(iter(times.values())))
        for name, ts_ in times.items():
            rows.append(
                (
                    name,
                    f"{median(ts_):.3f}",
                    " ".join(f"{x:.2f}" for x in ts_),
                    f"{base / median(ts_):.2f}x",
                )
            )
    ceilings.append(dot_flops_per_s())
    print(
        f"machine: {machine()}; float32 jnp.dot 2048^3: "
        f"{' / '.join(f'{c / 1e9:.0f}' for c in ceilings)} GFLOP/s (before / after)"
    )
    print(
        table(
            ("piece, forward+backward", "s (median)", "all rounds", "vs first of its group"), rows
        )
    )


if __name__ == "__main__":
    main()
