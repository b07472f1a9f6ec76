"""Where metrics go: console, `metrics.jsonl`, TensorBoard, and Weights & Biases when asked.

Only process 0 writes. A resumed run first drops the rows of steps after the restored checkpoint
(metrics.jsonl, samples.jsonl; TensorBoard by its purge step), so every step is logged once.
Also the MFU estimate: the step's model FLOPs over the chip's peak.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import jax

from apo_jax import atomic

log = logging.getLogger("apo_jax")

# Dense peak FLOP/s per chip for bf16 matmuls (vendor figures), matched against device_kind.
PEAK_FLOPS = {
    "h100": 989e12,
    "h200": 989e12,
    "gh200": 989e12,
    "b200": 2250e12,
    "a100": 312e12,
    "l4": 121e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
}


def chip_peak_flops(device: jax.Device | None = None) -> float | None:
    """The chip's dense bf16 peak FLOP/s, or None for chips not in the table (CPUs included)."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name in kind:
            return PEAK_FLOPS[name]
    return None


def model_flops(cfg: Any, rows: int, seq_len: int, *, online_reference: bool) -> float:
    """Model FLOPs of one train step on `rows` rows of `seq_len` tokens (padding included).

    A forward costs 2 FLOPs per matmul weight per token (the embedding lookup is free) plus
    4 T^2 H Dh per row and layer for the attention scores and values; a training step is a
    forward and a backward (3 forwards), plus one forward of an online reference. XLA's cost
    analysis is not used for this: it counts the body of a `lax.scan` (the scanned layers, the
    log-prob chunks) once.
    """
    D, Dh, H, K, F, L = (
        cfg.d_model,
        cfg.head_dim,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.mlp_dim,
        cfg.n_layers,
    )
    matmul_params = L * (D * Dh * (2 * H + 2 * K) + 3 * D * F) + D * cfg.vocab_size
    tokens = rows * seq_len
    forward = 2 * matmul_params * tokens + 4 * seq_len * seq_len * H * Dh * L * rows
    return forward * (4 if online_reference else 3)


JSONL_LOGS = ("metrics.jsonl", "samples.jsonl")  # per-step rows of a workdir


def drop_rows_after(path: str, step: int) -> int:
    """Removes the rows of `path` (JSON lines with a "step") logged after `step`; returns how
    many. The file is replaced atomically; a line that does not parse is kept."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                late = int(json.loads(line)["step"]) > step
            except (ValueError, KeyError, TypeError):
                late = False
            if late:
                dropped += 1
            elif line.strip():
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)

        atomic.write_file(path, write)  # a full disk keeps the file as it was
    return dropped


class MetricWriter:
    """Writes scalar metrics of process 0 to metrics.jsonl, TensorBoard and optionally W&B.

    Args:
      workdir: the run's directory.
      wandb_project: log to this W&B project too ('' = off).
      config: the run config for W&B.
      resume_step: the step the run continues from (0 for a fresh start): rows of later steps,
        left by a run that died after its last checkpoint, are dropped first.
    """

    def __init__(
        self,
        workdir: str,
        *,
        wandb_project: str = "",
        config: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
    ):
        self.active = jax.process_index() == 0
        self._jsonl = self._tb = self._wandb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        if resume_step is not None:
            for name in JSONL_LOGS:
                n = drop_rows_after(os.path.join(workdir, name), resume_step)
                if n:
                    log.info("%s: dropped %d rows after step %d (re-run now)", name, n, resume_step)
        self._path = os.path.join(workdir, "metrics.jsonl")
        self._jsonl = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard discards the earlier events of steps >= it.
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)
        except ImportError:
            log.warning("tensorboardX is not installed: no TensorBoard event files")
        if wandb_project:
            try:
                import wandb

                self._wandb = wandb.init(
                    project=wandb_project, config=dict(config or {}), dir=workdir
                )
            except ImportError:
                log.warning(
                    "config.wandb_project is set but wandb is not installed: pip install wandb"
                )

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._append(step, json.dumps({"step": step, **clean}))
        if self._tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def write_event(self, step: int, event: Mapping[str, Any]) -> None:
        """A non-scalar row of metrics.jsonl (e.g. {"config_change": {...}}); not in TensorBoard."""
        if self.active:
            self._append(step, json.dumps({"step": step, **event}, default=str))

    def _append(self, step: int, row: str) -> None:
        """Appends one line whole (one write); a failed or short write (a full disk) is cut back
        so the file keeps exactly its earlier rows, and is one line naming the file."""
        data = (row + "\n").encode()
        size = os.fstat(self._jsonl).st_size
        try:
            written = os.write(self._jsonl, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"short write: {written} of {len(data)} bytes")
        except OSError as e:
            try:
                os.ftruncate(self._jsonl, size)
            except OSError:
                pass
            raise atomic.WriteError(
                f"{self._path}: cannot write the row of step {step} ({e.strerror or e}); the rows "
                "before it are kept: free some space and rerun the same command to resume"
            ) from None

    def flush(self) -> None:
        """Nothing to flush: every row of metrics.jsonl is written when logged."""

    def write_text(self, step: int, tag: str, text: str) -> None:
        """A text entry (markdown) for TensorBoard's text tab and W&B; not in metrics.jsonl."""
        if not self.active:
            return
        if self._tb is not None:
            self._tb.add_text(tag, text, step)
        if self._wandb is not None:
            self._wandb.log({tag: text}, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            os.close(self._jsonl)
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def console_line(step: int, total: int, m: Mapping[str, float]) -> str:
    """One short human line per log interval."""
    parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}"]
    for key, label, fmt in (
        ("rewards/accuracies", "acc", ".3f"),
        ("rewards/margins", "margin", ".4f"),
        ("grad_norm", "|g|", ".3f"),
        ("learning_rate", "lr", ".2e"),
        ("tokens_per_sec", "tok/s", ",.0f"),
        ("mfu", "mfu", ".1%"),
    ):
        if key in m and math.isfinite(m[key]):
            parts.append(f"{label} {m[key]:{fmt}}")
    return "  ".join(parts)
