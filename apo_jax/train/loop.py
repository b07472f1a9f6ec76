"""One training run, top to bottom: `train_and_evaluate(config, workdir)`.

Config -> data -> mesh -> model -> reference -> loader -> optimizer -> state -> compiled steps ->
restore -> loop. The loop body is batch -> step -> hooks (`apo_jax.train.hooks`: metrics, held-out
evaluation, checkpoints, export). The parts are built by `apo_jax.train.assemble`; the command line is
`apo_jax.train.cli`.
"""

from __future__ import annotations

import dataclasses
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
from apo_jax.train import hooks, integrity, steps, warm_start
from apo_jax.train import model as model_lib
from apo_jax.train import samples as samples_lib
from apo_jax.train import train_step as ts
from apo_jax.train import workdir as workdir_lib
from apo_jax.train.checkpoint import EXIT_STOPPED, Checkpointer, StopSignal, abstract_like

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


def _train(config: Any, rc: config_lib.RunConfig, workdir: str, allow_config_change: bool,
           lock: workdir_lib.Lock | None) -> dict[str, Any]:  # fmt: skip
    changes = _check_config(config, workdir, allow_config_change)
    paths = data_lib.resolve_data(rc)
    integrity.verify_shards((paths.train, paths.eval), rc.data.verify)
    rc = _with_warm_start(rc, paths)  # the demo starts from its cached warm start
    data_fp = integrity.data_identity(paths.train, paths.eval)
    if _has_checkpoint(workdir):  # before the reference pass: other data is refused early
        meta = workdir_lib.newest_checkpoint_meta(workdir)
        changes.update(workdir_lib.check_data(meta.get(workdir_lib.DATA_KEY), data_fp,
                                              allow=allow_config_change,
                                              where=f"{workdir}/checkpoints"))  # fmt: skip
    integrity.check_tokenizer(paths.manifest, model_lib.model_config_dir(rc),
                              shards.read_manifest(paths.eval) if paths.eval else None)  # fmt: skip
    mesh = sharding.make_mesh(rc.mesh.data, rc.mesh.fsdp, rc.mesh.tensor)
    model, model_cfg, weights_fp = model_lib.build_model(rc, paths, mesh)
    rc = data_lib.resolve_layout(rc, paths, model_cfg)  # config.data.layout=auto
    policy = model_lib.split_policy(rc, model, mesh)  # with LoRA: adapters train, the base is frozen
    graphdef, params = policy.graphdef, policy.params
    ref = reference.prepare(rc, (paths.train, paths.eval), policy.base_graphdef,
                            policy.base_params, model_cfg, weights_fp, mesh, workdir,
                            shared=policy.frozen is not None)  # fmt: skip

    train_data = data_lib.make_loader(
        rc, paths.train, ref.info, train=True, reference_workdir=ref.workdir
    )
    num_steps = rc.num_steps or (train_data.num_batches or 0)
    if num_steps <= 0:
        raise config_lib.ConfigError(f"{paths.train} gives no full batch of {rc.batch_size} "
                                     "pairs: lower config.batch_size")  # fmt: skip
    tx, schedule = make_optimizer(rc.optim, num_steps)
    state_sh = steps.state_shardings(params, tx, mesh)
    state = steps.init_state(params, tx, rc.seed, state_sh)
    steps_fn = steps.Steps(rc, graphdef, ref, tx, schedule, state_sh, mesh, model_cfg,
                              frozen=policy.frozen)  # fmt: skip
    base = model_lib.base_record(rc, weights_fp)

    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=rc.checkpoint.keep,
        keep_best=rc.checkpoint.keep_best if paths.eval else 0,
        async_save=rc.checkpoint.async_save,
    )
    start_step, state, meta = _restore(ckpt, rc, state, steps_fn, train_data, base)
    changes.update(workdir_lib.check_data(meta.get(workdir_lib.DATA_KEY), data_fp,
                                          allow=allow_config_change,
                                          where=f"checkpoint {ckpt.directory}/{start_step}"))  # fmt: skip
    if jax.process_index() == 0:  # the run's config, compared by the next resume; figures' labels
        workdir_lib.write_config(workdir, config.to_dict())
    writer = metrics_lib.MetricWriter(workdir, wandb_project=rc.wandb_project,
                                      resume_step=start_step)  # fmt: skip
    if changes:
        writer.write_event(start_step, {"config_change": changes})

    run = hooks.Run(
        rc=rc, workdir=workdir, paths=paths, graphdef=graphdef, model_cfg=model_cfg,
        steps_fn=steps_fn, train_data=train_data, state=state, num_steps=num_steps,
        start_step=start_step, writer=writer,
        ckpt=ckpt, bar=_progress_bar(rc, num_steps, start_step),
        row_sharding=sharding.batch_sharding(mesh), policy=policy, base=base, data_fp=data_fp,
    )  # fmt: skip
    side_tasks: list[hooks.Hook] = [hooks.TrainMetrics(rc.log_every, rc.max_bad_steps)]
    if rc.reference.sync_ref_model:  # TR-DPO: the online reference follows the policy
        r = rc.reference
        side_tasks.append(hooks.SyncReference(r.ref_model_sync_steps, r.ref_model_mixup_alpha))
    if paths.eval:
        eval_loader = lambda: data_lib.make_loader(rc, paths.eval, ref.info, train=False,  # noqa: E731
                                                   reference_workdir=ref.workdir)  # fmt: skip
        side_tasks.append(hooks.HeldOutEval(rc.eval_every, eval_loader, rc.eval_batches))
    samples = samples_lib.samples_hook(rc, paths, mesh)
    if samples is not None:
        side_tasks.append(samples)
    side_tasks.append(hooks.Checkpoint(rc.checkpoint.every))
    if rc.export_hf:
        side_tasks.append(hooks.ExportHF())
    if rc.plots:
        side_tasks.append(hooks.Plots())
    return _loop(run, side_tasks, on_abandon=lock.release if lock is not None else None)


