"""The parts of a run, each built from the validated RunConfig by one function.

`apo_jax.train.loop.train_and_evaluate` calls them in order (data, model, loaders, optimizer, state,
compiled steps); a notebook or a benchmark can call any one of them alone.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from apo_jax import layouts, losses, reference, sharding
from apo_jax import metrics as metrics_lib
from apo_jax.config import ConfigError, RunConfig
from apo_jax.data import loader as loader_lib
from apo_jax.data import shards
from apo_jax.layouts import auto
from apo_jax.models import config as model_config
from apo_jax.models import lora as lora_lib
from apo_jax.models.llama import Llama
from apo_jax.train import train_step as ts

log = logging.getLogger("apo_jax")

DEMO_CHECKER = "apo_jax.eval.checkers:demo"  # the demo data's checker unless samples.checker


@dataclasses.dataclass(frozen=True)
class DataPaths:
    """The run's shard directories, the tokenizer directory ('' = none) and the train manifest."""

    train: str
    eval: str
    tokenizer: str
    manifest: dict[str, Any]
    sample_prompts: str = ""  # prompts file for the samples hook ('' = the eval split's source)
    sample_checker: str = ""  # module:function scoring the samples ('' = none)
    demo_root: str = ""  # the demo assets' directory ('' = not the demo data)


def resolve_data(rc: RunConfig) -> DataPaths:
    """The shard and tokenizer directories of the run; builds the embedded demo when none is given."""
    train, eval_, tokenizer = rc.data.train, rc.data.eval, rc.data.tokenizer
    prompts, checker, demo_root = rc.samples.prompts, rc.samples.checker, ""
    if rc.is_demo:
        from apo_jax.data import demo

        assets = demo.build_demo(
            rc.demo.cache_dir or None,
            n_train=rc.demo.n_train,
            n_eval=rc.demo.n_eval,
            multi_turn=rc.demo.multi_turn,
        )
        train, eval_ = assets.train_shards, eval_ or assets.eval_shards
        if losses.is_unpaired(rc.loss.name):  # the demo pairs split into unpaired records
            train, demo_eval = demo.unpaired_shards(assets, kl_group=rc.batch_size)
            eval_ = rc.data.eval or demo_eval
        tokenizer = tokenizer or assets.tokenizer_dir
        prompts = prompts or assets.eval_pairs
        checker = checker or DEMO_CHECKER
        demo_root = assets.root
    manifest = shards.read_manifest(train)
    tokenizer = tokenizer or manifest.get("tokenizer", {}).get("dir", "")
    tokenizer = tokenizer if tokenizer and os.path.isdir(tokenizer) else ""
    return DataPaths(train, eval_, tokenizer, manifest, prompts, checker, demo_root)


def base_path(rc: RunConfig) -> str:
    """The starting checkpoint: model.hf_path, or with LoRA the base of the adapter it names."""
    if rc.lora.enabled and lora_lib.is_adapter_dir(rc.model.hf_path):
        return lora_lib.read_adapter_config(rc.model.hf_path)[1]
    return rc.model.hf_path


def model_config_dir(rc: RunConfig) -> str:
    """The directory of the starting model's config.json ('' = a preset; an adapter's base)."""
    return lora_lib.config_dir(rc.model.hf_path) if rc.model.hf_path else ""


def build_model(rc: RunConfig, paths: DataPaths, mesh: jax.sharding.Mesh) -> tuple[Llama, Any, str]:
    """(model on the mesh, its model config, weights fingerprint); with LoRA, the bare base."""
    overrides = rc.model.overrides()
    vocab = int(paths.manifest.get("tokenizer", {}).get("vocab_size") or 0)
    hf_path = base_path(rc)
    if hf_path:
        try:
            model, cfg = lora_lib.load_merged(hf_path, mesh=mesh, **overrides)
        except lora_lib.LoraError as e:
            raise ConfigError(f"config.model.hf_path: {e}") from None
        desc: dict[str, Any] = {}
    else:
        seq = int(paths.manifest.get("settings", {}).get("max_length") or 512)
        extra = {"vocab_size": vocab} if vocab else {}
        cfg = model_config.get_preset(
            rc.model.preset, max_seq_len=max(seq, 512), **extra, **overrides
        )
        with jax.set_mesh(mesh):
            model = Llama(cfg, rngs=nnx.Rngs(rc.seed))
        sharding.shard_model(model, mesh)
        desc = {"preset": rc.model.preset, "seed": rc.seed, "config": repr(cfg)}
    if vocab and vocab > cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {vocab} tokens but the model's vocabulary only {cfg.vocab_size}"
        )
    return model, cfg, reference.weights_fingerprint(hf_path, desc)


