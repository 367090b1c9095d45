"""An index's search effort chosen by measurement: the least effort whose recall@10 against exact search reaches
the target on gallery vectors as queries, so what a user is served is what extract's exact metrics describe.

Annoy's effort is ``search_k`` (nodes inspected per query, passed at every search and recorded in the bundle);
faiss-hnsw's ``efSearch`` and faiss-ivf's ``nprobe`` live in the index file, set here before it is saved; faiss-flat
is exact. Each step doubles the effort, up to a cap past which the index answers about as slowly as exact search.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.typing import NDArray

from imgsim.index import ANNOY, DEFAULT_SEARCH_K, FAISS_FLAT, FAISS_HNSW, FAISS_IVF, GalleryIndex
from imgsim.metrics import exact_topk, recall_at_k

MAX_DOUBLINGS = 8  # 1500 -> 384,000 Annoy nodes, efSearch 32 -> 8192, nprobe 16 -> every list
SAMPLE = 500  # gallery vectors as queries: recall to about +-0.005 at 0.99
# extract's recall_target by default, and what an index rebuilt by a gallery change or cut into shards is tuned to.
RECALL_TARGET = 0.99


@dataclasses.dataclass(frozen=True)
class Effort:
    """What the index serves with: ``search_k`` (Annoy's; the others ignore it), the backend's own ``value``
    (search_k, efSearch or nprobe), and the recall@10 measured there; ``reached``: whether it meets the target."""

    search_k: int
    value: int
    recall: float
    reached: bool


def tune(index: GalleryIndex, gallery: NDArray[np.float32], target: float, search_k: int, seed: int = 42,
         k: int = 10) -> Effort:
    """Raise ``index``'s effort from its start (``search_k`` for Annoy, the file's value for faiss) until recall@k
    on a sample of ``gallery`` (its rows) reaches ``target``; faiss indexes keep the value chosen."""
    pick = np.sort(np.random.default_rng(seed).permutation(len(gallery))[:SAMPLE])
    queries = np.asarray(gallery[pick], dtype=np.float32)
    exact = exact_topk(queries, gallery, min(k, len(gallery)))
    get, put, cap = _knob(index, search_k)

    def recall_at(value: int) -> float:
        put(value)
        approx = [index.search(q, k, value if index.backend == ANNOY else search_k)[0] for q in queries]
        return recall_at_k(approx, exact, min(k, len(gallery)), queries, gallery)

    value = get()
    recall = recall_at(value)
    for _ in range(MAX_DOUBLINGS):
        if recall >= target or value >= cap:
            break
        value = min(cap, value * 2)
        recall = recall_at(value)
    return Effort(value if index.backend == ANNOY else search_k, value, recall, recall >= target)


def retune(index: GalleryIndex, gallery: NDArray[np.float32], target: float, search_k: int, seed: int = 42,
           what: str = "the rebuilt index") -> tuple[int, float | None]:
    """A rebuilt index's (search_k, measured recall): tuned to ``target`` from the default start, not from the
    tuned ``search_k`` it replaces (a start only ever doubles, so rebuilds would creep towards exact search);
    ``search_k`` as given, unmeasured, where ``target`` is 0."""
    if target <= 0:
        return search_k, None
    effort = tune(index, gallery, target, min(search_k, DEFAULT_SEARCH_K), seed)
    if not effort.reached:
        print(f"{what} reaches recall@10 {effort.recall:.3f} at its largest effort ({effort.value}), short of its "
              f"recall_target {target}")
    return effort.search_k, effort.recall


def _knob(index: GalleryIndex, search_k: int):
    """(read, write, largest useful value) of the backend's effort."""
    backend, n = index.backend, len(index.items)
    if backend == ANNOY:  # (passed to every search: nothing to write)
        start = max(1, search_k if search_k > 0 else index.n_trees * 10)
        return (lambda: start), (lambda v: None), max(start, index.n_trees * n)
    faiss_index = index.ann.index
    if backend == FAISS_HNSW:
        return (lambda: faiss_index.hnsw.efSearch), (lambda v: setattr(faiss_index.hnsw, "efSearch", v)), max(n, 1)
    if backend == FAISS_IVF:
        return (lambda: faiss_index.nprobe), (lambda v: setattr(faiss_index, "nprobe", v)), faiss_index.nlist
    assert backend == FAISS_FLAT
    return (lambda: 1), (lambda v: None), 1
