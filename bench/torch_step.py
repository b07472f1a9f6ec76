"""The PyTorch baseline step, done the way TRL's `DPOTrainer` does it (trl itself not needed).

`transformers` `LlamaForCausalLM` in eager PyTorch (no torch.compile, the default SDPA attention):
one forward of the concatenated chosen+rejected rows, full float32 logits, log-softmax and gather
of the next-token targets (TRL's `selective_log_softmax`), masked sums, the APO-down loss, gradient
clipping at 1.0 (the HF Trainer default) and `torch.optim.AdamW`. The reference is either a frozen
copy run under `torch.no_grad()` (online) or log-probs read from the batch (precomputed).
"""

from __future__ import annotations

import copy

import numpy as np
import torch


def hf_llama(cfg, seed: int = 0):
    """A randomly initialized float32 `LlamaForCausalLM` with the shapes of a `LlamaConfig`."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    from apo_jax.models import families

    torch.manual_seed(seed)
    hf_cfg = HFConfig(**{k: v for k, v in families.to_hf(cfg).items() if k != "architectures"})
    model = LlamaForCausalLM(hf_cfg).to(torch.float32)
    model.train()
    return model


def selective_log_softmax(logits_BxTxV: torch.Tensor, index_BxT: torch.Tensor) -> torch.Tensor:
    """TRL's float32 path: gather the target logit, subtract a per-row logsumexp."""
    picked = torch.gather(logits_BxTxV, -1, index_BxT.unsqueeze(-1)).squeeze(-1)
    lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits_BxTxV])
    return picked - lse


def concatenated_logps(model, ids_RxT: torch.Tensor, comp_RxT: torch.Tensor) -> torch.Tensor:
    """Summed completion log-probs of every row (TRL's `concatenated_forward`)."""
    logits = model(input_ids=ids_RxT, attention_mask=torch.ones_like(ids_RxT)).logits
    labels = ids_RxT[:, 1:].clone()
    mask = comp_RxT[:, 1:].bool()
    labels[~mask] = 0
    per_token = selective_log_softmax(logits[:, :-1].float(), labels)
    return (per_token * mask).sum(-1)


def apo_down(chosen, rejected, ref_chosen, ref_rejected, beta: float = 0.1) -> torch.Tensor:
    """TRL's `loss_type='apo_down'`."""
    r_w, r_l = chosen - ref_chosen, rejected - ref_rejected
    losses = torch.sigmoid(beta * r_w) + (1 - torch.sigmoid(beta * (r_w - r_l)))
    return losses.mean()


class TorchStep:
    """One TRL-style APO-down step on a 'concat' numpy batch."""

    def __init__(self, cfg, online: bool, seed: int = 0):
        self.model = hf_llama(cfg, seed)
        self.ref = copy.deepcopy(self.model).eval() if online else None
        if self.ref is not None:
            for p in self.ref.parameters():
                p.requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-6, weight_decay=0.0)

    def __call__(self, batch: dict[str, np.ndarray]) -> float:
        ids = torch.from_numpy(batch["input_ids"]).long()
        comp = torch.from_numpy(batch["completion_mask"])
        n = ids.shape[0] // 2
        logps = concatenated_logps(self.model, ids, comp)
        if self.ref is not None:
            with torch.no_grad():
                ref = concatenated_logps(self.ref, ids, comp)
            ref_w, ref_l = ref[:n], ref[n:]
        else:
            ref_w = torch.from_numpy(batch["ref_chosen_logps"])
            ref_l = torch.from_numpy(batch["ref_rejected_logps"])
        loss = apo_down(logps[:n], logps[n:], ref_w, ref_l)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())
