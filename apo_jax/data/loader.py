"""A grain loader over prepared shards: deterministic shuffles, per-process slices, resumable.

The record stream is one global order -- epoch e is the shard records shuffled with a seed
derived from (seed, e) -- cut into global batches of ``batch_size * process_count`` pairs;
process p reads only stream positions ``p, p + P, p + 2P, ...``, so the processes' batches
together form exactly the global batch and a run on P hosts sees the same data as on one.
With a finite number of epochs, a stream that does not fill the last global batch is cut
(``drop_remainder=True``, counted in ``dropped``) or filled with padding pairs (``index == -1``).

Batch keys: see :mod:`apo_jax.data.batch` and docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from apo_jax.data import batch as batch_lib
from apo_jax.data import refs, shards

pad_batch = batch_lib.pad_batch
prefix_attention_mask = batch_lib.prefix_attention_mask
write_reference_logps = refs.write_reference_logps


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """How to read the shards. ``batch_size`` counts pairs per process."""

    batch_size: int = 8  # N pairs per process and step (concat rows = 2N)
    seq_len: int | None = (
        None  # T; None: the manifest's max_length (concat, packed) or longest row (prefix)
    )
    buckets: tuple[int, ...] | None = None  # pad each batch to the smallest bucket that fits
    layout: str = "concat"  # concat | prefix | packed
    row_multiple: int = 1  # packed: rows per process are a multiple of this
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    drop_remainder: bool = True  # False: fill the last batch with padding pairs
    worker_count: int = 0  # grain worker processes (0: read in this process)
    worker_buffer_size: int = 2
    reference: str = "auto"  # auto: use reference_logps.npz when present | require | none
    reference_info: Mapping[str, Any] | None = None  # must equal the stored fingerprint info

    def __post_init__(self):
        if self.layout not in batch_lib.LAYOUTS:
            raise ValueError(f"layout must be one of {batch_lib.LAYOUTS}, got {self.layout!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.row_multiple < 1:
            raise ValueError(f"row_multiple must be >= 1, got {self.row_multiple}")
        if self.reference not in ("auto", "require", "none"):
            raise ValueError(f"reference must be auto, require or none, got {self.reference!r}")


def _with_index(num_records: int, index: int, record: bytes) -> tuple[int, bytes]:
    # grain passes the repeated stream's position down, so epoch e sees index e * n + i.
    return index % num_records, record


def _default_seq_len(manifest: dict[str, Any], layout: str) -> int:
    if layout != "prefix":
        return int(manifest["settings"]["max_length"])
    longest = (
        manifest["lengths"].get("prefix_row", {}).get("max")
        or 2 * manifest["settings"]["max_length"]
    )
    return int(math.ceil(longest / 64) * 64)


class PairLoader:
    """Iterator of batches (dicts of numpy arrays) for this process, with a savable position.

    Attributes:
      num_records: records in the shards.
      num_batches: batches this process yields (None when repeating forever).
      dropped: records of the finite stream cut by ``drop_remainder`` (all processes together).
      padded: padding pairs added to the last batch when ``drop_remainder=False``.
    """

    def __init__(
        self,
        shard_dir: str,
        config: LoaderConfig,
        *,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        import grain

        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.config, self.shard_dir = config, shard_dir
        self._process = (process_index, process_count)
        self.manifest = shards.read_manifest(shard_dir)
        source = shards.open_source(shard_dir)
        self.num_records = len(source)
        if self.num_records == 0:
            raise ValueError(f"{shard_dir} holds no records")
        ds = grain.MapDataset.source(source).map_with_index(
            functools.partial(_with_index, self.num_records)
        )
        if config.shuffle:
            ds = ds.shuffle(seed=config.seed)
        ds = ds.repeat(config.num_epochs)  # reshuffles each epoch with a new derived seed
        global_batch = config.batch_size * process_count
        self.dropped = self.padded = 0
        self.num_batches = None
        if config.num_epochs is not None:
            total = self.num_records * config.num_epochs
            if config.drop_remainder:
                used = total // global_batch * global_batch
                self.dropped, ds = total - used, ds[:used]
            else:
                used = -(-total // global_batch) * global_batch
                self.padded = used - total
                if self.padded:
                    ds = grain.MapDataset.concatenate(
                        [ds, grain.MapDataset.source([(-1, b"")] * self.padded)]
                    )
            self.num_batches = used // global_batch
        ds = ds[process_index::process_count]
        self._collate = self._make_collate(config)
        self._dataset = ds.batch(config.batch_size, drop_remainder=True, batch_fn=self._collate)
        self._iter = self._new_iter()

    def _make_collate(self, config: LoaderConfig) -> batch_lib.Collate:
        seq_len = config.seq_len or _default_seq_len(self.manifest, config.layout)
        key = "prefix_row" if config.layout == "prefix" else "row_max"
        longest = (self.manifest.get("lengths", {}).get(key) or {}).get("max")
        if longest is not None and longest > seq_len:
            raise ValueError(f"{self.shard_dir} has {config.layout} rows of {int(longest)} tokens > seq_len {seq_len}; "
                             "raise seq_len or re-prepare with a smaller --max-length")  # fmt: skip
        ref_c = ref_r = None
        use_ref = config.reference == "require" or (
            config.reference == "auto" and refs.has_reference_logps(self.shard_dir)
        )
        if use_ref:
            ref_c, ref_r = refs.load_reference_logps(self.shard_dir, config.reference_info)
        pad_id = int(self.manifest["tokenizer"].get("pad_id") or 0)
        return batch_lib.Collate(
            config.layout, seq_len, pad_id, config.buckets, ref_c, ref_r, config.row_multiple
        )

    @property
    def seq_len(self) -> int:
        """The longest row length T a batch can have."""
        return self._collate.seq_len

    @property
    def dataset(self) -> Any:
        """The grain MapDataset of this process's batches (random access by batch number)."""
        return self._dataset

    def _new_iter(self, start_batch: int = 0) -> Any:
        import grain

        ds = self._dataset[start_batch:] if start_batch else self._dataset
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
        if self.config.worker_count > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain workers read absl flags (see NOTES-environment)
                flags.FLAGS.mark_as_parsed()
            opts = grain.MultiprocessingOptions(
                num_workers=self.config.worker_count,
                per_worker_buffer_size=self.config.worker_buffer_size,
            )
            it_ds = it_ds.mp_prefetch(opts)
        self._next_batch = start_batch
        return iter(it_ds)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iter)
        self._next_batch += 1
        return batch

    def _signature(self) -> dict[str, Any]:
        # The batch number counts global batches, so a position saved by P processes is valid
        # for any process count with the same global batch (a resume on another topology).
        c = self.config
        return {"seed": c.seed, "shuffle": c.shuffle, "global_batch_size": c.batch_size * self._process[1],
                "num_epochs": c.num_epochs, "drop_remainder": c.drop_remainder,
                "num_records": self.num_records}  # fmt: skip

    def get_state(self) -> dict[str, Any]:
        """The iterator position (JSON-able), independent of ``worker_count``.

        The batches form a random-access grain MapDataset, so the position is the number of the
        next batch; :meth:`set_state` restarts the pipeline there.
        """
        return {"next_batch": self._next_batch, **self._signature(), "batch_size": self.config.batch_size,
                "process_index": self._process[0], "process_count": self._process[1]}  # fmt: skip

    def set_state(self, state: dict[str, Any]) -> None:
        """Moves to a position from :meth:`get_state`: the next batch is the one that followed it.

        Raises:
          ValueError: the state comes from a loader with another seed, global batch size,
            epochs or data (the process count may differ).
        """
        want = self._signature()
        if "global_batch_size" not in state and "batch_size" in state:  # states saved before it
            state = {
                **state,
                "global_batch_size": state["batch_size"] * state.get("process_count", 1),
            }
        got = {k: state.get(k) for k in want}
        if got != want:
            diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
            raise ValueError(f"loader state does not match this loader (saved, current): {diff}")
        self._iter = self._new_iter(int(state["next_batch"]))


