"""One training run, top to bottom: `train_and_evaluate(config, workdir)`.

Config -> data -> mesh -> model -> reference -> loader -> optimizer -> state -> compiled steps ->
restore -> loop. The loop body is batch -> step -> hooks (`apo_jax.hooks`: metrics, held-out
evaluation, checkpoints, export). The parts are built by `apo_jax.assemble`; the command line is
`apo_jax.cli`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from apo_jax import assemble, hooks, reference, sharding
from apo_jax import config as config_lib
from apo_jax import metrics as metrics_lib
from apo_jax import train_step as ts
from apo_jax.checkpoint import Checkpointer, StopSignal, abstract_like
from apo_jax.optim import make_optimizer

log = logging.getLogger("apo_jax")


def default_workdir(config: Any) -> str:
    """runs/<loss>_<preset>, the loss spec made path-safe."""
    name = str(config.loss.name).replace(" ", "").replace("*", "x").replace("+", "_")
    return os.path.join("runs", f"{name}_{config.preset}")


def train_and_evaluate(config: Any, workdir: str = "") -> dict[str, Any]:
    """Trains per `config` (a ConfigDict of configs/*.py) in `workdir`, resuming if it holds a
    checkpoint; returns the run's summary (steps, seconds, last train and held-out metrics, paths).
    """
    rc = config_lib.validate(
        config, device_count=jax.device_count(), process_count=jax.process_count()
    )
    workdir = workdir or default_workdir(config)
    _record_config(config, workdir)
    paths = assemble.resolve_data(rc)
    mesh = sharding.make_mesh(rc.mesh.data, rc.mesh.fsdp, rc.mesh.tensor)
    model, model_cfg, weights_fp = assemble.build_model(rc, paths, mesh)
    graphdef, params = ts.split_model(model)
    ref = reference.prepare(rc, (paths.train, paths.eval), graphdef, params, model_cfg,
                            weights_fp, mesh)  # fmt: skip

    train_data = assemble.make_loader(rc, paths.train, ref.info, train=True)
    num_steps = rc.num_steps or (train_data.num_batches or 0)
    if num_steps <= 0:
        raise config_lib.ConfigError(f"{paths.train} gives no full batch of {rc.batch_size} "
                                     "pairs: lower config.batch_size")  # fmt: skip
    tx, schedule = make_optimizer(rc.optim, num_steps)
    state_sh = assemble.state_shardings(params, tx, mesh)
    state = assemble.init_state(params, tx, rc.seed, state_sh)
    steps_fn = assemble.Steps(rc, graphdef, ref, tx, schedule, state_sh, mesh, model_cfg)

    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=rc.checkpoint.keep,
        keep_best=rc.checkpoint.keep_best if paths.eval else 0,
        async_save=rc.checkpoint.async_save,
    )
    start_step, state = _restore(ckpt, state, train_data)

    run = hooks.Run(
        rc=rc, workdir=workdir, paths=paths, graphdef=graphdef, model_cfg=model_cfg,
        steps_fn=steps_fn, train_data=train_data, state=state, num_steps=num_steps,
        start_step=start_step, writer=metrics_lib.MetricWriter(workdir, wandb_project=rc.wandb_project),
        ckpt=ckpt, bar=_progress_bar(rc, num_steps, start_step),
        row_sharding=sharding.batch_sharding(mesh),
    )  # fmt: skip
    side_tasks: list[hooks.Hook] = [hooks.TrainMetrics(rc.log_every, rc.max_bad_steps)]
    if rc.reference.sync_ref_model:  # TR-DPO: the online reference follows the policy
        r = rc.reference
        side_tasks.append(hooks.SyncReference(r.ref_model_sync_steps, r.ref_model_mixup_alpha))
    if paths.eval:
        eval_loader = lambda: assemble.make_loader(rc, paths.eval, ref.info, train=False)  # noqa: E731
        side_tasks.append(hooks.HeldOutEval(rc.eval_every, eval_loader, rc.eval_batches))
    samples = assemble.samples_hook(rc, paths, mesh)
    if samples is not None:
        side_tasks.append(samples)
    side_tasks.append(hooks.Checkpoint(rc.checkpoint.every))
    if rc.export_hf:
        side_tasks.append(hooks.ExportHF())
    if rc.plots:
        side_tasks.append(hooks.Plots())
    return _loop(run, side_tasks)


def _record_config(config: Any, workdir: str) -> None:
    """Keeps the run's config as `<workdir>/config.json` (figures label runs with it)."""
    path = os.path.join(workdir, "config.json")
    if jax.process_index() != 0 or os.path.exists(path):
        return
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(config.to_dict(), f, indent=1, sort_keys=True, default=str)
    os.replace(path + ".tmp", path)


def _restore(ckpt: Checkpointer, state: ts.TrainState, data: Any) -> tuple[int, ts.TrainState]:
    """(step, state) of the newest checkpoint that restores, the loader moved to its position;
    (0, state) when there is none."""
    restored = ckpt.restore(abstract_like(state))
    if restored is None:
        return 0, state
    step, state, data_state, _ = restored
    data.set_state(data_state)
    log.info("resumed from %s at step %d", ckpt.directory, step)
    return step, state


def _progress_bar(rc: config_lib.RunConfig, total: int, initial: int) -> Any:
    show = rc.progress_bar and jax.process_index() == 0 and sys.stderr.isatty()
    return tqdm(total=total, initial=initial, disable=not show, unit="step", dynamic_ncols=True)


def _stop_agreed(stop: StopSignal) -> bool:
    """Whether to stop now; with several processes, a signal seen by any one stops them all at
    the same step (a process that left alone would hang the others in the next collective)."""
    if jax.process_count() == 1:
        return bool(stop)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([int(bool(stop))], np.int32))))


def _loop(run: hooks.Run, side_tasks: list[hooks.Hook]) -> dict[str, Any]:
    """batch -> step -> hooks, to the last step or a stop signal; then the summary."""
    stop, t_start, run.step, finished = StopSignal(), time.perf_counter(), run.start_step, False
    try:
        for step in range(run.start_step + 1, run.num_steps + 1):
            batch = next(run.train_data)
            global_batch = run.train_data.global_batch(batch, run.row_sharding)
            run.state, run.step_metrics = run.steps_fn.train(run.state, global_batch)
            run.step, run.batch = step, batch
            run.tokens_seen += int(np.sum(batch["segment_ids"] > 0)) * jax.process_count()
            run.bar.update(1)
            run.stopping = _stop_agreed(stop)
            for task in side_tasks:
                task.after_step(run)
            if run.stopping:
                name = stop.signal_name or "a stop signal (on another process)"
                log.warning("%s received: checkpoint at step %d saved, stopping", name, step)
                break
        finished = run.step == run.num_steps
    finally:
        run.bar.close()
        run.ckpt.wait()
        stop.restore()
    seconds = time.perf_counter() - t_start
    for task in side_tasks:
        task.at_end(run, finished=finished and not run.stopping)
    run.ckpt.close()
    run.writer.close()
    return _summary(run, seconds)


def _summary(run: hooks.Run, seconds: float) -> dict[str, Any]:
    return {
        "steps": run.step,
        "skipped": int(run.state.skipped),
        "seconds": seconds,
        "tokens_per_sec": run.tokens_seen / max(seconds, 1e-9),
        "loss": run.rc.loss.name,
        "data": run.paths.train,
        "checkpoint": os.path.join(run.ckpt.directory, str(run.step)),
        "hf_export": run.hf_export,
        "plots": run.plots,
        "samples": run.samples,
        "interrupted": run.stopping,
        **run.train_metrics,
        **run.eval_metrics,
    }


def precompute_reference(config: Any, workdir: str = "") -> None:
    """The reference pass of `config` alone (`python -m apo_jax.reference`): writes the stored
    log-probs beside the train and eval shards unless matching ones are there."""
    config.unlock()
    config.reference.mode = "precomputed"
    rc = config_lib.validate(
        config, device_count=jax.device_count(), process_count=jax.process_count()
    )
    del workdir  # the log-probs live beside the shards
    paths = assemble.resolve_data(rc)
    mesh = sharding.make_mesh(rc.mesh.data, rc.mesh.fsdp, rc.mesh.tensor)
    model, model_cfg, weights_fp = assemble.build_model(rc, paths, mesh)
    graphdef, params = ts.split_model(model)
    reference.prepare(rc, (paths.train, paths.eval), graphdef, params, model_cfg, weights_fp, mesh)
