"""One training run, top to bottom: `train_and_evaluate(config, workdir)`.

Config -> data -> mesh -> model -> reference -> loader -> optimizer -> state -> compiled steps ->
restore -> hooks -> loop. The loop body is batch -> step -> hooks: after each step the hooks
(`apo_jax.train.hooks`: train metrics, held-out evaluation, samples, checkpoints, export, plots)
get a frozen record of it and return what they produced, which the summary is made of. The parts
come from `data`, `model`, `steps` and `resume`; the command line is `apo_jax.train.cli`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from apo_jax import config as config_lib
from apo_jax import metrics as metrics_lib
from apo_jax import reference, sharding
from apo_jax.data import shards
from apo_jax.optim import make_optimizer
from apo_jax.train import data as data_lib
from apo_jax.train import hooks, integrity, resume, steps, warm_start
from apo_jax.train import model as model_lib
from apo_jax.train import samples as samples_lib
from apo_jax.train import train_step as ts
from apo_jax.train import workdir as workdir_lib
from apo_jax.train.checkpoint import EXIT_STOPPED, Checkpointer, StopSignal
from apo_jax.train.export import ExportHF

log = logging.getLogger("apo_jax")


def default_workdir(config: Any) -> str:
    """runs/<loss>_<preset>, the loss spec made path-safe."""
    name = str(config.loss.name).replace(" ", "").replace("*", "x").replace("+", "_")
    return os.path.join("runs", f"{name}_{config.preset}")


def train_and_evaluate(
    config: Any, workdir: str = "", *, allow_config_change: bool = False
) -> dict[str, Any]:
    """Trains per `config` (a ConfigDict of configs/*.py) in `workdir`, resuming if it holds a
    checkpoint; returns the run's summary (steps, seconds, last train and held-out metrics, paths).

    The workdir is locked for the run (`apo_jax.train.workdir.Lock`). A resume must keep the config
    fields that define the run (`workdir.RUN_DEFINING`); `allow_config_change` lets it go on with
    the new ones, recorded in metrics.jsonl.
    """
    rc = config_lib.validate(
        config, device_count=jax.device_count(), process_count=jax.process_count()
    )
    workdir = workdir or default_workdir(config)
    workdir_lib.check_usable(workdir)
    lock = workdir_lib.Lock(workdir) if jax.process_index() == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        return _train(config, rc, workdir, allow_config_change, lock)
    finally:
        if lock is not None:
            lock.release()


def _train(
    config: Any,
    rc: config_lib.RunConfig,
    workdir: str,
    allow_config_change: bool,
    lock: workdir_lib.Lock | None,
) -> dict[str, Any]:
    changes = resume.check_config(config, workdir, allow_config_change)
    paths = data_lib.resolve_data(rc)
    integrity.verify_shards((paths.train, paths.eval), rc.data.verify)
    rc = warm_start.apply(rc, paths.demo_root, train_and_evaluate)  # the demo's cached warm start
    data_fp = integrity.data_identity(paths.train, paths.eval)
    changes.update(resume.check_data(workdir, data_fp, allow_config_change))  # before the reference
    integrity.check_tokenizer(
        paths.manifest,
        model_lib.model_config_dir(rc),
        shards.read_manifest(paths.eval) if paths.eval else None,
    )
    mesh = sharding.make_mesh(rc.mesh.data, rc.mesh.fsdp, rc.mesh.tensor)
    model, model_cfg, weights_fp = model_lib.build_model(rc, paths, mesh)
    rc = data_lib.resolve_layout(rc, paths, model_cfg)  # config.data.layout=auto
    policy = model_lib.split_policy(rc, model, mesh)  # LoRA: adapters train, the base is frozen
    ref = reference.prepare(
        rc,
        (paths.train, paths.eval),
        policy.base_graphdef,
        policy.base_params,
        model_cfg,
        weights_fp,
        mesh,
        workdir,
        shared=policy.frozen is not None,
    )

    train_data = data_lib.make_loader(
        rc, paths.train, ref.info, train=True, reference_workdir=ref.workdir
    )
    num_steps = rc.num_steps or (train_data.num_batches or 0)
    if num_steps <= 0:
        raise config_lib.ConfigError(
            f"{paths.train} gives no full batch of {rc.batch_size} pairs: lower config.batch_size"
        )
    tx, schedule = make_optimizer(rc.optim, num_steps)
    moving_ref = ref.params if rc.reference.sync_ref_model else None  # TR-DPO's is train state
    state_sh = steps.state_shardings(policy.params, tx, mesh, moving_ref)
    state = steps.init_state(policy.params, tx, rc.seed, state_sh, moving_ref)
    steps_fn = steps.Steps(
        rc, policy.graphdef, ref, tx, schedule, state_sh, mesh, model_cfg, frozen=policy.frozen
    )
    base = model_lib.base_record(rc, weights_fp)

    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=rc.checkpoint.keep,
        keep_best=rc.checkpoint.keep_best if paths.eval else 0,
        async_save=rc.checkpoint.async_save,
    )
    start_step, state, meta = resume.restore(ckpt, state, train_data, base)
    changes.update(
        workdir_lib.check_data(
            meta.get(workdir_lib.DATA_KEY),
            data_fp,
            allow=allow_config_change,
            where=f"checkpoint {ckpt.directory}/{start_step}",
        )
    )
    if jax.process_index() == 0:  # the run's config, compared by the next resume; figures' labels
        workdir_lib.write_config(workdir, config.to_dict())
    writer = metrics_lib.MetricWriter(
        workdir, wandb_project=rc.wandb_project, resume_step=start_step
    )
    if changes:
        writer.write_event(start_step, {"config_change": changes})

    bar = _progress_bar(rc, num_steps, start_step)
    say = _console(bar)
    row_sharding = sharding.batch_sharding(mesh)
    side_tasks: list[hooks.Hook] = [hooks.TrainMetrics(rc.log_every, rc.max_bad_steps, writer, say)]
    if paths.eval:
        eval_loader = functools.partial(
            data_lib.make_loader,
            rc,
            paths.eval,
            ref.info,
            train=False,
            reference_workdir=ref.workdir,
        )
        side_tasks.append(
            hooks.HeldOutEval(
                rc.eval_every,
                eval_loader,
                rc.eval_batches,
                evaluate=steps_fn.evaluate,
                row_sharding=row_sharding,
                writer=writer,
                say=say,
            )
        )
    samples = samples_lib.samples_hook(
        rc, paths, mesh, workdir=workdir, writer=writer, model=policy.module
    )
    if samples is not None:
        side_tasks.append(samples)
    facts = hooks.checkpoint_meta(rc, paths.train, data_fp, base)
    side_tasks.append(hooks.Checkpoint(rc.checkpoint.every, ckpt, train_data, facts))
    if rc.export_hf:
        side_tasks.append(
            ExportHF(
                workdir,
                policy,
                model_cfg,
                tokenizer_dir=paths.tokenizer,
                lora_cfg=rc.lora,
                base=base,
            )
        )
    if rc.plots:
        side_tasks.append(hooks.Plots(workdir, writer))

    loop = _Loop(steps_fn, train_data, row_sharding, side_tasks, ckpt, writer, bar)
    on_abandon = lock.release if lock is not None else None
    end = loop.run(state, start_step, num_steps, on_abandon=on_abandon)
    return _summary(rc, paths.train, ckpt.directory, end)


def _progress_bar(rc: config_lib.RunConfig, total: int, initial: int) -> Any:
    show = rc.progress_bar and jax.process_index() == 0 and sys.stderr.isatty()
    return tqdm(total=total, initial=initial, disable=not show, unit="step", dynamic_ncols=True)


def _console(bar: Any) -> Any:
    """A console line from process 0, above the progress bar (bar.write prints even when the bar
    is disabled)."""

    def say(line: str) -> None:
        if jax.process_index() == 0:
            bar.write(line)

    return say


def _stop_agreed(stop: StopSignal) -> bool:
    """Whether to stop now; with several processes, a signal seen by any one stops them all at
    the same step (a process that left alone would hang the others in the next collective)."""
    if jax.process_count() == 1:
        return bool(stop)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([int(bool(stop))], np.int32))))


@dataclasses.dataclass(frozen=True)
class LoopEnd:
    """How the loop ended: the last step taken and its state, and what the hooks returned."""

    step: int
    num_steps: int
    state: ts.TrainState
    stopped: bool  # a stop signal ended it (at the last step the run still finished)
    seconds: float
    tokens_seen: int  # real tokens of all processes trained on by this invocation
    outputs: dict[str, Any]  # the latest value of every hook output

    @property
    def finished(self) -> bool:
        return self.step == self.num_steps


@dataclasses.dataclass(frozen=True)
class _Loop:
    """What the loop uses besides the state: compiled steps, data, hooks, checkpoints, output."""

    steps_fn: steps.Steps
    data: Any  # this process's training loader
    row_sharding: Any  # how batch rows are laid over the mesh
    side_tasks: list[hooks.Hook]
    ckpt: Checkpointer
    writer: metrics_lib.MetricWriter
    bar: Any  # the tqdm progress bar

    def run(
        self, state: ts.TrainState, start_step: int, num_steps: int, *, on_abandon: Any = None
    ) -> LoopEnd:
        """batch -> step -> hooks, from `start_step` to `num_steps` or a stop signal."""
        stop = StopSignal(on_abandon=on_abandon)
        t_start, step, stopping, tokens_seen = time.perf_counter(), start_step, False, 0
        try:
            info = hooks.StepInfo(step=step, num_steps=num_steps, state=state)
            outputs = hooks.run_hooks(self.side_tasks, info, lambda h, i: h.at_start(i))
            try:
                for step in range(start_step + 1, num_steps + 1):
                    stop.stop_step = step  # a signal from here to the check below stops after it
                    batch = next(self.data)
                    global_batch = self.data.global_batch(batch, self.row_sharding)
                    state, metrics = self.steps_fn.train(state, global_batch)
                    tokens_seen += int(np.sum(batch["segment_ids"] > 0)) * jax.process_count()
                    self.bar.update(1)
                    stopping = _stop_agreed(stop)
                    stop.stop_step = min(step + 1, num_steps)  # a later signal: the next step
                    if not stopping and jax.process_count() == 1 and stop.signal_step == step:
                        stopping = True  # the signal came between the check and the line above
                    info = hooks.StepInfo(
                        step=step,
                        num_steps=num_steps,
                        state=state,
                        metrics=metrics,
                        batch=batch,
                        flops=self.steps_fn.flops,
                        tokens_seen=tokens_seen,
                        stopping=stopping,
                    )
                    outputs.update(
                        hooks.run_hooks(self.side_tasks, info, lambda h, i: h.after_step(i))
                    )
                    if stopping:
                        break
            finally:
                self.bar.close()
                # A failed save raises here (one line) unless something else did; a stop is
                # announced only once its checkpoint is committed.
                self.ckpt.wait()
            if stopping:
                _announce_stop(stop, step, num_steps, self.ckpt)
            seconds = time.perf_counter() - t_start
            info = hooks.StepInfo(
                step=step,
                num_steps=num_steps,
                state=state,
                tokens_seen=tokens_seen,
                stopping=stopping,
            )
            # A stop at the last step still finished: exports run.
            outputs.update(
                hooks.run_hooks(self.side_tasks, info, lambda h, i: h.at_end(i, finished=i.last))
            )
            self.ckpt.close()
            self.writer.close()
        finally:
            stop.restore()
        return LoopEnd(step, num_steps, state, stopping, seconds, tokens_seen, outputs)


def _announce_stop(stop: StopSignal, step: int, num_steps: int, ckpt: Checkpointer) -> None:
    """Says what a stop left behind, once its checkpoint is committed (the loop waited)."""
    name = stop.signal_name or "a stop signal (on another process)"
    if step == num_steps:
        log.warning("%s received at the last step: the run is complete", name)
    elif step in ckpt.steps():
        log.warning(
            "%s received: checkpoint of step %d committed in %s; stopping (exit %d: "
            "rerun the same command to resume)",
            name,
            step,
            ckpt.directory,
            EXIT_STOPPED,
        )
    else:
        log.warning("%s received: stopping at step %d without a checkpoint of it", name, step)


def _summary(
    rc: config_lib.RunConfig, train_dir: str, ckpt_dir: str, end: LoopEnd
) -> dict[str, Any]:
    out = end.outputs
    return {
        "steps": end.step,
        "skipped": int(end.state.skipped),
        "seconds": end.seconds,
        "tokens_per_sec": end.tokens_seen / max(end.seconds, 1e-9),
        "loss": rc.loss.name,
        "data": train_dir,
        "checkpoint": os.path.join(ckpt_dir, str(end.step)),
        "hf_export": out.get("hf_export", ""),
        "plots": out.get("plots", ""),
        "samples": out.get("samples", []),
        "samples_step": out.get("samples_step", -1),
        "samples_before": out.get("samples_before", []),
        "interrupted": end.stopped,
        "finished": end.finished,
        "num_steps": end.num_steps,
        **{k: v for k, v in out.items() if k.startswith("train/")},
        **{k: v for k, v in out.items() if k.startswith("eval/")},
    }


def precompute_reference(config: Any, workdir: str = "") -> None:
    """The reference pass of `config` alone (`python -m apo_jax.reference`): writes the stored
    log-probs beside the train and eval shards unless matching ones are there (into `workdir`
    for a read-only shard directory, when one is given)."""
    config = copy.deepcopy(config)  # the caller's config stays as it was
    config.unlock()
    config.reference.mode = "precomputed"
    rc = config_lib.validate(
        config, device_count=jax.device_count(), process_count=jax.process_count()
    )
    paths = data_lib.resolve_data(rc)
    integrity.verify_shards((paths.train, paths.eval), rc.data.verify)
    rc = warm_start.apply(rc, paths.demo_root, train_and_evaluate)
    mesh = sharding.make_mesh(rc.mesh.data, rc.mesh.fsdp, rc.mesh.tensor)
    model, model_cfg, weights_fp = model_lib.build_model(rc, paths, mesh)
    graphdef, params = ts.split_model(model)
    reference.prepare(
        rc,
        (paths.train, paths.eval),
        graphdef,
        params,
        model_cfg,
        weights_fp,
        mesh,
        workdir,
        shared=rc.lora.enabled,
    )