@dataclasses.dataclass
class Policy:
    """The trained model split for the step: what trains, what stays frozen, the bare base."""

    graphdef: nnx.GraphDef  # the policy's graph (with adapters under LoRA)
    params: nnx.State  # what trains: every parameter, or the adapters alone
    frozen: nnx.State | None  # LoRA: the frozen base (and dropout keys); None otherwise
    base_graphdef: nnx.GraphDef  # the graph without adapters: the reference's
    base_params: nnx.State  # the base's parameters (the very arrays inside `frozen`)


def split_policy(rc: RunConfig, model: Llama, mesh: jax.sharding.Mesh) -> Policy:
    """Splits `model`; with LoRA, attaches the adapters first (fresh or from lora.adapter)."""
    base_graphdef, base_params = ts.split_model(model)
    if not rc.lora.enabled:
        return Policy(base_graphdef, base_params, None, base_graphdef, base_params)
    lora_lib.attach(model, rc.lora, seed=rc.seed, mesh=mesh)
    if rc.lora.adapter:
        try:
            lora_lib.load_peft(model, rc.lora.adapter, rc.lora)
        except lora_lib.LoraError as e:
            raise ConfigError(f"config.lora.adapter: {e}") from None
    graphdef, adapters, frozen = lora_lib.split(model)
    return Policy(graphdef, adapters, frozen, base_graphdef, base_params)


def base_record(rc: RunConfig, weights_fp: str) -> dict[str, str]:
    """What a LoRA checkpoint records of its base (checked on resume); {} without LoRA."""
    if not rc.lora.enabled:
        return {}
    path = base_path(rc)
    return {"path": os.path.abspath(path) if path else "", "fingerprint": weights_fp}


def check_base(recorded: dict[str, Any] | None, expected: dict[str, str], where: str) -> None:
    """Refuses to resume LoRA adapters onto a base other than the one they were trained on."""
    recorded = recorded or {}
    if expected.get("fingerprint", "") != recorded.get("fingerprint", ""):
        raise ConfigError(
            f"{where} was trained on base {recorded.get('path') or '(none recorded)'} "
            f"(fingerprint {recorded.get('fingerprint') or '-'}), not on this run's "
            f"{expected.get('path') or 'base'} (fingerprint {expected.get('fingerprint') or '-'}): "
            "pass the same config.model.hf_path or use a new workdir"
        )


def resolve_layout(rc: RunConfig, paths: DataPaths, model_cfg: Any = None) -> RunConfig:
    """`rc` with config.data.layout=auto replaced by the layout picked for the train shards.

    The choice (:func:`apo_jax.layouts.auto.choose`) and why are logged in one line; a run with a
    named layout is returned unchanged.
    """
    if rc.data.layout is not None:
        return rc
    choice = auto.choose(
        paths.manifest,
        seq_len=rc.data.seq_len,
        buckets=rc.data.buckets,
        batch_size=rc.batch_size,
        grad_accum=rc.grad_accum,
        data_ways=rc.mesh.batch_ways,
        process_count=jax.process_count(),
        model_cfg=model_cfg,
    )
    log.info("config.data.layout=auto chose %s: %s", choice.name, choice.reason)
    data = dataclasses.replace(rc.data, layout=layouts.get(choice.name))
    return dataclasses.replace(rc, data=data)


