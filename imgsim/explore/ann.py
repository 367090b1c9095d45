"""ann_vs_exact.ipynb: Annoy against exact search over a grid of n_trees and search_k, and every index backend
on the same gallery."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from numpy.typing import NDArray

from imgsim.explore.gallery import Gallery
from imgsim.index import ANNOY, BACKENDS, INDEX_FILE, GalleryIndex, GalleryItem
from imgsim.metrics import exact_topk, recall_at_k


def ann_grid(gallery: Gallery, n_trees: Sequence[int], search_k: Sequence[int], queries: int = 500, k: int = 10,
             seed: int = 0) -> list[dict]:
    """Recall@k against exact search and single-query speed for every n_trees x search_k, on gallery vectors
    as queries; each n_trees is a fresh build (time and file size recorded). The bundle's own setting is
    included and marked."""
    vectors = np.asarray(gallery.index.embeddings, dtype=np.float32)
    picked = vectors[gallery.sample(queries, seed)]
    truth = exact_topk(picked, vectors, k)
    started = time.perf_counter()
    exact_topk(picked, vectors, k, chunk=1)
    exact_qps = len(picked) / (time.perf_counter() - started)
    grid = {trees: sorted(set(search_k) | ({gallery.search_k} if trees == gallery.n_trees else set()))
            for trees in sorted(set(n_trees) | {gallery.n_trees})}
    return [row | {"speedup_vs_exact": row["qps"] / exact_qps,
                   "bundle_setting": row["n_trees"] == gallery.n_trees and row["search_k"] == gallery.search_k}
            for row in annoy_grid(vectors, picked, truth, grid, k, seed)]


def backend_table(gallery: Gallery, queries: int = 500, k: int = 10, seed: int = 0) -> list[dict]:
    """Every index backend built on the gallery's vectors at its default setting (Annoy: the bundle's n_trees
    and search_k), with recall@k against exact search on gallery vectors as queries, single-query speed, build
    seconds and file size; the bundle's own backend is marked."""
    vectors = np.asarray(gallery.index.embeddings, dtype=np.float32)
    picked = vectors[gallery.sample(queries, seed)]
    truth = exact_topk(picked, vectors, k)
    items = [GalleryItem(i, "", "", "", "") for i in range(len(vectors))]
    rows = []
    for backend in BACKENDS:
        index, build, size_mb = _timed_build(vectors, items, gallery.n_trees, seed, backend)
        effort = gallery.search_k if backend == ANNOY else -1
        started = time.perf_counter()
        found = [index.search(q, k, effort)[0] for q in picked]
        qps = len(picked) / (time.perf_counter() - started)
        rows.append({"backend": backend, "recall_at_k": recall_at_k(found, truth, k), "qps": qps,
                     "build_seconds": build, "index_mb": size_mb, "bundle_backend": backend == gallery.index.backend})
    return rows


def annoy_grid(vectors: NDArray[np.float32], queries: NDArray[np.float32], truth: NDArray[np.int64],
               grid: dict[int, Sequence[int]], k: int, seed: int = 0) -> list[dict]:
    """For each n_trees (a fresh build: seconds and file size) and each of its search_k values: recall@k of
    single queries against ``truth`` (exact top-k) and their queries per second."""
    items = [GalleryItem(i, "", "", "", "") for i in range(len(vectors))]
    rows = []
    for trees, budgets in grid.items():
        index, build, size_mb = _timed_build(vectors, items, trees, seed, ANNOY)
        for budget in budgets:
            started = time.perf_counter()
            found = [index.search(q, k, budget)[0] for q in queries]
            qps = len(queries) / (time.perf_counter() - started)
            rows.append({"n_trees": trees, "search_k": budget, "recall_at_k": recall_at_k(found, truth, k),
                         "qps": qps, "build_seconds": build, "index_mb": size_mb})
    return rows


def _timed_build(vectors: NDArray[np.float32], items: list[GalleryItem], n_trees: int, seed: int,
                 backend: str) -> tuple[GalleryIndex, float, float]:
    """A fresh index, the seconds its build took, and its file's size in MB."""
    started = time.perf_counter()
    index = GalleryIndex.build(vectors, items, n_trees=n_trees, seed=seed, backend=backend)
    build = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        index.save(tmp)
        return index, build, (Path(tmp) / INDEX_FILE).stat().st_size / 2**20


def plot_ann_grid(rows: list[dict], out: Path | None = None):
    """Recall against queries per second, one line per n_trees, the bundle's setting ringed."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for trees in sorted({r["n_trees"] for r in rows}):
        line = sorted((r for r in rows if r["n_trees"] == trees), key=lambda r: r["search_k"])
        ax.plot([r["qps"] for r in line], [r["recall_at_k"] for r in line], marker="o", label=f"{trees} trees")
    for r in rows:
        if r["bundle_setting"]:
            ax.scatter([r["qps"]], [r["recall_at_k"]], s=220, facecolors="none", edgecolors="red", linewidths=2,
                       label=f"bundle: {r['n_trees']} trees, search_k {r['search_k']}", zorder=5)
    ax.set_xscale("log"), ax.set_xlabel("queries per second (one at a time)"), ax.set_ylabel("recall@k vs exact")
    ax.legend(fontsize=8), ax.grid(alpha=0.3)
    if out is not None:
        fig.savefig(out, dpi=100, bbox_inches="tight")
    return fig
