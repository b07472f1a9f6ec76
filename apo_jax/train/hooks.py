"""Side tasks of the training loop, each a hook with a cadence.

The loop body is batch -> step -> hooks (`apo_jax.train.loop`). After every step the loop makes
one frozen `StepInfo` (the step, the state after it, its device metrics, its batch); each hook
acts when it is due (every `every` steps, and at the last step) and returns what it produced as a
mapping ({} when nothing). What a hook needs besides the step (the metric writer, the
checkpointer, the loaders) it is given when it is made.

Hooks run in list order, and each sees in `info.outputs` what the hooks before it returned at the
same step: the checkpoint hook ranks a checkpoint by the held-out loss measured at its own step.
The loop keeps the latest value of every output for the run's summary.
"""

from __future__ import annotations

import dataclasses
import os
import time
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from apo_jax import metrics as metrics_lib
from apo_jax.errors import UserError
from apo_jax.train import workdir as workdir_lib
from apo_jax.train.checkpoint import Checkpointer

Outputs = Mapping[str, Any]
NONE: Outputs = types.MappingProxyType({})


class NonFiniteError(UserError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """One step as the hooks see it; the loop makes a new one per step and per hook."""

    step: int  # the step just taken (in `at_start`: the step the run starts from)
    num_steps: int  # the run's last step
    state: Any  # the TrainState after `step`
    metrics: Any = None  # `step`'s device metrics (not fetched yet); None in `at_start`
    batch: Mapping[str, np.ndarray] | None = None  # this process's batch of `step`
    flops: float | None = None  # model FLOPs of `step` (its batch shape's), None if unknown
    tokens_seen: int = 0  # real tokens of all processes trained on by this invocation
    stopping: bool = False  # a stop signal was agreed: save and leave after this step
    outputs: Outputs = dataclasses.field(default_factory=lambda: NONE)  # earlier hooks, this step

    @property
    def last(self) -> bool:
        """Whether `step` is the run's last (when the loop has ended: the run finished)."""
        return self.step == self.num_steps


class Hook:
    """Acts every `every` steps (0: only at the last step) and at the last step."""

    every: int = 0

    def due(self, info: StepInfo) -> bool:
        return bool(self.every and info.step % self.every == 0) or info.last

    def after_step(self, info: StepInfo) -> Outputs:
        return self.act(info) if self.due(info) else NONE

    def at_start(self, info: StepInfo) -> Outputs:
        """Called once before the loop's first step (`info.step` is the start step)."""
        return NONE

    def act(self, info: StepInfo) -> Outputs:
        """The hook's work at a due step."""
        return NONE

    def at_end(self, info: StepInfo, *, finished: bool) -> Outputs:
        """Called once when the loop ends (`finished`: it reached the last step)."""
        return NONE


def run_hooks(
    hooks: Sequence[Hook], info: StepInfo, call: Callable[[Hook, StepInfo], Outputs]
) -> dict[str, Any]:
    """`call(hook, info)` for each hook in order, each seeing the outputs of those before it;
    returns all their outputs."""
    produced: dict[str, Any] = {}
    for hook in hooks:
        seen = dataclasses.replace(info, outputs=types.MappingProxyType(dict(produced)))
        produced.update(call(hook, seen) or NONE)
    return produced


class TrainMetrics(Hook):
    """Fetches each step's metrics after the next step is dispatched (so the host never stalls
    the device), stops on too many non-finite steps, and logs window means every `every` steps.

    Returns the logged means as ``train/<name>``.
    """

    def __init__(self, every: int, max_bad_steps: int, writer: Any, say: Callable[[str], None]):
        self.every, self.max_bad_steps = every, max_bad_steps
        self.writer, self.say = writer, say
        self.window: list[dict[str, float]] = []
        self.pending: tuple[int, Any, Any] | None = None
        self.tokens_logged = 0
        self.t_log = time.perf_counter()
        self.peak = metrics_lib.chip_peak_flops()

    def after_step(self, info: StepInfo) -> Outputs:
        if self.pending is not None:
            self.window.append(self._fetch(*self.pending))
        self.pending = (info.step, info.metrics, info.batch["index"])
        if not self.due(info):
            return NONE
        self.window.append(self._fetch(*self.pending))
        self.pending = None
        return self.act(info)

    def _fetch(self, step: int, m: Any, index: Any) -> dict[str, float]:
        host = {k: float(v) for k, v in jax.device_get(m).items()}
        if host["bad_steps"] >= self.max_bad_steps:
            raise NonFiniteError(
                f"{int(host['bad_steps'])} consecutive steps with non-finite loss or gradients, "
                f"the last at step {step} (records {np.asarray(index).tolist()}); lower the "
                "learning rate or check the data"
            )
        return host

    def act(self, info: StepInfo) -> Outputs:
        now = time.perf_counter()
        mean = {k: float(np.mean([w[k] for w in self.window])) for k in self.window[-1]}
        mean["tokens_per_sec"] = (info.tokens_seen - self.tokens_logged) / (now - self.t_log)
        steps_per_sec = mean["tokens_per_sec"] / max(mean["tokens"], 1.0)
        if info.flops:
            mean["flops_per_sec"] = info.flops * steps_per_sec
            if self.peak:
                mean["mfu"] = mean["flops_per_sec"] / (self.peak * jax.device_count())
        logged = {f"train/{k}": v for k, v in mean.items()}
        self.writer.write(info.step, logged)
        self.say(metrics_lib.console_line(info.step, info.num_steps, mean))
        self.window, self.t_log, self.tokens_logged = [], now, info.tokens_seen
        return logged


class HeldOutEval(Hook):
    """Loss metrics over the held-out split (weighted by its real pairs), every `every` steps.

    Returns them as ``eval/<name>``.
    """

    def __init__(
        self,
        every: int,
        make_loader: Callable[[], Any],
        max_batches: int,
        *,
        evaluate: Callable[[Any, Any], Any],
        row_sharding: Any,
        writer: Any,
        say: Callable[[str], None],
    ):
        self.every, self.make_loader, self.max_batches = every, make_loader, max_batches
        self.evaluate, self.row_sharding = evaluate, row_sharding
        self.writer, self.say = writer, say

    def act(self, info: StepInfo) -> Outputs:
        data = self.make_loader()
        sums: dict[str, float] = {}
        total = 0
        for i, batch in enumerate(data):
            if self.max_batches and i >= self.max_batches:
                break
            n = int(np.sum(batch["index"] >= 0))
            m = jax.device_get(
                self.evaluate(info.state, data.global_batch(batch, self.row_sharding))
            )
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            total += n
        measured = {f"eval/{k}": v / max(total, 1) for k, v in sums.items()}
        self.writer.write(info.step, measured)
        shown = {
            k: measured[f"eval/{k}"]
            for k in ("loss", "rewards/accuracies", "kl")
            if f"eval/{k}" in measured
        }
        line = metrics_lib.console_line(info.step, info.num_steps, shown)
        self.say(line.replace("loss", "held-out loss", 1))
        return measured


class Checkpoint(Hook):
    """Saves the state, the loader's position and the run's facts every `every` steps, at the end
    and on a stop. The state is the whole of what a step changes (TR-DPO's reference included),
    so a checkpoint is one tree.

    Args:
      every: the cadence.
      ckpt: the run's Checkpointer.
      data: the training loader, whose position is saved with the state.
      meta: the run's facts saved with each checkpoint (the step is added).
    """

    def __init__(self, every: int, ckpt: Checkpointer, data: Any, meta: Mapping[str, Any]):
        self.every, self.ckpt, self.data, self.meta = every, ckpt, data, dict(meta)

    def due(self, info: StepInfo) -> bool:
        return super().due(info) or info.stopping

    def after_step(self, info: StepInfo) -> Outputs:
        self.ckpt.poll()  # a failed asynchronous save stops the run here, in one line
        return super().after_step(info)

    def act(self, info: StepInfo) -> Outputs:
        # Checkpoints are ranked (keep_best) by the held-out loss measured at their own step.
        ranked = None
        if "eval/loss" in info.outputs:
            ranked = {"eval/loss": info.outputs["eval/loss"]}
        meta = {"step": info.step, **self.meta}
        self.ckpt.save(info.step, info.state, self.data.get_state(), meta, ranked)
        return NONE

    def at_end(self, info: StepInfo, *, finished: bool) -> Outputs:
        self.ckpt.wait()
        return NONE


def checkpoint_meta(
    rc: Any, train_dir: str, data_fp: Mapping[str, str], base: Mapping[str, str]
) -> dict[str, Any]:
    """The run's facts a checkpoint records: preset, loss, data and its fingerprints, and under
    LoRA the base its adapters need (`model.base_record`)."""
    meta = {
        "preset": rc.preset,
        "loss": rc.loss.name,
        "data": train_dir,
        workdir_lib.DATA_KEY: dict(data_fp),
    }
    if base:  # LoRA: adapters and optimizer only; the base they need is recorded
        meta["base"] = dict(base)
    return meta


class Plots(Hook):
    """PNG figures of the run's metrics.jsonl in `<workdir>/plots` when the loop ends.

    Returns ``plots``: their directory.
    """

    def __init__(self, workdir: str, writer: Any):
        self.workdir, self.writer = workdir, writer

    def after_step(self, info: StepInfo) -> Outputs:
        return NONE

    def at_end(self, info: StepInfo, *, finished: bool) -> Outputs:
        if jax.process_index() != 0:
            return NONE
        from apo_jax import plot

        self.writer.flush()
        out_dir = os.path.join(self.workdir, "plots")
        plot.plot_runs([self.workdir], out_dir)
        return {"plots": out_dir}