def make_loader(
    rc: RunConfig,
    shard_dir: str,
    reference_info: dict[str, Any] | None,
    *,
    train: bool,
    reference_workdir: str = "",
) -> loader_lib.PairLoader:
    """This process's loader of `shard_dir`: the training stream, or one pass for evaluation."""
    # Packed rows of all processes must split evenly over the mesh's data*fsdp batch shards.
    ways, procs = rc.mesh.batch_ways, jax.process_count()
    epochs = rc.data.num_epochs if train else 1
    if train and rc.num_steps:
        epochs = None  # repeat until num_steps
    cfg = loader_lib.LoaderConfig(
        batch_size=rc.batch_size // procs,
        seq_len=rc.data.seq_len,
        buckets=rc.data.buckets,
        layout=rc.data.layout,
        row_multiple=ways // math.gcd(ways, procs),
        micro_batches=rc.grad_accum if train else 1,
        seed=rc.seed,
        shuffle=rc.data.shuffle if train else False,
        num_epochs=epochs,
        drop_remainder=train,
        worker_count=rc.data.worker_count if train else 0,
        reference_info=reference_info,
        reference_workdir=reference_workdir,
    )
    kind = shards.record_kind(shards.read_manifest(shard_dir))
    if (kind == "unpaired") != (rc.data.layout.name == "unpaired"):
        raise ConfigError(f"{shard_dir} holds {kind} records but loss {rc.loss.name!r} trains on "
                          f"{'unpaired examples' if kind == 'pairs' else 'pairs'}: prepare the "
                          "matching data or pick a matching loss")  # fmt: skip
    try:
        return loader_lib.make_loader(shard_dir, cfg)
    except ValueError as e:  # the loader's checks of seq_len, batch size and shards
        raise ConfigError(f"config.data: {e}") from None


