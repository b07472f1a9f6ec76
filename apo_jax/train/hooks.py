"""Side tasks of the training loop, each a hook with a cadence.

The loop body is batch -> step -> hooks (`apo_jax.train.loop`). A hook sees the live `Run` after
every step, acts when it is due (every `every` steps, and at the last step), and may act once more
when the loop ends. Hooks run in list order, so held-out metrics exist before the checkpoint that
ranks by them is saved.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from apo_jax import metrics as metrics_lib
from apo_jax.errors import UserError
from apo_jax.train import workdir as workdir_lib

log = logging.getLogger("apo_jax")


class NonFiniteError(UserError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclasses.dataclass
class Run:
    """What the loop and its hooks share: settings, the live state and the latest results."""

    rc: Any  # the RunConfig
    workdir: str
    paths: Any  # data.DataPaths
    graphdef: nnx.GraphDef
    model_cfg: Any
    steps_fn: Any  # steps.Steps
    train_data: Any  # this process's training loader
    state: Any  # the TrainState, replaced after every step
    num_steps: int  # the last step of the run
    start_step: int
    writer: metrics_lib.MetricWriter
    ckpt: Any  # checkpoint.Checkpointer
    bar: Any  # the tqdm progress bar (bar.write prints even when it is disabled)
    row_sharding: Any  # how batch rows are laid over the mesh
    step: int = 0
    batch: dict[str, np.ndarray] | None = None  # this process's batch of `step`
    step_metrics: Any = None  # `step`'s device metrics (not yet fetched)
    tokens_seen: int = 0  # real tokens of all processes trained on by this invocation
    stopping: bool = False  # a stop signal was agreed: save and leave after this step
    train_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # last logged
    eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # last held-out
    eval_step: int = -1  # the step of eval_metrics
    hf_export: str = ""
    plots: str = ""  # directory of the end-of-run figures
    samples: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the last round
    samples_step: int = -1  # the step of `samples`
    samples_before: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # step 0's
    policy: Any = None  # model.Policy (the frozen LoRA base and the bare base graph)
    base: dict[str, str] = dataclasses.field(default_factory=dict)  # LoRA: base path, fingerprint
    data_fp: dict[str, str] = dataclasses.field(default_factory=dict)  # integrity.data_identity

    @property
    def frozen(self) -> Any:
        """A LoRA run's frozen base state, else None."""
        return None if self.policy is None else self.policy.frozen

    def model(self) -> nnx.Module:
        """The current policy as a module (base and adapters together under LoRA)."""
        extra = () if self.frozen is None else (self.frozen,)
        return nnx.merge(self.graphdef, self.state.params, *extra)

    @property
    def last(self) -> bool:
        """Whether `step` is the run's last (when the loop has ended: the run finished)."""
        return self.step == self.num_steps

    def print(self, line: str) -> None:
        """A console line from process 0, above the progress bar."""
        if jax.process_index() == 0:
            self.bar.write(line)


class Hook:
    """Acts every `every` steps (0: only at the last step) and at the last step."""

    every: int = 0

    def due(self, run: Run) -> bool:
        return bool(self.every and run.step % self.every == 0) or run.last

    def after_step(self, run: Run) -> None:
        if self.due(run):
            self.act(run)

    def at_start(self, run: Run) -> None:
        """Called once before the loop's first step (`run.step` is the start step)."""

    def act(self, run: Run) -> None:
        """The hook's work at a due step."""

    def at_end(self, run: Run, *, finished: bool) -> None:
        """Called once when the loop ends (`finished`: it reached the last step)."""


