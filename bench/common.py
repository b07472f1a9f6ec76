"""Helpers shared by the benchmarks: shapes, random batches, the jitted step, timing, tables.

Benchmarks are scripts (`python bench/<name>.py`), not tests; each prints one table.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from apo_jax.models.config import LlamaConfig  # noqa: E402
from apo_jax.models.llama import Llama  # noqa: E402
from apo_jax.optim import OptimConfig, make_optimizer  # noqa: E402
from apo_jax.train import train_step as ts  # noqa: E402

# Benchmark 1's shapes (docs/performance.md): a small Llama-3-architecture model.
STEP_MODEL = LlamaConfig(
    vocab_size=32000,
    d_model=512,
    n_layers=8,
    n_heads=8,
    n_kv_heads=2,
    head_dim=64,
    mlp_dim=1536,
    max_seq_len=2048,
    rope_scaling=None,
)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """A step's batch shape: N pairs of T-token rows, the first `prompt` tokens the prompt."""

    pairs: int = 4
    seq: int = 512
    prompt: int = 256


def concat_batch(shp: Shapes, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A full 'concat' batch (no padding): rows 0..N-1 prompt+chosen, N..2N-1 prompt+rejected."""
    rng = np.random.default_rng(seed)
    n, t, p = shp.pairs, shp.seq, shp.prompt
    ids = rng.integers(1, vocab, size=(2 * n, t)).astype(np.int32)
    ids[n:, :p] = ids[:n, :p]
    comp = np.zeros((2 * n, t), np.int32)
    comp[:, p:] = 1
    return {
        "input_ids": ids,
        "completion_mask": comp,
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (2 * n, t)).copy(),
        "segment_ids": np.ones((2 * n, t), np.int32),
        "index": np.arange(n, dtype=np.int32),
        "ref_chosen_logps": (rng.normal(size=n) - 700).astype(np.float32),
        "ref_rejected_logps": (rng.normal(size=n) - 700).astype(np.float32),
    }


def forward_flops(
    cfg: LlamaConfig, shp: Shapes, causal: bool = False, head_tokens: int | None = None
) -> float:
    """Model FLOPs of one forward over the 2N rows (matmuls + attention scores and mixing).

    Matmuls: 2 x (matmul parameters) per token, the unembedding for `head_tokens` per row (default
    all T). Attention: 4 T^2 H Dh per row and layer for the full square, half of it with `causal`
    (what a causal flash kernel computes, and MaxText's convention for MFU).
    """
    D, H, K, Dh, F, V = (
        cfg.d_model,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.mlp_dim,
        cfg.vocab_size,
    )
    body_per_token = cfg.n_layers * (D * Dh * (2 * H + 2 * K) + 3 * D * F)
    rows, t = 2 * shp.pairs, shp.seq
    head = D * V * rows * (t if head_tokens is None else head_tokens)
    attn = cfg.n_layers * rows * 4 * t * t * H * Dh // (2 if causal else 1)
    return 2 * (body_per_token * rows * t + head) + attn


def build_step(cfg: LlamaConfig, step_cfg: ts.StepConfig, seed: int = 0):
    """(jitted step with donated state, state, ref_params) for `cfg`, AdamW at lr 1e-6."""
    model = Llama(cfg, rngs=nnx.Rngs(seed))
    graphdef, params = ts.split_model(model)
    ref_params = jax.tree.map(jnp.copy, params) if step_cfg.reference == "online" else None
    tx, sched = make_optimizer(OptimConfig(learning_rate=1e-6, schedule="constant"), 1000)
    # init_state uses one zero array for step, bad_steps and skipped: copy every leaf so that
    # donation does not see the same buffer twice.
    state = jax.tree.map(jnp.copy, ts.init_state(params, tx, seed))
    fn = functools.partial(ts.train_step, graphdef=graphdef, tx=tx, cfg=step_cfg, schedule=sched)
    return jax.jit(fn, donate_argnums=(0,)), state, ref_params


def block(x):
    """Waits for every array in a pytree."""
    return jax.tree.map(
        lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x
    )


def time_interleaved(
    fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Runs each callable `warmup` times, then `repeats` rounds, one call of each per round.

    Interleaving spreads the shared machine's noise over all candidates alike.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def dot_flops_per_s(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """The machine's matmul ceiling: FLOP/s of an n x n x n `jnp.dot` under jit (median)."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    b = jnp.asarray(np.random.default_rng(1).normal(size=(n, n)), dtype)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    ts_ = time_interleaved({"dot": lambda: f(a, b).block_until_ready()}, repeats)["dot"]
    return 2 * n**3 / median(ts_)


def machine() -> str:
    dev = jax.devices()[0]
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} {dev.platform}"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])
