"""Row layouts: how the pairs of a batch become rows, and how their log-probs come back.

One module per layout, each owning its collate, global-batch rules, row log-probs, micro-batch
split, config checks and documentation:

- :mod:`~apo_jax.layouts.concat`: one sequence per row, chosen rows then rejected rows.
- :mod:`~apo_jax.layouts.prefix`: prompt, chosen and rejected in one row, the prompt run once.
- :mod:`~apo_jax.layouts.packed`: the sequences of concat packed several to a row.
- :mod:`~apo_jax.layouts.packed_prefix`: prefix rows (prompt once) packed several to a row.
- :mod:`~apo_jax.layouts.unpaired`: labelled single completions (KTO data) and their KL rows.

``config.data.layout=auto`` picks one of them from the shards' lengths (:mod:`~apo_jax.layouts.auto`).
The four paired layouts give the same log-probs, losses and gradients for the same pairs
(tests/test_layouts.py, test_prefix.py, test_packing.py). ``get(name)`` returns the layout object; it is a frozen,
hashable dataclass, so ``StepConfig.layout`` holds it and the jitted step calls its methods.
Imports go one way: :mod:`apo_jax.data` (records, the loader's collate) uses the layouts, and
the layouts import nothing from it; they read records through :class:`Record`.

The contract of a layout (:class:`Layout`; defaults in :mod:`~apo_jax.layouts.base`):

- ``name``: its ``config.data.layout`` value.
- ``collate(records, spec) -> dict[str, np.ndarray]``: numpy rows of a list of
  :class:`Record` ``| None`` (None: a padding pair, which gets no tokens), with the geometry of a
  :class:`RowSpec` (``seq_len``, ``pad_id``, ``buckets``, ``row_multiple``, ``micro_batches``).
  Deterministic. The loader's grain ``batch_fn`` (:class:`apo_jax.data.loader.Collate`) decodes
  the stored records, calls it and adds ``index`` (-1 for padding) and the reference log-probs.
  Every array of two or more dims is rows first, each later dim ``T``; every one-dim array has
  one value per pair.
- ``default_seq_len(manifest)``, ``longest_row(manifest)``: ``T`` when the config gives none, and
  the longest row of the shards (the loader refuses a ``seq_len`` shorter than it).
- ``check(batch_size=, grad_accum=, data_ways=, process_count=)``: raises :class:`LayoutError`
  (a ``UserError``) naming the config fields when the batch cannot be laid out on the mesh.
- ``shapes_always_agree(buckets)``: every process's batches have one shape by construction.
- ``global_batch(batch, sharding, micro_batches=, same_shape=)``: every process's local batch ->
  global jax arrays in the same layout, micro-batch i being the union of the processes' micro-
  batches i. Every process must call it for every batch (it may all-gather the shapes).
- ``pair_logps(graphdef, params, batch, chunk) -> SideLogps``: one model's summed completion
  log-probs and token counts of the N pairs (0 for padding pairs); pure, jit-able.
- ``regularized_logps(graphdef, params, batch, chunk, *, ld_alpha=1.0, wpo=False)``: the entry
  the train step calls: ``(SideLogps, chosen_weight, rejected_weight)``, :meth:`pair_logps` and
  no weights without TRL's DPO options (LD-DPO's ``ld_alpha``, WPO weights); concat supports
  them, the other layouts raise :class:`LayoutError` when given them.
- ``micro_batches(batch, k)``: the global batch as k micro-batches stacked on axis 0, each a
  batch of this layout with N/k pairs (the split the loader laid out for ``micro_batches=k``).
"""

from __future__ import annotations

from apo_jax.layouts.base import Layout, LayoutError, Record, RowSpec, SideLogps, pad_batch
from apo_jax.layouts.concat import Concat
from apo_jax.layouts.packed import Packed
from apo_jax.layouts.packed_prefix import PackedPrefix
from apo_jax.layouts.prefix import Prefix
from apo_jax.layouts.unpaired import Unpaired

_LAYOUTS: dict[str, Layout] = {
    cls.name: cls() for cls in (Concat, Prefix, Packed, PackedPrefix, Unpaired)
}
NAMES = tuple(_LAYOUTS)

__all__ = ["NAMES", "Layout", "LayoutError", "Record", "RowSpec", "SideLogps", "get", "pad_batch"]


def get(name: str) -> Layout:
    """The layout called `name` (one of :data:`NAMES`).

    Raises:
      LayoutError: no layout has that name.
    """
    try:
        return _LAYOUTS[name]
    except (KeyError, TypeError):
        raise LayoutError(
            f"config.data.layout must be one of {', '.join(NAMES)}, got {name!r}"
        ) from None