class TrainMetrics(Hook):
    """Fetches each step's metrics after the next step is dispatched (so the host never stalls
    the device), stops on too many non-finite steps, and logs window means every `every` steps."""

    def __init__(self, every: int, max_bad_steps: int):
        self.every, self.max_bad_steps = every, max_bad_steps
        self.window: list[dict[str, float]] = []
        self.pending: tuple[int, Any, Any] | None = None
        self.tokens_logged = 0
        self.t_log = time.perf_counter()
        self.peak = metrics_lib.chip_peak_flops()

    def after_step(self, run: Run) -> None:
        if self.pending is not None:
            self.window.append(self._fetch(*self.pending))
        self.pending = (run.step, run.step_metrics, run.batch["index"])
        if self.due(run):
            self.window.append(self._fetch(*self.pending))
            self.pending = None
            self.act(run)

    def _fetch(self, step: int, m: Any, index: Any) -> dict[str, float]:
        host = {k: float(v) for k, v in jax.device_get(m).items()}
        if host["bad_steps"] >= self.max_bad_steps:
            raise NonFiniteError(
                f"{int(host['bad_steps'])} consecutive steps with non-finite loss or gradients, "
                f"the last at step {step} (records {np.asarray(index).tolist()}); lower the "
                "learning rate or check the data"
            )
        return host

    def act(self, run: Run) -> None:
        now = time.perf_counter()
        mean = {k: float(np.mean([w[k] for w in self.window])) for k in self.window[-1]}
        mean["tokens_per_sec"] = (run.tokens_seen - self.tokens_logged) / (now - self.t_log)
        steps_per_sec = mean["tokens_per_sec"] / max(mean["tokens"], 1.0)
        flops = run.steps_fn.flops
        if flops:
            mean["flops_per_sec"] = flops * steps_per_sec
            if self.peak:
                mean["mfu"] = mean["flops_per_sec"] / (self.peak * jax.device_count())
        run.train_metrics = {f"train/{k}": v for k, v in mean.items()}
        run.writer.write(run.step, run.train_metrics)
        run.print(metrics_lib.console_line(run.step, run.num_steps, mean))
        self.window, self.t_log, self.tokens_logged = [], now, run.tokens_seen


@jax.jit
def _mix(ref: Any, pol: Any, alpha: jax.Array, keep: jax.Array) -> Any:
    f32 = "float32"
    return jax.tree.map(
        lambda r, p: (alpha * p.astype(f32) + keep * r.astype(f32)).astype(r.dtype), ref, pol
    )


def mix_reference(ref_params: Any, params: Any, alpha: float) -> Any:
    """TR-DPO's soft update: ``alpha * policy + (1 - alpha) * reference``, in float32, each leaf
    back in the reference's dtype and sharding (compiled once; alpha is an argument)."""
    out_sh = jax.tree.map(lambda r: r.sharding, ref_params)
    mixed = _mix(ref_params, params, np.float32(alpha), np.float32(1 - alpha))
    return jax.device_put(mixed, out_sh)


def checkpoint_tree(rc: Any, state: Any, steps_fn: Any) -> Any:
    """What a checkpoint's state item holds: the train state, and under TR-DPO the reference
    mixed so far (it cannot be rebuilt from the policy), so that a resume goes on exactly."""
    if rc.reference.sync_ref_model:
        return {"train": state, "reference": steps_fn.ref_params}
    return state


def from_checkpoint_tree(rc: Any, tree: Any, steps_fn: Any) -> Any:
    """The train state of a restored `checkpoint_tree`; a TR-DPO reference goes back in place."""
    if rc.reference.sync_ref_model:
        steps_fn.ref_params = tree["reference"]
        return tree["train"]
    return tree


class SyncReference(Hook):
    """TR-DPO (Gorbatovski et al., 2024), as TRL's ``sync_ref_model``: after every
    `every`-th step the online reference becomes ``alpha * policy + (1 - alpha) * reference``."""

    def __init__(self, every: int, alpha: float):
        self.every, self.alpha = every, alpha

    def due(self, run: Run) -> bool:
        return run.step % self.every == 0  # TRL syncs at multiples of the period only

    def act(self, run: Run) -> None:
        steps = run.steps_fn
        steps.ref_params = mix_reference(steps.ref_params, run.state.params, self.alpha)


