"""A gallery version stored as its changes over a base version: the vectors and items of the images added since,
and the ids removed since. Nothing of the base is rewritten, so a change of 1 % of the gallery writes about 1 % of
it; the model files and the base's index are shared with the base version, which the changes name by checksum.

In memory the base's index and the changes answer as one :class:`~imgsim.index.GalleryIndex`: rows are the base's
remaining rows, in order, then the added ones; a search asks the base's index (over-fetching past removed items)
and searches the added vectors exactly, then merges. Any backend works this way, Annoy's immutable index too.
Searching the changes costs time that grows with them, so past a limit (:func:`fits`) a change writes the whole
gallery again (imgsim.stages.gallery).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
from numpy.typing import NDArray

from imgsim import atomic
from imgsim.errors import ImgsimError
from imgsim.index import (GalleryIndex, GalleryItem, angular_from_cosine, cosines, read_items, row_blocks,
                          top_in_blocks, write_items)

ADDED_VECTORS, ADDED_ITEMS, REMOVED_IDS = "added.npy", "added.csv", "removed.npy"
CHANGE_FILES = (ADDED_VECTORS, ADDED_ITEMS, REMOVED_IDS)
# Changes past which the whole gallery is written again: the added vectors are scanned on every query (section 18).
MAX_CHANGE_FRACTION, MAX_CHANGES = 0.2, 20_000
# A query crowded by removed items (less than CROWDED of CROWDED_SAMPLE left) is ranked exactly (ChangedIndex._base_search).
CROWDED, CROWDED_SAMPLE, EXACT_AFTER = 0.5, 32, 4096


def fits(changes: int, base: int) -> bool:
    """Whether ``changes`` added plus removed images over a base of ``base`` images stay a version of changes."""
    return changes <= min(MAX_CHANGE_FRACTION * base, MAX_CHANGES)


@dataclasses.dataclass
class Changes:
    """What a gallery version changed since its base: added vectors (A x D, unit) and items, removed base ids."""

    base: GalleryIndex
    added: NDArray[np.float32]
    added_items: list[GalleryItem]
    removed: NDArray[np.int64]  # ids of base items, sorted

    def __post_init__(self) -> None:
        self.added = np.ascontiguousarray(self.added, dtype=np.float32).reshape(-1, self.base.dim)
        self.removed = np.unique(np.asarray(self.removed, dtype=np.int64))
        if len(self.added) != len(self.added_items):
            raise ImgsimError(f"{len(self.added)} added vectors for {len(self.added_items)} added items")

    def __len__(self) -> int:
        return len(self.added_items) + len(self.removed)

    def save(self, folder: Path) -> None:
        """Write the three change files into ``folder``, each atomically."""
        with atomic.atomic_path(folder / ADDED_VECTORS) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, self.added)
        write_items(folder / ADDED_ITEMS, self.added_items)
        with atomic.atomic_path(folder / REMOVED_IDS) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, self.removed)

    @classmethod
    def load(cls, base: GalleryIndex, folder: Path) -> "Changes":
        try:
            changes = cls(base, np.load(folder / ADDED_VECTORS), read_items(folder / ADDED_ITEMS),
                          np.load(folder / REMOVED_IDS))
        except (OSError, KeyError, ValueError) as exc:
            raise ImgsimError(f"the gallery changes in {folder} cannot be read ({exc}); export the version again") \
                from None
        return changes

    def index(self, next_id: int) -> GalleryIndex:
        """The base and these changes as one index (rows: the base's remaining rows, then the added ones)."""
        base = self.base
        removed_rows = [base.row(int(i)) for i in self.removed]
        if any(r is None for r in removed_rows):
            missing = [int(i) for i, r in zip(self.removed, removed_rows) if r is None]
            raise ImgsimError(f"the changes remove ids {missing[:10]} that the base gallery does not hold: they were "
                              "made on another base version")
        clash = {item.id for item in self.added_items} & {item.id for item in base.items}
        if clash:
            raise ImgsimError(f"the changes add ids {sorted(clash)[:10]} that the base gallery already holds: they "
                              "were made on another base version")
        keep = np.setdiff1d(np.arange(len(base.items), dtype=np.int64), np.asarray(removed_rows, dtype=np.int64))
        items = [base.items[r] for r in keep] + list(self.added_items)
        return GalleryIndex(RowView(base.embeddings, keep, self.added), items, base.n_trees,
                            ChangedIndex(base, keep, self.added), next_id=next_id)


class RowView:
    """The base's embeddings (memory-mapped) without the removed rows, then the added ones, as one read-only
    N x D array: indexing with rows gathers them; ``np.asarray`` materializes the whole (batch tools)."""

    def __init__(self, base: NDArray[np.float32], keep: NDArray[np.int64], added: NDArray[np.float32]) -> None:
        self.base, self.keep, self.added = base, keep, added
        self.shape = (len(keep) + len(added), int(base.shape[1]))
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> NDArray[np.float32]:
        if isinstance(rows, (int, np.integer)):
            return self[np.asarray([rows])][0]
        if isinstance(rows, slice):
            rows = np.arange(len(self))[rows]
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64).reshape(-1)
        n = len(self.keep)
        if len(rows) and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"row out of range for {len(self)} gallery items")
        rows = np.where(rows < 0, rows + len(self), rows)
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        in_base = rows < n
        out[in_base] = self.base[self.keep[rows[in_base]]]
        out[~in_base] = self.added[rows[~in_base] - n]
        return out

    def __array__(self, dtype=None, copy=None) -> NDArray:
        whole = self[np.arange(len(self))]
        return whole if dtype is None else whole.astype(dtype)


