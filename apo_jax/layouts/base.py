"""What every row layout shares: the base class, the record it reads, padding, global arrays.

A layout subclasses :class:`Layout` and overrides what differs from the defaults here (one row
per pair, every array split evenly on its first axis); see :mod:`apo_jax.layouts` for the
contract. Layouts import nothing from :mod:`apo_jax.data`: they read records through the
:class:`Record` protocol, and the loader (:class:`apo_jax.data.loader.Collate`) hands them the
decoded records.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol

import jax
import numpy as np

from apo_jax import errors

Array = jax.Array
Batch = Mapping[str, Any]


class LayoutError(errors.UserError, ValueError):
    """A layout that cannot work with these settings; the message names the config field."""


class Record(Protocol):
    """What a layout reads of a stored record (``apo_jax.data.shards.PairRecord`` or
    ``UnpairedRecord``): its kind and its token arrays."""

    kind: ClassVar[str]  # 'pair' or 'unpaired'
    prompt: np.ndarray  # int32[P]
    chosen: np.ndarray  # int32[C]; an unpaired record's completion
    rejected: np.ndarray  # int32[R]; an unpaired record's KL completion


class SideLogps(NamedTuple):
    """One model's summed completion log-probs and token counts of each side of N pairs."""

    chosen: Array  # float32[N]
    rejected: Array  # float32[N]
    chosen_tokens: Array  # float32[N]
    rejected_tokens: Array  # float32[N]


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """The row geometry a collate writes."""

    seq_len: int  # T, the longest row
    pad_id: int = 0  # the tokenizer's pad id, written on padding tokens
    buckets: tuple[int, ...] | None = None  # pad each batch to the smallest of these that fits
    row_multiple: int = 1  # packed: rows per micro-batch are a multiple of this
    micro_batches: int = 1  # packed: the pairs of each micro-batch are packed apart


def split_records(records: Sequence[Any], k: int) -> list[Sequence[Any]]:
    """The records of one step as k equal micro-batches, in order (micro-batch i holds records
    i * N/k up to (i + 1) * N/k), for the packing layouts' host-side collate."""
    if len(records) % k:
        raise ValueError(f"{len(records)} pairs do not split into {k} micro-batches")
    m = len(records) // k
    return [records[i * m : (i + 1) * m] for i in range(k)]


def pick_length(needed: int, seq_len: int, buckets: Sequence[int] | None) -> int:
    """Returns the smallest bucket >= needed (or seq_len without buckets); raises when none fits."""
    for t in sorted(buckets or ()) + [seq_len]:
        if needed <= t:
            return t
    raise ValueError(
        f"a row of {needed} tokens does not fit seq_len {seq_len}; raise config.data.seq_len or "
        "re-prepare with a smaller --max_length"
    )


