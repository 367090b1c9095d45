"""The GalleryIndex artifact: gallery embeddings, their items (stable ids), and the nearest-neighbour index over
them, in one of the BACKENDS (Annoy by default; faiss's exact and HNSW indexes where faiss-cpu is installed)."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from annoy import AnnoyIndex
from numpy.typing import NDArray

from imgsim import atomic
from imgsim.errors import ImgsimError

# index.ann: the approximate-nearest-neighbour index in its backend's own format (bundle.json names the backend).
INDEX_FILE, ITEMS_FILE, EMBEDDINGS_FILE = "index.ann", "items.csv", "embeddings.npy"
ANNOY, FAISS_FLAT, FAISS_HNSW, FAISS_IVF = "annoy", "faiss-flat", "faiss-hnsw", "faiss-ivf"
BACKENDS = (ANNOY, FAISS_FLAT, FAISS_HNSW, FAISS_IVF)
ITEM_FIELDS = ("id", "path", "label", "split", "sha256", "phash")
# Annoy nodes inspected per query with extract's 20 trees (docs/benchmarks.md section 2); -1: Annoy's own, less exact.
DEFAULT_SEARCH_K = 1500
# faiss-hnsw: efSearch 32 is the least that reaches the recall target on the demo's embeddings (section 15).
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 32
# faiss-ivf: 8-bit vectors in 4 sqrt(n) inverted lists, IVF_REFINE x k candidates re-ranked exactly (section 15).
IVF_LISTS_PER_SQRT, IVF_MAX_LISTS, IVF_TRAIN_PER_LIST, IVF_NPROBE, IVF_REFINE = 4, 4096, 40, 16, 4
# Rows an exact search ranks at a time: its memory stays flat whatever the filter's or the gallery's size.
EXACT_BLOCK = 16_384


def check_backend(name: str) -> None:
    """A clear error for an index backend we do not build, or one whose package is not installed."""
    if name not in BACKENDS:
        raise ImgsimError(f"unknown index backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name != ANNOY:
        _faiss(name)


def _faiss(name: str):
    try:
        import faiss
    except ImportError:
        raise ImgsimError(f"index backend {name} needs faiss-cpu, which is not installed here: "
                          "pip install faiss-cpu==1.15.1 (or use index=annoy)") from None
    return faiss


class AnnoyBackend:
    """Annoy's random-projection forest over angular distance; the file is memory-mapped."""

    name = ANNOY

    def __init__(self, index: AnnoyIndex) -> None:
        self.index = index

    @classmethod
    def build(cls, embeddings: NDArray[np.float32], *, n_trees: int, seed: int) -> "AnnoyBackend":
        index = AnnoyIndex(embeddings.shape[1], "angular")
        index.set_seed(seed)
        for i, vector in enumerate(embeddings):
            index.add_item(i, vector)
        index.build(n_trees, n_jobs=-1)
        return cls(index)

    def __len__(self) -> int:
        return self.index.get_n_items()

    def search(self, vector: NDArray[np.float32], k: int, search_k: int) -> tuple[list[int], list[float]]:
        return self.index.get_nns_by_vector(vector.tolist(), k, search_k=search_k, include_distances=True)

    def vectors(self, rows: Sequence[int]) -> NDArray[np.float32]:
        return np.asarray([self.index.get_item_vector(int(r)) for r in rows], dtype=np.float32)

    def save(self, path: Path) -> None:
        self.index.save(str(path))  # annoy re-opens the saved file; the mapping survives the rename

    @classmethod
    def load(cls, path: Path, dim: int) -> "AnnoyBackend":
        index = AnnoyIndex(dim, "angular")
        if not index.load(str(path)):  # mmap; prefault off so workers page in lazily
            raise OSError(f"annoy could not load {path}")
        return cls(index)


