"""A grain loader over prepared shards: deterministic shuffles, per-process slices, resumable.

The record stream is one global order -- epoch e is the shard records shuffled with a seed
derived from (seed, e) -- cut into global batches of ``batch_size * process_count`` pairs;
process p reads only stream positions ``p, p + P, p + 2P, ...``, so the processes' batches
together form exactly the global batch and a run on P hosts sees the same data as on one.
With a finite number of epochs, a stream that does not fill the last global batch is cut
(``drop_remainder=True``, counted in ``dropped``) or filled with padding pairs (``index == -1``).

The rows of a batch are the layout's (:mod:`apo_jax.layouts`): :class:`Collate` decodes the
records and asks the layout to lay them out, the layout gives the default ``seq_len`` and the
longest row of the shards, and :meth:`PairLoader.global_batch` hands a batch to its global-batch
rules. Imports go one way: this module uses the layouts, the layouts never import ``data``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from apo_jax import layouts
from apo_jax.data import refs, shards
from apo_jax.errors import UserError


class SeqLenError(UserError, ValueError):
    """The shards hold rows longer than the configured row length."""


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """How to read the shards. ``batch_size`` counts pairs per process."""

    batch_size: int = 8  # N pairs per process and step
    seq_len: int | None = None  # T; None: the layout's default (layouts.Layout.default_seq_len)
    buckets: tuple[int, ...] | None = None  # pad each batch to the smallest bucket that fits
    layout: layouts.Layout = layouts.get("concat")  # the row layout, from layouts.get(name)
    row_multiple: int = 1  # packed: rows per micro-batch and process are a multiple of this
    micro_batches: int = 1  # micro-batches per step (packed rows pack each one apart)
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    drop_remainder: bool = True  # False: fill the last batch with padding pairs
    worker_count: int = 0  # grain worker processes (0: read in this process)
    worker_buffer_size: int = 2
    # Reference log-probs to add to each batch: None: none; else the fingerprint info that the
    # stored reference_logps-<key>.npz must hold (it must exist and cover every record).
    reference_info: Mapping[str, Any] | None = None
    reference_workdir: str = ""  # a run's workdir, which keeps read-only shards' files (data.refs)

    def __post_init__(self):
        if not isinstance(self.layout, layouts.Layout):
            raise ValueError(f"layout must be a layouts.get(name) object, got {self.layout!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.row_multiple < 1:
            raise ValueError(f"row_multiple must be >= 1, got {self.row_multiple}")
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")


@dataclasses.dataclass(frozen=True, eq=False)
class Collate:
    """grain ``batch_fn``: a list of ``(record_index, record_bytes)`` -> dict of numpy arrays.

    ``record_bytes`` empty (index -1) is a padding pair. Picklable, so grain worker processes
    can run it. Decodes the records (:func:`apo_jax.data.shards.deserialize`), lays them out
    with ``layout.collate`` and adds ``index int64[N]`` and, given reference log-probs by record
    index, ``ref_chosen_logps, ref_rejected_logps float32[N]`` (0 for padding pairs).
    """

    layout: layouts.Layout
    spec: layouts.RowSpec
    ref_chosen_R: np.ndarray | None = None
    ref_rejected_R: np.ndarray | None = None

    def __call__(self, items: Sequence[tuple[int, bytes]]) -> dict[str, np.ndarray]:
        """Decodes the records and lays them out as one batch."""
        recs = [shards.deserialize(b) if b else None for _, b in items]
        index_N = np.array(
            [i if r is not None else -1 for (i, _), r in zip(items, recs, strict=True)], np.int64
        )
        batch = self.layout.collate(recs, self.spec)
        batch["index"] = index_N
        if self.ref_chosen_R is not None:
            real = index_N >= 0
            for key, ref_R in (
                ("ref_chosen_logps", self.ref_chosen_R),
                ("ref_rejected_logps", self.ref_rejected_R),
            ):
                batch[key] = np.where(real, ref_R[np.maximum(index_N, 0)], 0.0).astype(np.float32)
        return batch


def _with_index(num_records: int, index: int, record: bytes) -> tuple[int, bytes]:
    # grain passes the repeated stream's position down, so epoch e sees index e * n + i.
    return index % num_records, record


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

    def _make_collate(self, config: LoaderConfig) -> Collate:
        layout = config.layout
        seq_len = config.seq_len or layout.default_seq_len(self.manifest)
        longest = layout.longest_row(self.manifest)
        if longest is not None and longest > seq_len:
            raise SeqLenError(
                f"{self.shard_dir} has {layout.name} rows of {longest} tokens > seq_len {seq_len}: "
                f"pass --config.data.seq_len={longest} or more (0 takes the shards' max_length), "
                "or re-prepare the shards with a smaller --max_length"
            )
        ref_c = ref_r = None
        if config.reference_info is not None:
            ref_c, ref_r = refs.load_reference_logps(
                self.shard_dir, config.reference_info, config.reference_workdir
            )
        pad_id = int(self.manifest["tokenizer"].get("pad_id") or 0)
        spec = layouts.RowSpec(
            seq_len, pad_id, config.buckets, config.row_multiple, config.micro_batches
        )
        return Collate(layout, spec, ref_c, ref_r)

    def global_batch(self, batch: Mapping[str, np.ndarray], sharding: Any) -> dict[str, Any]:
        """This process's batch -> global jax arrays, by the layout's rules.

        Every process must call it for every batch (it may all-gather the batch shapes). See
        :meth:`apo_jax.layouts.Layout.global_batch`; ``sharding`` names the batch mesh axes.
        """
        c = self.config
        return c.layout.global_batch(
            batch,
            sharding,
            micro_batches=c.micro_batches,
            same_shape=c.layout.shapes_always_agree(c.buckets),
        )

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
        return {
            "seed": c.seed,
            "shuffle": c.shuffle,
            "global_batch_size": c.batch_size * self._process[1],
            "num_epochs": c.num_epochs,
            "drop_remainder": c.drop_remainder,
            "num_records": self.num_records,
        }

    def get_state(self) -> dict[str, Any]:
        """The iterator position (JSON-able), independent of ``worker_count``.

        The batches form a random-access grain MapDataset, so the position is the number of the
        next batch; :meth:`set_state` restarts the pipeline there.
        """
        return {
            "next_batch": self._next_batch,
            **self._signature(),
            "batch_size": self.config.batch_size,
            "process_index": self._process[0],
            "process_count": self._process[1],
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Moves to a position from :meth:`get_state`: the next batch is the one that followed it.

        Raises:
          ValueError: the state comes from a loader with another seed, global batch size,
            epochs or data (the process count may differ).
        """
        want = self._signature()
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