class HeldOutEval(Hook):
    """Loss metrics over the held-out split (weighted by its real pairs), every `every` steps."""

    def __init__(self, every: int, make_loader: Any, max_batches: int):
        self.every, self.make_loader, self.max_batches = every, make_loader, max_batches

    def act(self, run: Run) -> None:
        data = self.make_loader()
        sums: dict[str, float] = {}
        total = 0
        for i, batch in enumerate(data):
            if self.max_batches and i >= self.max_batches:
                break
            n = int(np.sum(batch["index"] >= 0))
            g = data.global_batch(batch, run.row_sharding)
            m = jax.device_get(run.steps_fn.evaluate(run.state.params, g))
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            total += n
        run.eval_metrics = {f"eval/{k}": v / max(total, 1) for k, v in sums.items()}
        run.eval_step = run.step
        run.writer.write(run.step, run.eval_metrics)
        line = metrics_lib.console_line(
            run.step,
            run.num_steps,
            {k: run.eval_metrics[f"eval/{k}"] for k in ("loss", "rewards/accuracies", "kl")
             if f"eval/{k}" in run.eval_metrics},
        )  # fmt: skip
        run.print(line.replace("loss", "held-out loss", 1))


class Checkpoint(Hook):
    """Saves state, data position and run facts every `every` steps, at the end and on a stop."""

    def __init__(self, every: int):
        self.every = every

    def due(self, run: Run) -> bool:
        return super().due(run) or run.stopping

    def after_step(self, run: Run) -> None:
        run.ckpt.poll()  # a failed asynchronous save stops the run here, in one line
        super().after_step(run)

    def act(self, run: Run) -> None:
        # Checkpoints are ranked (keep_best) by the held-out loss measured at their own step.
        ranked = None
        if run.eval_step == run.step:
            ranked = {"eval/loss": run.eval_metrics["eval/loss"]}
        meta = {"step": run.step, "preset": run.rc.preset, "loss": run.rc.loss.name,
                "data": run.paths.train, workdir_lib.DATA_KEY: run.data_fp}  # fmt: skip
        if run.base:  # LoRA: adapters and optimizer only; the base they need is recorded
            meta["base"] = run.base
        tree = checkpoint_tree(run.rc, run.state, run.steps_fn)
        run.ckpt.save(run.step, tree, run.train_data.get_state(), meta, ranked)

    def at_end(self, run: Run, *, finished: bool) -> None:
        run.ckpt.wait()


class ExportHF(Hook):
    """Writes `<workdir>/hf` (safetensors, config, tokenizer) when the run reaches its end.

    A LoRA run also writes `<workdir>/hf_adapter` (PEFT), `hf` being the merged model."""

    def after_step(self, run: Run) -> None:
        pass

    def at_end(self, run: Run, *, finished: bool) -> None:
        if not finished:
            return
        out_dir = os.path.join(run.workdir, "hf")
        export_hf(run, out_dir)
        run.hf_export = out_dir


def _host(tree: Any) -> Any:
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def export_hf(run: Run, out_dir: str) -> None:
    """The current policy as a Hugging Face checkpoint directory (written by process 0)."""
    from apo_jax.models import hf

    params = _host(run.state.params)
    if run.frozen is not None:
        return _export_lora(run, params, out_dir)
    if jax.process_index() == 0:
        model = nnx.merge(run.graphdef, params)
        hf.save_hf(model, run.model_cfg, out_dir, tokenizer_dir=run.paths.tokenizer or None)


