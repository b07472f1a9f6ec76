"""The trained policy as a Hugging Face checkpoint: `ExportHF`, the hook that writes
`<workdir>/hf` when a run reaches its last step.

A LoRA run also writes `<workdir>/hf_adapter` (PEFT), `hf` being the merged model.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from flax import nnx

from apo_jax.train.hooks import NONE, Hook, Outputs, StepInfo
from apo_jax.train.model import Policy


class ExportHF(Hook):
    """Writes `<workdir>/hf` (safetensors, config, tokenizer) when the run reaches its end.

    Returns ``hf_export``: that directory.
    """

    def __init__(
        self,
        workdir: str,
        policy: Policy,
        model_cfg: Any,
        *,
        tokenizer_dir: str,
        lora_cfg: Any,
        base: dict[str, str],
    ):
        self.workdir, self.policy, self.model_cfg = workdir, policy, model_cfg
        self.tokenizer_dir, self.lora_cfg, self.base = tokenizer_dir, lora_cfg, base

    def after_step(self, info: StepInfo) -> Outputs:
        return NONE

    def at_end(self, info: StepInfo, *, finished: bool) -> Outputs:
        if not finished:
            return NONE
        out_dir = os.path.join(self.workdir, "hf")
        self.write(info.state.params, out_dir)
        return {"hf_export": out_dir}

    def write(self, params: Any, out_dir: str) -> None:
        """The policy with trained `params` as a Hugging Face checkpoint directory (written by
        process 0)."""
        from apo_jax.models import hf

        params = _host(params)
        if self.policy.frozen is not None:
            return self._write_lora(params, out_dir)
        if jax.process_index() == 0:
            model = nnx.merge(self.policy.graphdef, params)
            hf.save_hf(model, self.model_cfg, out_dir, tokenizer_dir=self.tokenizer_dir or None)

    def _write_lora(self, adapters: Any, out_dir: str) -> None:
        """`out_dir`: the merged model; `<workdir>/hf_adapter`: the PEFT adapter of its base (a
        randomly initialized base is written to `<workdir>/hf_base` so the adapter has one)."""
        from apo_jax.models import hf, lora

        policy = self.policy
        base = _host(policy.base_params)
        if jax.process_index() != 0:
            return
        tok = self.tokenizer_dir or None
        merged = lora.merged_base(base, adapters, self.lora_cfg)
        hf.save_hf(
            nnx.merge(policy.base_graphdef, merged), self.model_cfg, out_dir, tokenizer_dir=tok
        )
        base_dir = self.base.get("path", "")
        if not base_dir:
            base_dir = os.path.join(self.workdir, "hf_base")
            hf.save_hf(
                nnx.merge(policy.base_graphdef, base), self.model_cfg, base_dir, tokenizer_dir=tok
            )
        lora.save_peft(
            adapters,
            self.lora_cfg,
            self.model_cfg.n_layers,
            os.path.join(self.workdir, "hf_adapter"),
            base_path=base_dir,
            tokenizer_dir=tok,
        )


def _host(tree: Any) -> Any:
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