class ChangedIndex:
    """The base's nearest-neighbour search with its removed items left out, merged with an exact search over the
    added vectors. Answers in the rows of :class:`RowView` and in angular distance, like every backend."""

    def __init__(self, base: GalleryIndex, keep: NDArray[np.int64], added: NDArray[np.float32]) -> None:
        self.name, self.base, self.keep, self.added = base.backend, base, keep, added
        self.to_row = np.full(len(base.items), -1, dtype=np.int64)
        self.to_row[keep] = np.arange(len(keep))
        self.removed = len(base.items) - len(keep)

    def __len__(self) -> int:
        return len(self.keep) + len(self.added)

    def search(self, vector: NDArray[np.float32], k: int, search_k: int) -> tuple[list[int], list[float]]:
        rows, dists = self._base_search(vector, k, search_k)
        if len(self.added):
            sims = cosines(self.added, vector)
            top = np.argsort(-sims, kind="stable")[:k] if len(sims) <= 4 * k else \
                np.argpartition(-sims, k - 1)[:k]
            rows = np.concatenate([rows, len(self.keep) + top])
            dists = np.concatenate([dists, angular_from_cosine(sims[top].astype(np.float64))])
        order = np.lexsort((rows, dists))[:k]  # by distance, ties by row (base rows first, as a rebuild keeps them)
        return rows[order].tolist(), dists[order].tolist()

    def _base_search(self, vector, k: int, search_k: int) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
        """The base's k nearest remaining items: ask for 4x more (at a search effort to match) while removed ones
        took places in the answer. Where they crowd this query's neighbourhood (most of the first answer), or the
        index cannot propose more, rank the remaining items exactly: an IVF index, say, searches the lists nearest
        the query, and once those hold mostly removed items the nearest remaining ones lie in lists it skips."""
        total = len(self.base.items)
        ask, first = min(total, max(k + min(self.removed, k), CROWDED_SAMPLE)), True
        while True:
            found, dists = self.base.search(vector, ask, max(search_k, ask * self.base.n_trees))
            rows = self.to_row[np.asarray(found, dtype=np.int64)] if found else np.zeros(0, dtype=np.int64)
            alive = rows >= 0
            if first and len(rows) >= CROWDED_SAMPLE and alive.mean() < CROWDED:
                return self._exact_base(vector, k)
            if alive.sum() >= k or (ask >= total and len(found) == total):
                return rows[alive][:k], np.asarray(dists, dtype=np.float64)[alive][:k]
            if ask >= EXACT_AFTER or len(found) < ask:
                return self._exact_base(vector, k)
            ask, first = min(total, ask * 4), False

    def _exact_base(self, vector, k: int) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
        """The k nearest remaining base items by exact search, a block of rows at a time (memory stays small)."""
        found, sims = top_in_blocks(self.base.embeddings, row_blocks(self.keep), vector, k)
        return self.to_row[found], angular_from_cosine(sims.astype(np.float64))

    def vectors(self, rows: Sequence[int]) -> NDArray[np.float32]:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), self.added.shape[1]), dtype=np.float32)
        in_base = rows < len(self.keep)
        if in_base.any():
            out[in_base] = self.base.ann.vectors(self.keep[rows[in_base]])
        out[~in_base] = self.added[rows[~in_base] - len(self.keep)]
        return out

    def save(self, path: Path) -> None:
        raise ImgsimError("a gallery version of changes is saved as its changes (write_bundle); to write one "
                          "index of its own, rebuild it (GalleryIndex.build)")
