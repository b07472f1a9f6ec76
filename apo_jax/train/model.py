"""The run's model: built (a preset or a Hugging Face checkpoint) on the mesh, and split for the
step into what trains and what stays frozen (the LoRA base, which a resume must find again).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from flax import nnx

from apo_jax import reference, sharding
from apo_jax.config import ConfigError, RunConfig
from apo_jax.models import config as model_config
from apo_jax.models import lora as lora_lib
from apo_jax.models.llama import Llama
from apo_jax.train import train_step as ts
from apo_jax.train.data import DataPaths


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

    def module(self, params: nnx.State) -> nnx.Module:
        """The policy with trained `params` as a module (base and adapters together under LoRA)."""
        extra = () if self.frozen is None else (self.frozen,)
        return nnx.merge(self.graphdef, params, *extra)


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