def make_loader(
    shard_dir: str,
    config: LoaderConfig | None = None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> PairLoader:
    """Returns a :class:`PairLoader` over ``shard_dir`` (process index/count default to jax's)."""
    return PairLoader(
        shard_dir,
        config or LoaderConfig(),
        process_index=process_index,
        process_count=process_count,
    )


def make_global_batch(
    batch: Mapping[str, np.ndarray], sharding: Any, *, same_shape: bool = False
) -> dict[str, Any]:
    """Turns each process's local batch into global jax arrays sharded on the row axis.

    Args:
      batch: this process's batch from the loader (concat layout: ``[2N, T]`` rows, chosen first).
      sharding: a ``NamedSharding`` whose spec's first entry names the batch mesh axes
        (e.g. ``P(('data', 'fsdp'))``); other dims are replicated.
      same_shape: the caller knows every process's batch has this shape (concat or prefix rows
        without buckets, see :func:`shapes_always_agree`): skips the shape all-gather, a
        device round trip that would otherwise wait for the running step.

    Returns:
      Global arrays of shape ``[2 * N * P, T]`` (concat keys) or ``[N * P, ...]`` keeping the
      layout globally: rows ``0..NP-1`` are the chosen rows of all processes, then the rejected.
      Packed batches: the processes' rows one after the other, ``sequence_ids`` renumbered to
      the global pairs. Every layout is first padded to the largest row count and length of any
      process (:func:`agree_shape`), so buckets may pick another ``T`` on each process.
    """
    import jax
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

    axis = sharding.spec[0] if len(sharding.spec) else None
    # Auto axes let the compiler move the rows of the [2, N, T] -> [2N, T] merge between devices.
    mesh = Mesh(
        sharding.mesh.devices,
        sharding.mesh.axis_names,
        axis_types=(AxisType.Auto,) * len(sharding.mesh.axis_names),
    )
    n = len(batch["index"])
    procs = jax.process_count()
    packed = "sequence_ids" in batch
    if not same_shape:
        batch = agree_shape(batch)
    if packed:
        batch = _number_sequences_globally(batch, NamedSharding(mesh, PartitionSpec(axis)))
    out = {}
    for key, x in batch.items():
        rest = (None,) * (x.ndim - 1)
        if (
            not packed
            and x.shape[0] == 2 * n
            and x.ndim == 2
            and "input_ids" in batch
            and batch["input_ids"].shape[0] == 2 * n
        ):
            # [2N, T] -> [2, N, T] so each process contributes its own chosen and rejected halves.
            sh3 = NamedSharding(mesh, PartitionSpec(None, axis, *rest))
            x3 = jax.make_array_from_process_local_data(
                sh3, x.reshape(2, n, -1), (2, n * procs, x.shape[1])
            )
            merged = _merge_halves(x3, NamedSharding(mesh, PartitionSpec(axis, *rest)))
        else:
            sh = NamedSharding(mesh, PartitionSpec(axis, *rest))
            shape = (x.shape[0] * procs, *x.shape[1:])
            merged = jax.make_array_from_process_local_data(sh, x, shape)
        out[key] = jax.device_put(merged, NamedSharding(sharding.mesh, PartitionSpec(axis, *rest)))
    return out


def _merge_halves(x_2xNxT: Any, out_sharding: Any) -> Any:
    import jax

    return jax.jit(lambda x: x.reshape(-1, x.shape[-1]), out_shardings=out_sharding)(x_2xNxT)


def global_sequence_ids(sequence_ids: np.ndarray, n: int, n_global: int, offset: int) -> np.ndarray:
    """Local sequence numbers (i chosen, n + i rejected of local pair i) -> global ones.

    The process's pairs are global pairs ``offset .. offset + n - 1``; padding (-1) stays -1.
    """
    chosen = sequence_ids + offset
    rejected = sequence_ids - n + n_global + offset
    return np.where(sequence_ids < 0, -1, np.where(sequence_ids < n, chosen, rejected)).astype(
        sequence_ids.dtype
    )


def shapes_always_agree(layout: str, buckets: Any) -> bool:
    """True when every process's batches have one shape by construction: concat or prefix rows
    padded to ``seq_len`` (no buckets). Packed rows and buckets vary per process and step."""
    return layout != "packed" and not buckets


def agree_shape(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's batch padded to the largest row count and length of any process.

    Buckets (any layout) and packing (the row count too) let the processes' batches of one step
    differ in shape, and a global array needs one. With several processes this all-gathers the
    shapes (every process must call it, once per batch) and pads with :func:`pad_batch`; the pad
    id is the one the batch's own padding (segment 0) holds, else 0. One process: unchanged.
    """
    import jax

    if jax.process_count() == 1:
        return dict(batch)
    from jax.experimental import multihost_utils

    shape = np.asarray(batch["input_ids"].shape, np.int32)
    rows, t = (int(d) for d in np.max(multihost_utils.process_allgather(shape), axis=0))
    if (rows, t) == batch["input_ids"].shape:
        return dict(batch)
    pads = batch["input_ids"][batch["segment_ids"] == 0]
    return pad_batch(batch, rows, t, int(pads[0]) if pads.size else 0)


def _number_sequences_globally(
    batch: Mapping[str, np.ndarray], pair_sharding: Any
) -> dict[str, np.ndarray]:
    import jax

    n, procs = len(batch["index"]), jax.process_count()
    # Where make_array_from_process_local_data puts this process's pairs in the global [N * P].
    index_map = pair_sharding.addressable_devices_indices_map((n * procs,))
    offset = min(idx[0].start or 0 for idx in index_map.values())
    ids = global_sequence_ids(batch["sequence_ids"], n, n * procs, offset)
    return {**batch, "sequence_ids": ids}
