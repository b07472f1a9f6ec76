"""Checks a run's ml_collections config once, early, and freezes it into dataclasses.

Every message names the field and what to do, so a bad command line costs seconds, not a
compile.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from apo_jax import distributed, layouts, losses
from apo_jax.optim import OptimConfig


class ConfigError(ValueError):
    """A config field that cannot work; the message names it."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The validated run settings (see apo_jax/config_base.py for the meaning of each field)."""

    preset: str
    seed: int
    model: dict[str, Any]
    data: dict[str, Any]
    loss: dict[str, Any]
    reference: dict[str, Any]
    optim: OptimConfig
    mesh: tuple[int, int, int]
    batch_size: int
    grad_accum: int
    num_steps: int
    logprob_chunk: int
    max_bad_steps: int
    log_every: int
    eval_every: int
    eval_batches: int
    progress_bar: bool
    wandb_project: str
    checkpoint: dict[str, Any]
    export_hf: bool
    demo: dict[str, Any]
    distributed: distributed.DistributedConfig = distributed.DistributedConfig()

    @property
    def is_demo(self) -> bool:
        return not self.data["train"]

    def loss_hparams(self) -> tuple[tuple[str, float], ...]:
        return tuple((k, v) for k, v in self.loss.items() if k not in ("name", "beta"))


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_paths(c: Any) -> None:
    if c.preset != "demo":
        _need(
            bool(c.model.hf_path),
            f"preset {c.preset} trains a pretrained model: pass --config.model.hf_path=<Hugging Face checkpoint dir>",
        )
        _need(
            bool(c.data.train),
            f"preset {c.preset} needs data: pass --config.data.train=<prepared shard dir>",
        )
    for field, path in (
        ("model.hf_path", c.model.hf_path),
        ("data.train", c.data.train),
        ("data.eval", c.data.eval),
        ("data.tokenizer", c.data.tokenizer),
    ):
        _need(not path or os.path.isdir(path), f"config.{field}: {path} is not a directory")
    if c.data.train:
        _need(
            os.path.exists(os.path.join(c.data.train, "manifest.json")),
            f"config.data.train: {c.data.train} has no manifest.json; make shards with python -m apo_jax.data.prepare",
        )


def _check_mesh(c: Any, device_count: int) -> tuple[int, int, int]:
    sizes = [int(c.mesh.data), int(c.mesh.fsdp), int(c.mesh.tensor)]
    _need(sizes.count(-1) <= 1, "config.mesh: at most one of data, fsdp, tensor may be -1")
    _need(
        all(s == -1 or s > 0 for s in sizes),
        f"config.mesh sizes must be positive or -1, got {sizes}",
    )
    known = math.prod(s for s in sizes if s != -1)
    _need(
        device_count % known == 0,
        f"config.mesh data*fsdp*tensor = {known} does not divide the {device_count} devices of all "
        "processes together: set config.mesh.data/fsdp/tensor to divisors of that count",
    )
    if -1 in sizes:
        sizes[sizes.index(-1)] = device_count // known
    _need(
        math.prod(sizes) == device_count,
        f"config.mesh {sizes} uses {math.prod(sizes)} devices but all processes together have "
        f"{device_count}: make data*fsdp*tensor equal {device_count} (or set one axis to -1)",
    )
    return sizes[0], sizes[1], sizes[2]


def validate(c: Any, *, device_count: int, process_count: int = 1) -> RunConfig:
    """Checks `c` (a ConfigDict from configs/*.py) and returns the frozen RunConfig."""
    try:
        losses.parse_spec(c.loss.name)
    except ValueError as e:
        raise ConfigError(f"config.loss.name: {e}") from None
    _need(c.loss.beta > 0, f"config.loss.beta must be > 0, got {c.loss.beta}")
    _need(
        0 <= c.loss.label_smoothing < 0.5,
        f"config.loss.label_smoothing must be in [0, 0.5), got {c.loss.label_smoothing}",
    )
    modes = ("auto", "precomputed", "online", "none")
    _need(
        c.reference.mode in modes,
        f"config.reference.mode must be one of {modes}, got {c.reference.mode!r}",
    )
    if c.reference.mode == "none":
        _need(
            not losses.needs_reference(c.loss.name),
            f"config.reference.mode=none but loss {c.loss.name!r} needs reference log-probs",
        )
    _check_paths(c)
    mesh = _check_mesh(c, device_count)
    data_ways = mesh[0] * mesh[1]
    _need(
        c.batch_size > 0 and c.grad_accum > 0,
        "config.batch_size and config.grad_accum must be positive",
    )
    _need(
        c.batch_size % c.grad_accum == 0,
        f"config.batch_size {c.batch_size} must be a multiple of config.grad_accum {c.grad_accum}",
    )
    _need(
        c.batch_size % process_count == 0,
        f"config.batch_size {c.batch_size} must divide across the {process_count} processes: "
        f"make it a multiple of {process_count}",
    )
    try:
        layouts.get(c.data.layout).check(
            batch_size=c.batch_size,
            grad_accum=c.grad_accum,
            data_ways=data_ways,
            process_count=process_count,
        )
    except layouts.LayoutError as e:
        raise ConfigError(str(e)) from None
    _need(c.logprob_chunk > 0, "config.logprob_chunk must be positive")
    _need(c.log_every > 0 and c.eval_every >= 0, "config.log_every must be > 0 and eval_every >= 0")
    dist = distributed.DistributedConfig.from_mapping(
        c.distributed.to_dict() if "distributed" in c else None
    )
    try:
        distributed.check(dist)
    except distributed.DistributedError as e:
        raise ConfigError(str(e)) from None
    try:
        optim = OptimConfig(**c.optim.to_dict())
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.optim: {e}") from None
    return RunConfig(
        preset=c.preset,
        seed=int(c.seed),
        model=c.model.to_dict(),
        data=c.data.to_dict(),
        loss=c.loss.to_dict(),
        reference=c.reference.to_dict(),
        optim=optim,
        mesh=mesh,
        batch_size=int(c.batch_size),
        grad_accum=int(c.grad_accum),
        num_steps=int(c.num_steps),
        logprob_chunk=int(c.logprob_chunk),
        max_bad_steps=int(c.max_bad_steps),
        log_every=int(c.log_every),
        eval_every=int(c.eval_every),
        eval_batches=int(c.eval_batches),
        progress_bar=bool(c.progress_bar),
        wandb_project=str(c.wandb_project),
        checkpoint=c.checkpoint.to_dict(),
        export_hf=bool(c.export_hf),
        demo=c.demo.to_dict(),
        distributed=dist,
    )