class FaissBackend:
    """faiss on inner product (cosine: the embeddings are unit vectors): ``faiss-flat`` searches exactly,
    ``faiss-hnsw`` walks a graph (HNSW_* above), ``faiss-ivf`` scans the nearest inverted lists of quantized
    vectors (IVF_* above; GalleryIndex.search re-ranks its candidates exactly). Distances are reported as Annoy's
    angular sqrt(2 - 2 cos), so every backend answers alike."""

    def __init__(self, name: str, index) -> None:
        self.name, self.index = name, index

    @classmethod
    def build(cls, name: str, embeddings: NDArray[np.float32]) -> "FaissBackend":
        faiss, dim = _faiss(name), embeddings.shape[1]
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        if name == FAISS_FLAT:
            index = faiss.IndexFlatIP(dim)
        elif name == FAISS_HNSW:
            index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction, index.hnsw.efSearch = HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH
        else:
            n = len(vectors)
            lists = max(1, min(int(IVF_LISTS_PER_SQRT * np.sqrt(n)), IVF_MAX_LISTS, n // IVF_TRAIN_PER_LIST))
            index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, lists, faiss.ScalarQuantizer.QT_8bit,
                                                  faiss.METRIC_INNER_PRODUCT)
            index.cp.min_points_per_centroid = 1  # a small gallery: fewer lists, and no warning about it
            sample = np.random.default_rng(0).choice(n, min(n, IVF_TRAIN_PER_LIST * lists), replace=False)
            index.train(vectors[np.sort(sample)])
            index.nprobe = IVF_NPROBE  # stored in the file
        index.add(vectors)
        if name == FAISS_IVF:
            index.make_direct_map()  # vectors(): the probe check reads indexed vectors back (stored in the file)
        return cls(name, index)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, vector: NDArray[np.float32], k: int, search_k: int) -> tuple[list[int], list[float]]:
        sims, rows = self.index.search(np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1), k)
        keep = rows[0] >= 0  # faiss pads with -1 when the gallery has fewer than k items
        return rows[0][keep].tolist(), angular_from_cosine(sims[0][keep]).tolist()

    def vectors(self, rows: Sequence[int]) -> NDArray[np.float32]:
        return self.index.reconstruct_batch(np.asarray(rows, dtype=np.int64)).astype(np.float32, copy=False)

    def save(self, path: Path) -> None:
        _faiss(self.name).write_index(self.index, str(path))

    @classmethod
    def load(cls, name: str, path: Path) -> "FaissBackend":
        faiss = _faiss(name)
        try:  # memory-mapped, so server workers share its pages, where the index type allows it and it pays
            # (not IVF: memory-mapped it searched far slower, and it is small enough to read)
            index = faiss.read_index(str(path)) if name == FAISS_IVF else \
                faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:
            index = faiss.read_index(str(path))
        expected = {FAISS_FLAT: faiss.IndexFlatIP, FAISS_HNSW: faiss.IndexHNSWFlat,
                    FAISS_IVF: faiss.IndexIVFScalarQuantizer}[name]
        if not isinstance(index, expected) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"{path.name} is a {type(index).__name__}, not the {name} index bundle.json names")
        return cls(name, index)


Backend = AnnoyBackend | FaissBackend


@dataclasses.dataclass(frozen=True)
class GalleryItem:
    """One indexed image. ``id`` is stable across gallery versions and never reused; the item's position in
    ``GalleryIndex.items`` (its *row*) is its row in the embeddings and its Annoy item id, which change."""

    id: int
    path: str
    label: str
    split: str  # train/test/eval from extract's manifest; "added" for images added to the gallery later
    sha256: str
    phash: str = ""  # 64-bit perceptual hash as 16 hex digits (imgsim.hashing); empty in older bundles