def state_shardings(
    params: nnx.State, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> ts.TrainState:
    """Shardings of the whole TrainState: params as placed, optimizer moments like their params."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params_sh = jax.tree.map(lambda x: x.sharding, params)
    opt_sh = optax.tree_map_params(
        tx,
        lambda _, s: s,
        jax.eval_shape(tx.init, params),
        params_sh,
        transform_non_params=lambda _: replicated,
    )
    return ts.TrainState(step=replicated, params=params_sh, opt_state=opt_sh, rng=replicated,
                         bad_steps=replicated, skipped=replicated)  # fmt: skip


def init_state(
    params: nnx.State, tx: optax.GradientTransformation, seed: int, state_sh: ts.TrainState
) -> ts.TrainState:
    """A fresh TrainState laid out on `state_sh`."""
    return jax.jit(lambda p: ts.init_state(p, tx, seed), out_shardings=state_sh)(params)


def step_config(rc: RunConfig) -> ts.StepConfig:
    return ts.StepConfig(
        loss=rc.loss.name,
        beta=rc.loss.beta,
        loss_hparams=rc.loss.hparams,
        logprob_chunk=rc.logprob_chunk,
        grad_accum=rc.grad_accum,
        reference=rc.reference.mode,
        layout=rc.data.layout,
        ld_alpha=rc.loss.ld_alpha,
        unpaired_weights=(rc.loss.desirable_weight, rc.loss.undesirable_weight),
    )


def samples_hook(rc: RunConfig, paths: DataPaths, mesh: jax.sharding.Mesh) -> Any:
    """The samples hook of the run, or None (off, several processes, no tokenizer, no prompts)."""
    from apo_jax.train import hooks

    if not rc.samples.num_prompts:
        return None
    rows, why = sample_rows(paths, rc.samples.num_prompts)
    if jax.process_count() > 1 or not paths.tokenizer or not rows:
        why = "several processes" if jax.process_count() > 1 else why
        log.info("config.samples is off for this run: %s", why or "no tokenizer directory")
        return None
    import transformers

    from apo_jax.eval import generation, scoring

    tokenizer = transformers.AutoTokenizer.from_pretrained(paths.tokenizer)
    checker = paths.sample_checker
    return hooks.Samples(
        rc.eval_every, rows, tokenizer, max_new_tokens=rc.samples.max_new_tokens,
        checker=scoring.load_checker(checker) if checker else None,
        stop_tokens=generation.stop_token_ids(tokenizer, rc.model.hf_path or None), mesh=mesh,
    )  # fmt: skip


def sample_rows(paths: DataPaths, n: int) -> tuple[list[dict[str, Any]], str]:
    """The first `n` prompt rows for samples, and why there are none ('' when there are).

    The rows come from `paths.sample_prompts` (samples.prompts, or the demo's held-out pairs),
    else from the file the held-out shards were prepared from (their manifest's input).
    """
    from apo_jax.eval import prompts

    path, field, split = paths.sample_prompts, "prompt", "train"
    if not path:
        if not paths.eval:
            return [], "no held-out split (config.data.eval) and no config.samples.prompts"
        manifest = shards.read_manifest(paths.eval)
        inputs = manifest.get("inputs") or [""]
        settings = manifest.get("settings", {})
        path, split = inputs[0], settings.get("split", split)
        field = settings.get("fields", {}).get("prompt", field)
        if not os.path.exists(path):
            return [], (f"the held-out shards' source {path or '?'} is not on this machine; "
                        "pass config.samples.prompts")  # fmt: skip
    examples, _ = prompts.read(path, prompt_field=field, split=split)
    return [ex.record for ex in examples[:n]], f"no prompt rows in {path}"


class Steps:
    """The jitted train and eval steps: state donated, batch rows sharded over ('data', 'fsdp').

    Each train-batch shape (buckets and packed rows vary it) is compiled ahead of time once and
    kept, so its model FLOPs are known for MFU (`flops` is the last call's).
    """

    def __init__(self, rc: RunConfig, graphdef, ref, tx, schedule, state_sh, mesh, model_cfg,
                 frozen=None):  # fmt: skip
        scfg = step_config(rc)
        replicated = NamedSharding(mesh, PartitionSpec())
        ref_graphdef = ref.graphdef

        def train_fn(state, batch, ref_params, frozen):
            return ts.train_step(state, batch, ref_params, frozen, graphdef=graphdef, tx=tx,
                                 cfg=scfg, schedule=schedule, ref_graphdef=ref_graphdef)  # fmt: skip

        def eval_fn(params, batch, ref_params, frozen):
            return ts.eval_step(params, batch, ref_params, frozen, graphdef=graphdef, cfg=scfg,
                                ref_graphdef=ref_graphdef)  # fmt: skip

        # The frozen LoRA base keeps the sharding it was placed with; only the state is donated.
        self._train = jax.jit(train_fn, in_shardings=(state_sh, None, None, None),
                              out_shardings=(state_sh, replicated), donate_argnames=("state",))  # fmt: skip
        self._eval = jax.jit(eval_fn, in_shardings=(state_sh.params, None, None, None),
                             out_shardings=replicated)  # fmt: skip
        # LoRA: the online reference is the frozen base itself, found inside the step.
        self.ref_params = None if frozen is not None else ref.params
        self.frozen = frozen
        self._online = rc.reference.mode == "online"
        self._model_cfg = model_cfg
        self._compiled: dict[Any, tuple[Any, float]] = {}
        self.flops: float | None = None

    def train(self, state: ts.TrainState, batch: dict[str, Any]) -> tuple[ts.TrainState, Any]:
        """One optimizer step on a global batch; returns (state, device metrics)."""
        key = batch["input_ids"].shape
        if key not in self._compiled:
            exe = self._train.lower(state, batch, self.ref_params, self.frozen).compile()
            rows, seq_len = key
            flops = metrics_lib.model_flops(
                self._model_cfg, rows, seq_len, online_reference=self._online
            )
            if self.frozen is not None:  # LoRA: no weight gradients, 2 forwards' work, not 3
                flops *= (2 + self._online) / (3 + self._online)
            self._compiled[key] = exe, flops
        exe, self.flops = self._compiled[key]
        return exe(state, batch, self.ref_params, self.frozen)

    def evaluate(self, params: nnx.State, batch: dict[str, Any]) -> Any:
        """Loss metrics of a held-out global batch (device values)."""
        return self._eval(params, batch, self.ref_params, self.frozen)