def _export_lora(run: Run, adapters: Any, out_dir: str) -> None:
    """`out_dir`: the merged model; `<workdir>/hf_adapter`: the PEFT adapter of its base (a
    randomly initialized base is written to `<workdir>/hf_base` so the adapter has one)."""
    from apo_jax.models import hf, lora

    base = _host(run.policy.base_params)
    if jax.process_index() != 0:
        return
    tok = run.paths.tokenizer or None
    merged = lora.merged_base(base, adapters, run.rc.lora)
    hf.save_hf(nnx.merge(run.policy.base_graphdef, merged), run.model_cfg, out_dir,
               tokenizer_dir=tok)  # fmt: skip
    base_dir = run.base.get("path", "")
    if not base_dir:
        base_dir = os.path.join(run.workdir, "hf_base")
        hf.save_hf(nnx.merge(run.policy.base_graphdef, base), run.model_cfg, base_dir,
                   tokenizer_dir=tok)  # fmt: skip
    lora.save_peft(adapters, run.rc.lora, run.model_cfg.n_layers,
                   os.path.join(run.workdir, "hf_adapter"), base_path=base_dir,
                   tokenizer_dir=tok)  # fmt: skip


class Samples(Hook):
    """Greedy generations of a few held-out prompts every `every` steps and at the end.

    Each round is appended to `<workdir>/samples.jsonl` (one line per prompt, with its step), put
    in TensorBoard's text tab, and, with a checker, scored as `samples/accuracy` in the metrics.
    A run that starts at step 0 samples its starting model first (step 0: the "before" of the
    summary); a resumed one reads its step-0 and latest rounds back from samples.jsonl. Runs on
    one process only (generation gathers results on the host).
    """

    def __init__(self, every: int, rows: list[dict[str, Any]], tokenizer: Any, *,
                 max_new_tokens: int, checker: Any, stop_tokens: list[int], mesh: Any):  # fmt: skip
        self.every, self.rows, self.tokenizer = every, rows, tokenizer
        self.max_new_tokens, self.checker = max_new_tokens, checker
        self.stop_tokens, self.mesh = stop_tokens, mesh

    def at_start(self, run: Run) -> None:
        if run.step == 0:
            self.act(run)
            run.samples_before = run.samples
            return
        rounds: dict[int, list[dict[str, Any]]] = {}
        path = os.path.join(run.workdir, "samples.jsonl")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    row = json.loads(line)
                    if row.get("step", -1) <= run.step:
                        rounds.setdefault(row.pop("step", -1), []).append(row)
        run.samples_before = rounds.get(0, [])
        if rounds:
            run.samples_step = max(rounds)
            run.samples = rounds[run.samples_step]

    def act(self, run: Run) -> None:
        from apo_jax.eval import generation

        model = run.model()
        ways = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        out = generation.sample(
            model, self.tokenizer, self.rows,
            sampling=generation.Sampling(max_new_tokens=self.max_new_tokens),
            batch_size=-(-min(len(self.rows), 8) // ways) * ways,
            stop_tokens=self.stop_tokens, checker=self.checker, mesh=self.mesh,
        )  # fmt: skip
        run.samples, run.samples_step = out, run.step
        with open(os.path.join(run.workdir, "samples.jsonl"), "a", encoding="utf-8") as f:
            for row in out:
                f.write(json.dumps({"step": run.step, **row}, ensure_ascii=False) + "\n")
        text = "\n\n".join(f"**{r['prompt']}**\n\n{r['response']}" for r in out)
        run.writer.write_text(run.step, "samples", text)
        if self.checker is not None:
            scored = [r["correct"] for r in out if r.get("correct") is not None]
            if scored:
                run.writer.write(run.step, {"samples/accuracy": float(np.mean(scored))})


class Plots(Hook):
    """PNG figures of the run's metrics.jsonl in `<workdir>/plots` when the loop ends."""

    def after_step(self, run: Run) -> None:
        pass

    def at_end(self, run: Run, *, finished: bool) -> None:
        if jax.process_index() != 0:
            return
        from apo_jax import plot

        run.writer.flush()
        out_dir = os.path.join(run.workdir, "plots")
        plot.plot_runs([run.workdir], out_dir)
        run.plots = out_dir