@dataclasses.dataclass(frozen=True)
class Layout:
    """Base of the row layouts: the behaviour of one row per pair (see :mod:`apo_jax.layouts`)."""

    name: ClassVar[str] = ""
    rows_per_pair: ClassVar[int] = 1  # rows of a micro-batch per pair that the mesh must divide
    length_key: ClassVar[str] = "row_max"  # the manifest's `lengths` entry of one row

    def collate(self, records: Sequence[Record | None], spec: RowSpec) -> dict[str, np.ndarray]:
        """The records (None: a padding pair) as numpy rows; `index` and reference log-probs
        are added by the loader's :class:`apo_jax.data.loader.Collate`."""
        raise NotImplementedError

    def default_seq_len(self, manifest: Mapping[str, Any]) -> int:
        """T when the config gives none: the shards' ``max_length``."""
        return int(manifest["settings"]["max_length"])

    def longest_row(self, manifest: Mapping[str, Any]) -> int | None:
        """The longest row of this layout in the shards (None: the manifest does not say)."""
        longest = (manifest.get("lengths", {}).get(self.length_key) or {}).get("max")
        return None if longest is None else int(longest)

    def check(
        self, *, batch_size: int, grad_accum: int, data_ways: int, process_count: int
    ) -> None:
        """Raises :class:`LayoutError` when a micro-batch's rows do not split over the mesh.

        Args:
          batch_size: pairs per step, all processes together (``config.batch_size``).
          grad_accum: micro-batches per step (``config.grad_accum``), dividing ``batch_size``.
          data_ways: the mesh's ``data * fsdp``, over which batch rows are split.
          process_count: processes, dividing ``batch_size``.
        """
        del process_count
        micro_rows = self.rows_per_pair * batch_size // grad_accum
        if micro_rows % data_ways:
            raise LayoutError(
                f"each micro-batch has {micro_rows} rows, which the mesh's data*fsdp = "
                f"{data_ways} ways must divide: change config.batch_size, grad_accum or mesh"
            )

    def shapes_always_agree(self, buckets: Sequence[int] | None) -> bool:
        """True when every process's batches have one shape by construction (rows padded to
        ``seq_len``, no buckets), so :meth:`global_batch` may skip the shape all-gather."""
        return not buckets

    def global_batch(
        self, batch: Batch, sharding: Any, *, micro_batches: int = 1, same_shape: bool = False
    ) -> dict[str, Array]:
        """Each process's local batch -> global jax arrays sharded on the row axis.

        Args:
          batch: this process's batch from the loader.
          sharding: a ``NamedSharding`` whose spec's first entry names the batch mesh axes
            (e.g. ``P(('data', 'fsdp'))``); other dims are replicated.
          micro_batches: the micro-batches the loader laid the batch out for.
          same_shape: every process's batch has this shape (:meth:`shapes_always_agree`): skips
            the shape all-gather, a device round trip that would wait for the running step.

        Returns:
          Arrays whose first axis holds the processes' rows one after the other, after padding
          every process to the largest shape of any process (:func:`agree_shape`).
        """
        del micro_batches
        return to_global(batch if same_shape else agree_shape(batch), sharding)

    def pair_logps(self, graphdef: Any, params: Any, batch: Batch, chunk: int) -> SideLogps:
        """One model's log-probs of the N pairs of a (micro-)batch; ``chunk``: head chunk size.

        Args:
          graphdef, params: the model (``nnx.split``).
          batch: a (micro-)batch of this layout, jax arrays.
          chunk: time steps per chunk of the log-prob head.

        Returns:
          Summed completion log-probs and completion token counts per pair, float32; 0 for a
          pair with no tokens (the loader's padding pairs).
        """
        raise NotImplementedError

    def regularized_logps(
        self,
        graphdef: Any,
        params: Any,
        batch: Batch,
        chunk: int,
        *,
        ld_alpha: float = 1.0,
        wpo: bool = False,
    ) -> tuple[SideLogps, Array | None, Array | None]:
        """:meth:`pair_logps` with TRL's DPO options; what the train step calls.

        Without the options (``ld_alpha=1``, ``wpo=False``) this is :meth:`pair_logps`. A layout
        that supports them overrides this (concat); the others refuse them.

        Args:
          graphdef, params, batch, chunk: as for :meth:`pair_logps`.
          ld_alpha: LD-DPO's weight of the longer completion's tail (1: plain sums).
          wpo: also return the WPO weights of each side (:func:`apo_jax.logprobs.wpo_weights`).

        Returns:
          ``(SideLogps, chosen_weight_N, rejected_weight_N)``; the weights are None without wpo.
          Token counts stay the unweighted completion lengths.

        Raises:
          LayoutError: options this layout does not support.
        """
        if ld_alpha != 1.0 or wpo:
            raise LayoutError(
                f"config.loss.ld_alpha and use_weighting need config.data.layout=concat, "
                f"not {self.name}"
            )
        return self.pair_logps(graphdef, params, batch, chunk), None, None

    def micro_batches(self, batch: Batch, k: int) -> dict[str, Array]:
        """Splits a batch into k micro-batches stacked on a new axis 0 (each array's first axis
        split evenly: pair j of micro-batch i is pair i * N/k + j)."""
        n = batch["index"].shape[0]
        if n % k:
            raise ValueError(f"{n} pairs per step do not split into {k} micro-batches")
        return {key: x.reshape(k, x.shape[0] // k, *x.shape[1:]) for key, x in batch.items()}


def pad_batch(
    batch: Batch, rows: int, t: int, pad_id: int = 0, blocks: int = 1
) -> dict[str, np.ndarray]:
    """A batch grown to ``rows`` rows (per block) of ``t`` tokens, with the collate's padding.

    Every field of two or more dims is ``[blocks * R, T, ...]`` with each later dim ``T`` (an
    ``[N, T, T]`` attention mask too): each of the ``blocks`` consecutive groups of R rows grows
    to ``rows``, the other dims to ``t``. The new entries are padding as the layouts write it:
    ``input_ids`` ``pad_id``, ``sequence_ids`` -1, and 0 (False) elsewhere -- segment 0, no
    completion or branch, position 0, no attention -- so no loss changes. Per-pair fields
    (``[N]``) are kept.
    """
    out = dict(batch)
    for key, x in batch.items():
        if x.ndim >= 2:
            x_b = x.reshape(blocks, x.shape[0] // blocks, *x.shape[1:])
            widths = [(0, 0), (0, rows - x_b.shape[1])] + [(0, t - d) for d in x.shape[1:]]
            fill = {"input_ids": pad_id, "sequence_ids": -1}.get(key, 0)
            grown = np.pad(x_b, widths, constant_values=fill)
            out[key] = grown.reshape(blocks * rows, *grown.shape[2:])
    return out


def agree_shape(batch: Batch, blocks: int = 1) -> dict[str, np.ndarray]:
    """This process's batch padded to the largest rows (per block) and length of any process.

    Buckets (any layout) and packing (the row count too) let the processes' batches of one step
    differ in shape, and a global array needs one. With several processes this all-gathers the
    shapes (every process must call it, once per batch) and pads with :func:`pad_batch`; the pad
    id is the one the batch's own padding (segment 0) holds, else 0. One process: unchanged.
    """
    if jax.process_count() == 1:
        return dict(batch)
    from jax.experimental import multihost_utils

    rows, t = batch["input_ids"].shape
    shape = np.asarray([rows // blocks, t], np.int32)
    rows, t = (int(d) for d in np.max(multihost_utils.process_allgather(shape), axis=0))
    if (rows * blocks, t) == batch["input_ids"].shape:
        return dict(batch)
    pads = batch["input_ids"][batch["segment_ids"] == 0]
    return pad_batch(batch, rows, t, int(pads[0]) if pads.size else 0, blocks)


def auto_mesh(sharding: Any) -> jax.sharding.Mesh:
    """The sharding's mesh with Auto axes, so the compiler may move rows between devices."""
    names = sharding.mesh.axis_names
    return jax.sharding.Mesh(
        sharding.mesh.devices, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names)
    )


def to_global(batch: Batch, sharding: Any, blocks: Mapping[str, int] | None = None) -> dict:
    """Local numpy arrays -> global jax arrays, the processes' rows concatenated per block.

    ``blocks[key] = b`` (default 1) cuts that array's first axis into b equal blocks; the global
    array holds block 0 of every process, then block 1 of every process, and so on. So a block
    layout (concat's chosen then rejected rows, packed micro-batches) stays the same globally.
    """
    from jax.sharding import NamedSharding, PartitionSpec

    axis = sharding.spec[0] if len(sharding.spec) else None
    mesh, procs = auto_mesh(sharding), jax.process_count()
    out = {}
    for key, x in batch.items():
        rest = (None,) * (x.ndim - 1)
        b = (blocks or {}).get(key, 1)
        if b == 1:
            sh = NamedSharding(mesh, PartitionSpec(axis, *rest))
            shape = (x.shape[0] * procs, *x.shape[1:])
            merged = jax.make_array_from_process_local_data(sh, x, shape)
        else:  # [b, R, ...] sharded on R, so each process contributes its own part of each block
            x_b = x.reshape(b, x.shape[0] // b, *x.shape[1:])
            sh = NamedSharding(mesh, PartitionSpec(None, axis, *rest))
            shape = (b, x_b.shape[1] * procs, *x.shape[1:])
            g = jax.make_array_from_process_local_data(sh, x_b, shape)
            merged = _merge_blocks(NamedSharding(mesh, PartitionSpec(axis, *rest)))(g)
        out[key] = jax.device_put(merged, NamedSharding(sharding.mesh, PartitionSpec(axis, *rest)))
    return out


@functools.lru_cache(maxsize=64)
def _merge_blocks(out_sharding: Any) -> Any:
    return jax.jit(lambda x: x.reshape(-1, *x.shape[2:]), out_shardings=out_sharding)