def _with_warm_start(rc: config_lib.RunConfig, paths: data_lib.DataPaths) -> config_lib.RunConfig:
    """`rc` with the demo's warm start as config.model.hf_path (`apo_jax.train.warm_start`, built once
    by this trainer from the demo's paired training shards); unchanged off the demo data, with a
    model.hf_path of its own or with demo.warm_start_steps=0."""
    if not paths.demo_root or rc.model.hf_path or not rc.demo.warm_start_steps:
        return rc
    root = warm_start.directory(paths.demo_root, rc.demo.warm_start_steps, rc.model.preset, rc.seed)
    if jax.process_count() > 1 and not os.path.exists(os.path.join(root, "hf", "config.json")):
        raise config_lib.ConfigError(
            f"the demo's warm start ({root}) is built by one process: run the same command once "
            "on one process first, or pass --config.demo.warm_start_steps=0 (random weights)"
        )
    hf_dir = warm_start.build(paths.demo_root, os.path.join(paths.demo_root, "train_shards"),
                              steps=rc.demo.warm_start_steps, preset=rc.model.preset,
                              seed=rc.seed, train=train_and_evaluate)  # fmt: skip
    return dataclasses.replace(rc, model=dataclasses.replace(rc.model, hf_path=hf_dir))


def _has_checkpoint(workdir: str) -> bool:
    d = os.path.join(workdir, "checkpoints")
    return os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d))


def _check_config(config: Any, workdir: str, allow: bool) -> dict[str, list[Any]]:
    """Refuses a resume that changes what defines the run (unless `allow`); returns the
    changes. The caller keeps the config once the run has restored (`workdir.write_config`)."""
    new = config.to_dict()
    changes = (
        workdir_lib.check_resume(workdir, new, allow=allow) if _has_checkpoint(workdir) else {}
    )
    if changes:
        log.warning("resuming %s with a changed config (--allow_config_change): %s", workdir,
                    ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))  # fmt: skip
    return changes


