"""The IndexBundle artifact: gallery embeddings, their items (stable ids), and the Annoy index over them."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
from annoy import AnnoyIndex
from numpy.typing import NDArray

from imgsim import atomic
from imgsim.errors import ImgsimError

INDEX_FILE, ITEMS_FILE, EMBEDDINGS_FILE = "index.ann", "items.csv", "embeddings.npy"
ITEM_FIELDS = ("id", "path", "label", "split", "sha256", "phash")
# Annoy nodes inspected per query: with extract's 20 trees, recall@10 0.994 at 6.7x exact single-query speed
# on 60k items (bench/index_speed.py); 10 trees / 1250 is faster (8.5x) but only just reaches 0.99.
# -1 would be Annoy's own default, n_trees * k, far less exact.
DEFAULT_SEARCH_K = 1500


@dataclasses.dataclass(frozen=True)
class GalleryItem:
    """One indexed image. ``id`` is stable across gallery versions and never reused; the item's position in
    ``IndexBundle.items`` (its *row*) is its row in the embeddings and its Annoy item id, which change."""

    id: int
    path: str
    label: str
    split: str  # train/test/eval from extract's manifest; "added" for images added to the gallery later
    sha256: str
    phash: str = ""  # 64-bit perceptual hash as 16 hex digits (imgsim.hashing); empty in older bundles


@dataclasses.dataclass
class IndexBundle:
    """Embeddings (N x D float32, L2-normalised), their items, and an angular Annoy index; row i of each is
    the same image. Annoy ids are rows (dense: Annoy allocates up to the largest id), items carry stable ids."""

    embeddings: NDArray[np.float32]
    items: list[GalleryItem]
    n_trees: int
    annoy: AnnoyIndex
    metric: str = "angular"
    next_id: int = -1  # the id the next added image gets; -1: one past the largest id in items

    def __post_init__(self) -> None:
        largest = max((item.id for item in self.items), default=-1)
        self.next_id = max(self.next_id, largest + 1)
        self._rows: dict[int, int] | None = None

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def row(self, item_id: int) -> int | None:
        """The row of the item with stable id ``item_id``, or None if this version does not hold it."""
        if self._rows is None:
            self._rows = {item.id: row for row, item in enumerate(self.items)}
        return self._rows.get(item_id)

    @classmethod
    def build(cls, embeddings: NDArray[np.float32], items: Sequence[GalleryItem], *, n_trees: int = 50,
              seed: int = 42, next_id: int = -1) -> "IndexBundle":
        """Build the Annoy index; angular distance on unit vectors ranks exactly like cosine similarity."""
        if len(embeddings) != len(items) or len(items) == 0:
            raise ImgsimError(f"cannot index {len(embeddings)} embeddings for {len(items)} items; need a non-empty gallery")
        if n_trees < 1:
            raise ImgsimError(f"n_trees must be at least 1, got {n_trees}")
        index = AnnoyIndex(embeddings.shape[1], "angular")
        index.set_seed(seed)
        for i, vector in enumerate(embeddings):
            index.add_item(i, vector)
        index.build(n_trees, n_jobs=-1)
        return cls(np.ascontiguousarray(embeddings, dtype=np.float32), list(items), n_trees, index, next_id=next_id)

    def search(self, vector: NDArray[np.float32], k: int, search_k: int = -1) -> tuple[list[int], list[float]]:
        """Rows (not ids: see ``items[row].id``) and angular distances (sqrt(2 - 2 cos)) of the ``k`` nearest
        gallery items."""
        ids, dists = self.annoy.get_nns_by_vector(vector.tolist(), k, search_k=search_k, include_distances=True)
        return ids, dists

    def save(self, out_dir: str | Path) -> None:
        """Write the three files, each atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(out / INDEX_FILE) as tmp:
            self.annoy.save(str(tmp))  # annoy re-opens the saved file; the mapping survives the rename
        with atomic.atomic_path(out / EMBEDDINGS_FILE) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, self.embeddings)
        with atomic.atomic_path(out / ITEMS_FILE) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(ITEM_FIELDS)
                # Plain tuples: dataclasses.astuple deep-copies every field (1.3 s for 52k items).
                writer.writerows((i.id, i.path, i.label, i.split, i.sha256, i.phash) for i in self.items)

    @classmethod
    def load(cls, in_dir: str | Path, n_trees: int, next_id: int = -1) -> "IndexBundle":
        """Open an index folder; the Annoy file is memory-mapped so server workers share its pages."""
        folder = Path(in_dir)
        try:
            embeddings = np.load(folder / EMBEDDINGS_FILE, mmap_mode="r")
            with open(folder / ITEMS_FILE, newline="") as f:
                items = [GalleryItem(int(r["id"]), r["path"], r["label"], r["split"], r["sha256"], r.get("phash") or "")
                         for r in csv.DictReader(f)]
            annoy = _load_annoy(folder / INDEX_FILE, int(embeddings.shape[1]))
        except (OSError, KeyError, ValueError) as exc:
            raise ImgsimError(f"cannot open the index in {folder}: {exc}; rebuild it with the extract stage") from None
        if annoy.get_n_items() != len(items) or len(embeddings) != len(items):
            raise ImgsimError(f"index in {folder} is inconsistent: {annoy.get_n_items()} indexed vectors, "
                              f"{len(embeddings)} embeddings, {len(items)} items; rebuild it with extract")
        if len({item.id for item in items}) != len(items):
            raise ImgsimError(f"index in {folder} is inconsistent: {ITEMS_FILE} repeats an id; rebuild it with extract")
        return cls(embeddings, items, n_trees, annoy, next_id=next_id)


def _load_annoy(path: Path, dim: int) -> AnnoyIndex:
    index = AnnoyIndex(dim, "angular")
    if not index.load(str(path)):  # mmap; prefault off so workers page in lazily
        raise OSError(f"annoy could not load {path}")
    return index


def cosine_from_angular(distance: float) -> float:
    """Cosine similarity from Annoy's angular distance sqrt(2 - 2 cos)."""
    return 1.0 - distance * distance / 2.0