@dataclasses.dataclass
class GalleryIndex:
    """Embeddings (N x D float32, L2-normalised), their items, and a nearest-neighbour index over them; row i of
    each is the same image. The index's ids are rows (dense: Annoy allocates up to the largest id), items carry
    stable ids. ``n_trees`` is Annoy's; the faiss backends keep their parameters in their file."""

    embeddings: NDArray[np.float32]
    items: list[GalleryItem]
    n_trees: int
    ann: Backend
    metric: str = "angular"
    next_id: int = -1  # the id the next added image gets; -1: one past the largest id in items

    def __post_init__(self) -> None:
        largest = max((item.id for item in self.items), default=-1)
        self.next_id = max(self.next_id, largest + 1)
        self._rows: dict[int, int] | None = None

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def backend(self) -> str:
        return self.ann.name

    def row(self, item_id: int) -> int | None:
        """The row of the item with stable id ``item_id``, or None if this version does not hold it."""
        if self._rows is None:
            self._rows = {item.id: row for row, item in enumerate(self.items)}
        return self._rows.get(item_id)

    @classmethod
    def build(cls, embeddings: NDArray[np.float32], items: Sequence[GalleryItem], *, n_trees: int = 50,
              seed: int = 42, next_id: int = -1, backend: str = ANNOY) -> "GalleryIndex":
        """Build the index; angular distance on unit vectors ranks exactly like cosine similarity."""
        check_backend(backend)
        if len(embeddings) != len(items) or len(items) == 0:
            raise ImgsimError(f"cannot index {len(embeddings)} embeddings for {len(items)} items; need a non-empty gallery")
        if n_trees < 1:
            raise ImgsimError(f"n_trees must be at least 1, got {n_trees}")
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        ann = AnnoyBackend.build(embeddings, n_trees=n_trees, seed=seed) if backend == ANNOY else \
            FaissBackend.build(backend, embeddings)
        return cls(embeddings, list(items), n_trees, ann, next_id=next_id)

    def search(self, vector: NDArray[np.float32], k: int, search_k: int = -1) -> tuple[list[int], list[float]]:
        """Rows (not ids: see ``items[row].id``) and angular distances (sqrt(2 - 2 cos)) of the ``k`` nearest
        gallery items; ``search_k`` is Annoy's search effort (faiss-hnsw's and faiss-ivf's are in their file)."""
        # Only faiss-ivf's own file re-ranks here: an index over a version of changes re-ranks in its base's search.
        if not (isinstance(self.ann, FaissBackend) and self.ann.name == FAISS_IVF):
            return self.ann.search(vector, k, search_k)
        # The quantized index proposes IVF_REFINE x k candidates; their stored vectors rank them exactly.
        return exact_top(self.embeddings, np.asarray(self.ann.search(vector, k * IVF_REFINE, search_k)[0],
                                                     dtype=np.int64), vector, k)

    def save(self, out_dir: str | Path) -> None:
        """Write the three files, each atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(out / INDEX_FILE) as tmp:
            self.ann.save(tmp)
        with atomic.atomic_path(out / EMBEDDINGS_FILE) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, self.embeddings)
        write_items(out / ITEMS_FILE, self.items)

    @classmethod
    def load(cls, in_dir: str | Path, n_trees: int, next_id: int = -1, backend: str = ANNOY) -> "GalleryIndex":
        """Open an index folder written by ``backend``; the index file is memory-mapped where the backend allows,
        so server workers share its pages."""
        folder = Path(in_dir)
        check_backend(backend)
        try:
            embeddings = np.load(folder / EMBEDDINGS_FILE, mmap_mode="r")
            items = read_items(folder / ITEMS_FILE)
            path = folder / INDEX_FILE
            ann = AnnoyBackend.load(path, int(embeddings.shape[1])) if backend == ANNOY else \
                FaissBackend.load(backend, path)
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise ImgsimError(f"cannot open the {backend} index in {folder}: {exc}; rebuild it with the extract "
                              "stage") from None
        if len(ann) != len(items) or len(embeddings) != len(items):
            raise ImgsimError(f"index in {folder} is inconsistent: {len(ann)} indexed vectors, "
                              f"{len(embeddings)} embeddings, {len(items)} items; rebuild it with extract")
        if len({item.id for item in items}) != len(items):
            raise ImgsimError(f"index in {folder} is inconsistent: {ITEMS_FILE} repeats an id; rebuild it with extract")
        return cls(embeddings, items, n_trees, ann, next_id=next_id)


def write_items(path: Path, items: Sequence[GalleryItem]) -> None:
    """An item table as CSV (ITEM_FIELDS), atomically."""
    with atomic.atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(ITEM_FIELDS)
            # Plain tuples: dataclasses.astuple deep-copies every field, which is slow at gallery sizes.
            writer.writerows((i.id, i.path, i.label, i.split, i.sha256, i.phash) for i in items)


def read_items(path: Path) -> list[GalleryItem]:
    with open(path, newline="") as f:
        return [GalleryItem(int(r["id"]), r["path"], r["label"], r["split"], r["sha256"], r.get("phash") or "")
                for r in csv.DictReader(f)]


def cosines(vectors: NDArray[np.float32], query: NDArray[np.float32]) -> NDArray[np.float32]:
    """Each row's dot product with ``query`` (the cosine similarity of unit vectors), computed the same way for a
    row wherever it sits. BLAS's matrix-vector kernels sum a row in an order that depends on its place among the
    rows given (OpenBLAS on AVX-512 CPUs: 1-2 float32 ulps apart), so an item's score, and a tie's order, would
    change with the filter, shard or block that ranks it; numpy's einsum sums each row on its own, at about twice
    BLAS's time (0.35 vs 0.18 ms for 20,000 x 128). Both are made C-contiguous: einsum's sum order follows the
    memory layout."""
    return np.einsum("ij,j->i", np.ascontiguousarray(vectors, dtype=np.float32),
                     np.ascontiguousarray(np.asarray(query, dtype=np.float32).reshape(-1)))


def exact_top(embeddings: NDArray[np.float32], rows: NDArray[np.int64], query: NDArray[np.float32],
              k: int) -> tuple[list[int], list[float]]:
    """The ``k`` of ``rows`` nearest ``query`` by exact cosine (equal scores in the order given) and their angular
    distances, ranked EXACT_BLOCK rows at a time."""
    top, sims = top_in_blocks(embeddings, row_blocks(rows), query, k)
    return top.tolist(), angular_from_cosine(sims).tolist()


def row_blocks(rows: NDArray[np.int64] | range, size: int | None = None) -> Iterator[NDArray[np.int64]]:
    """``rows`` in consecutive arrays of at most ``size`` (default EXACT_BLOCK): views of an array's, or made
    block by block from a range (a gallery's every row need not exist as one array)."""
    size = size or EXACT_BLOCK
    for start in range(0, len(rows), size):
        block = rows[start:start + size]
        yield np.arange(block.start, block.stop, block.step, dtype=np.int64) if isinstance(block, range) else block


def top_in_blocks(embeddings: NDArray[np.float32], blocks: Iterable[NDArray[np.int64]], query: NDArray[np.float32],
                  k: int) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """The ``k`` rows nearest ``query`` among all ``blocks``' rows and their cosines, by exact search: one block's
    vectors gathered at a time and a running top ``k`` kept, so memory follows the block, not the rows' count.
    Equal scores keep the order given, as one stable sort over every row would."""
    query = np.asarray(query, dtype=np.float32).reshape(-1)
    best_rows, best_sims = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    for block in blocks:
        if len(block):  # (the best so far go first: on a tie, earlier rows win, as in one sort)
            rows = np.concatenate([best_rows, np.asarray(block, dtype=np.int64)])
            sims = np.concatenate([best_sims, cosines(embeddings[block], query)])
            top = _top(sims, k)
            best_rows, best_sims = rows[top], sims[top]
    return best_rows, best_sims


def _top(sims: NDArray[np.float32], k: int) -> NDArray[np.int64]:
    """Positions of the ``k`` largest, ties in position order: what ``argsort(-sims, kind="stable")[:k]`` gives,
    sorting only the scores at or above the k-th (a partition is linear; a full sort of a block is not)."""
    if len(sims) <= 4 * k or k < 1:
        return np.argsort(-sims, kind="stable")[:max(k, 0)]
    kth = np.partition(sims, len(sims) - k)[len(sims) - k]
    if np.isnan(kth):  # NaN scores sort last in the full sort, but compare false here
        return np.argsort(-sims, kind="stable")[:k]
    near = np.flatnonzero(sims >= kth)
    return near[np.argsort(-sims[near], kind="stable")[:k]]


def angular_from_cosine(similarities: NDArray) -> NDArray:
    """Annoy's angular distance sqrt(2 - 2 cos) from cosine similarities (clipped: float noise past +-1)."""
    return np.sqrt(np.clip(2.0 - 2.0 * similarities, 0.0, 4.0))


def cosine_from_angular(distance: float) -> float:
    """Cosine similarity from Annoy's angular distance sqrt(2 - 2 cos)."""
    return 1.0 - distance * distance / 2.0