def _restore(
    ckpt: Checkpointer,
    rc: config_lib.RunConfig,
    state: ts.TrainState,
    steps_fn: Any,
    data: Any,
    base: dict[str, str],
) -> tuple[int, ts.TrainState, dict[str, Any]]:
    """(step, state, meta) of the newest checkpoint that restores, the loader moved to its
    position (and a TR-DPO reference to its mix); (0, state, {}) when there is none. LoRA adapters
    resume only onto the base they were trained on."""
    restored = ckpt.restore(abstract_like(hooks.checkpoint_tree(rc, state, steps_fn)))
    if restored is None:
        return 0, state, {}
    step, tree, data_state, meta = restored
    state = hooks.from_checkpoint_tree(rc, tree, steps_fn)
    if base:
        model_lib.check_base(meta.get("base"), base, f"checkpoint {ckpt.directory}/{step}")
    data.set_state(data_state)
    log.info("resumed from %s at step %d", ckpt.directory, step)
    return step, state, meta


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


def _loop(run: hooks.Run, side_tasks: list[hooks.Hook], on_abandon: Any = None) -> dict[str, Any]:
    """batch -> step -> hooks, to the last step or a stop signal; then the summary."""
    stop = StopSignal(on_abandon=on_abandon)
    t_start, run.step = time.perf_counter(), run.start_step
    try:
        for task in side_tasks:
            task.at_start(run)
        try:
            for step in range(run.start_step + 1, run.num_steps + 1):
                stop.stop_step = step  # a signal from here to the check below stops after `step`
                batch = next(run.train_data)
                global_batch = run.train_data.global_batch(batch, run.row_sharding)
                run.state, run.step_metrics = run.steps_fn.train(run.state, global_batch)
                run.step, run.batch = step, batch
                run.tokens_seen += int(np.sum(batch["segment_ids"] > 0)) * jax.process_count()
                run.bar.update(1)
                run.stopping = _stop_agreed(stop)
                stop.stop_step = min(step + 1, run.num_steps)  # a later signal: the next step
                if not run.stopping and jax.process_count() == 1 and stop.signal_step == step:
                    run.stopping = True  # the signal came between the check and the line above
                for task in side_tasks:
                    task.after_step(run)
                if run.stopping:
                    break
        finally:
            run.bar.close()
            # A failed save raises here (one line) unless something else did; a stop is
            # announced only once its checkpoint is committed.
            run.ckpt.wait()
        if run.stopping:
            _announce_stop(run, stop)
        seconds = time.perf_counter() - t_start
        for task in side_tasks:  # a stop at the last step still finished: exports run
            task.at_end(run, finished=run.last)
        run.ckpt.close()
        run.writer.close()
    finally:
        stop.restore()
    return _summary(run, seconds)


def _announce_stop(run: hooks.Run, stop: StopSignal) -> None:
    """Says what a stop left behind, once its checkpoint is committed (the loop waited)."""
    name = stop.signal_name or "a stop signal (on another process)"
    if run.last:
        log.warning("%s received at the last step: the run is complete", name)
    elif run.step in run.ckpt.steps():
        log.warning("%s received: checkpoint of step %d committed in %s; stopping (exit %d: "
                    "rerun the same command to resume)", name, run.step, run.ckpt.directory,
                    EXIT_STOPPED)  # fmt: skip
    else:
        log.warning("%s received: stopping at step %d without a checkpoint of it", name, run.step)


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
        "samples_step": run.samples_step,
        "samples_before": run.samples_before,
        "interrupted": run.stopping,
        "finished": run.last,
        "num_steps": run.num_steps,
        **run.train_metrics,
        **run.eval_metrics,
    }


def precompute_reference(config: Any, workdir: str = "") -> None:
    """The reference pass of `config` alone (`python -m apo_jax.reference`): writes the stored
    log-probs beside the train and eval shards unless matching ones are there (into `workdir`
    for a read-only shard directory, when one is given)."""
    config.unlock()
    config.reference.mode = "precomputed"
    rc = config_lib.validate(
        config, device_count=jax.device_count(), process_count=jax.process_count()
    )
    paths = data_lib.resolve_data(rc)
    integrity.verify_shards((paths.train, paths.eval), rc.data.verify)
    rc = _with_warm_start(rc, paths)
    mesh = sharding.make_mesh(rc.mesh.data, rc.mesh.fsdp, rc.mesh.tensor)
    model, model_cfg, weights_fp = model_lib.build_model(rc, paths, mesh)
    graphdef, params = ts.split_model(model)
    reference.prepare(rc, (paths.train, paths.eval), graphdef, params, model_cfg, weights_fp, mesh,
                      workdir, shared=rc.lora.enabled)  # fmt: skip
