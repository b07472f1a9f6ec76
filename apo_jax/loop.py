"""The training loop: steps, held-out evaluation, metrics, checkpoints, preemption, export."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from apo_jax import metrics as metrics_lib
from apo_jax import sharding, trainer
from apo_jax import train_step as ts
from apo_jax.checkpoint import Checkpointer, StopSignal, abstract_like
from apo_jax.data import loader as loader_lib
from apo_jax.run_config import ConfigError

log = logging.getLogger("apo_jax")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def _stop_agreed(stop: StopSignal) -> bool:
    """Whether to stop now; with several processes, a signal seen by any one stops them all at
    the same step (a process that left alone would hang the others in the next collective)."""
    if jax.process_count() == 1:
        return bool(stop)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([int(bool(stop))], np.int32))))


class Loop:
    """Holds the run's state and drives it; `run()` trains to the end (or to a stop signal)."""

    def __init__(self, built: trainer.Built):
        b = built
        rc, workdir, paths, mesh, params = b.rc, b.workdir, b.paths, b.mesh, b.params
        graphdef, ref_graphdef, ref_params = b.graphdef, b.ref_graphdef, b.ref_params
        ref_mode, info, model_cfg = b.ref_mode, b.info, b.model_cfg
        self.rc, self.workdir, self.paths, self.mesh = rc, workdir, paths, mesh
        self.graphdef, self.model_cfg, self.ref_params = graphdef, model_cfg, ref_params
        self.ref_mode, self.info = ref_mode, info
        self.train_data = self._loader(paths.train, train=True)
        self.steps = rc.num_steps or (self.train_data.num_batches or 0)
        if self.steps <= 0:
            raise ConfigError(
                f"{paths.train} gives no full batch of {rc.batch_size} pairs: lower config.batch_size"
            )
        self.tx, self.schedule = trainer.make_tx(rc, self.steps)
        self.state_sh = trainer.state_shardings(params, self.tx, mesh)
        self.state = jax.jit(
            lambda p: ts.init_state(p, self.tx, rc.seed), out_shardings=self.state_sh
        )(params)
        scfg = trainer.step_config(rc, ref_mode)
        self.train_jit, self.eval_jit = trainer.compile_steps(
            graphdef, ref_graphdef, self.tx, self.schedule, scfg, self.state_sh, mesh
        )
        self.row_sh = sharding.batch_sharding(mesh)
        self.ckpt = Checkpointer(
            os.path.join(workdir, "checkpoints"),
            keep=rc.checkpoint["keep"],
            keep_best=rc.checkpoint["keep_best"] if paths.eval else 0,
            async_save=rc.checkpoint["async_save"],
        )
        self.writer = metrics_lib.MetricWriter(workdir, wandb_project=rc.wandb_project)
        self.start_step = self._restore()
        self.flops: float | None = None
        self._executables: dict[Any, Any] = {}

    def _loader(self, shard_dir: str, *, train: bool) -> Any:
        cfg = trainer.loader_config(self.rc, train=train, info=self.info, ref_mode=self.ref_mode)
        if train and self.rc.num_steps:
            cfg = type(cfg)(**{**cfg.__dict__, "num_epochs": None})  # repeat until num_steps
        try:
            return loader_lib.make_loader(shard_dir, cfg)
        except ValueError as e:  # the loader's checks of seq_len, batch size and shards
            raise ConfigError(f"config.data: {e}") from None

    def _restore(self) -> int:
        restored = self.ckpt.restore(abstract_like(self.state))
        if restored is None:
            return 0
        step, self.state, data_state, _ = restored
        self.train_data.set_state(data_state)
        log.info("resumed from %s at step %d", self.ckpt.directory, step)
        return step

    def _meta(self, step: int) -> dict[str, Any]:
        return {
            "step": step,
            "preset": self.rc.preset,
            "loss": str(self.rc.loss["name"]),
            "data": self.paths.train,
        }

    def evaluate(self) -> dict[str, float]:
        """Metrics over the held-out split, weighted by real pairs per batch."""
        data = self._loader(self.paths.eval, train=False)
        sums: dict[str, float] = {}
        total = 0
        for i, batch in enumerate(data):
            if self.rc.eval_batches and i >= self.rc.eval_batches:
                break
            n = int(np.sum(batch["index"] >= 0))
            g = data.global_batch(batch, self.row_sh)
            m = jax.device_get(self.eval_jit(self.state.params, g, self.ref_params))
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            total += n
        return {f"eval/{k}": v / max(total, 1) for k, v in sums.items()}

    def _train_call(self, g: dict[str, Any]) -> tuple[Any, Any]:
        """Runs the step compiled ahead of time for this batch shape (so its FLOPs are known).

        Shapes vary with buckets and with packed rows; each compiles once and is kept.
        """
        key = g["input_ids"].shape
        if key not in self._executables:
            exe = self.train_jit.lower(self.state, g, self.ref_params).compile()
            rows, seq_len = key
            flops = metrics_lib.model_flops(
                self.model_cfg, rows, seq_len, online_reference=self.ref_mode == "online"
            )
            self._executables[key] = exe, flops
        exe, self.flops = self._executables[key]
        return exe(self.state, g, self.ref_params)

    def run(self) -> dict[str, Any]:
        rc, stop = self.rc, StopSignal()
        peak = metrics_lib.chip_peak_flops()
        bar = tqdm(
            total=self.steps,
            initial=self.start_step,
            disable=not rc.progress_bar or jax.process_index() != 0 or not sys.stderr.isatty(),
            unit="step",
            dynamic_ncols=True,
        )
        pending, window, last_train, eval_m, stopping = None, [], {}, {}, False
        t_start = t_log = time.perf_counter()
        tokens, tokens_log, step = 0, 0, self.start_step
        try:
            for step in range(self.start_step + 1, self.steps + 1):
                batch = next(self.train_data)
                g = self.train_data.global_batch(batch, self.row_sh)
                self.state, m = self._train_call(g)
                tokens += int(np.sum(batch["segment_ids"] > 0)) * jax.process_count()
                if pending is not None:  # step N's metrics are read after step N+1 is dispatched
                    window.append(self._check(*pending))
                pending = (step, m, batch["index"])
                bar.update(1)
                if step % rc.log_every == 0 or step == self.steps:
                    window.append(self._check(*pending))
                    pending = None
                    now = time.perf_counter()
                    last_train = self._log(
                        step, window, (tokens - tokens_log) / (now - t_log), peak, bar
                    )
                    window, t_log, tokens_log = [], now, tokens
                saved_eval = None
                if self.paths.eval and (
                    (rc.eval_every and step % rc.eval_every == 0) or step == self.steps
                ):
                    eval_m = self.evaluate()
                    self.writer.write(step, eval_m)
                    if jax.process_index() == 0:  # bar.write prints even when the bar is off
                        bar.write(
                            metrics_lib.console_line(
                                step,
                                self.steps,
                                {
                                    "loss": eval_m["eval/loss"],
                                    "rewards/accuracies": eval_m["eval/rewards/accuracies"],
                                },
                            ).replace("loss", "held-out loss", 1)
                        )
                    saved_eval = {"eval/loss": eval_m["eval/loss"]}
                every = rc.checkpoint["every"]
                stopping = _stop_agreed(stop)
                if (every and step % every == 0) or step == self.steps or stopping:
                    self.ckpt.save(
                        step, self.state, self.train_data.get_state(), self._meta(step), saved_eval
                    )
                if stopping:
                    log.warning(
                        "%s received: checkpoint at step %d saved, stopping",
                        stop.signal_name or "a stop signal (on another process)",
                        step,
                    )
                    break
        finally:
            bar.close()
            self.ckpt.wait()
            stop.restore()
        seconds = time.perf_counter() - t_start
        summary = self._summary(step, seconds, tokens, last_train, eval_m, interrupted=stopping)
        self.ckpt.close()
        self.writer.close()
        return summary

    def _check(self, step: int, m: Any, index: Any) -> dict[str, float]:
        host = {k: float(v) for k, v in jax.device_get(m).items()}
        if host["bad_steps"] >= self.rc.max_bad_steps:
            raise NonFiniteError(
                f"{int(host['bad_steps'])} consecutive steps with non-finite loss or gradients, the last "
                f"at step {step} (records {np.asarray(index).tolist()}); lower the learning rate or check the data"
            )
        return host

    def _log(
        self, step: int, window: list[dict[str, float]], tok_s: float, peak: float | None, bar: Any
    ) -> dict[str, float]:
        mean = {k: float(np.mean([w[k] for w in window])) for k in window[-1]}
        mean["tokens_per_sec"] = tok_s
        steps_per_sec = tok_s / max(mean["tokens"], 1.0)
        if self.flops:
            mean["flops_per_sec"] = self.flops * steps_per_sec
            if peak:
                mean["mfu"] = mean["flops_per_sec"] / (peak * jax.device_count())
        out = {f"train/{k}": v for k, v in mean.items()}
        self.writer.write(step, out)
        if jax.process_index() == 0:
            bar.write(metrics_lib.console_line(step, self.steps, mean))
        return out

    def _summary(
        self, step, seconds, tokens, train_m, eval_m, *, interrupted: bool
    ) -> dict[str, Any]:
        export = ""
        if self.rc.export_hf and not interrupted:
            export = self.export_hf(os.path.join(self.workdir, "hf"))
        return {
            "steps": step,
            "skipped": int(self.state.skipped),
            "seconds": seconds,
            "tokens_per_sec": tokens / max(seconds, 1e-9),
            "loss": str(self.rc.loss["name"]),
            "data": self.paths.train,
            "checkpoint": os.path.join(self.ckpt.directory, str(step)),
            "hf_export": export,
            "interrupted": interrupted,
            **train_m,
            **eval_m,
        }

    def export_hf(self, out_dir: str) -> str:
        """Writes the current policy as a Hugging Face checkpoint directory (process 0)."""
        from apo_jax.models import hf

        params = jax.device_get(self.state.params) if jax.process_count() == 1 else None
        if params is None:
            from jax.experimental import multihost_utils

            params = multihost_utils.process_allgather(self.state.params, tiled=True)
        if jax.process_index() == 0:
            model = nnx.merge(self.graphdef, params)
            hf.save_hf(model, self.model_cfg, out_dir, tokenizer_dir=self.paths.tokenizer or None)
        return out_dir
