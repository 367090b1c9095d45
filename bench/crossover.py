"""Bench 25: where exact search stops being cheaper than an approximate index at the colour default's 1,408
dimensions: per-query latency of faiss-flat (exact) against Annoy and faiss-hnsw at the effort extract tunes them
to (recall@10 >= 0.99), by gallery size.

python -m bench.crossover --bundle FOLDER [--sizes 1000,3000,10000,30000,100000]   -> bench/results/crossover.json

The gallery is a colour bundle's embeddings (``--bundle``: e.g. a colour dev set's extract) tiled with noise as
bench/index_backends.py tiles the demo's; 200 other noisy copies are the queries. Each index is built as extract
builds it, its effort tuned by imgsim.effort.tune, then timed one query at a time on one core.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.common import save, table
from bench.index_backends import tiled
from imgsim.effort import tune
from imgsim.index import ANNOY, DEFAULT_SEARCH_K, FAISS_FLAT, FAISS_HNSW, GalleryIndex, GalleryItem
from imgsim.metrics import exact_topk, recall_at_k

K, QUERIES, N_TREES, TARGET = 10, 200, 20, 0.99


def row(backend: str, gallery: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> dict:
    items = [GalleryItem(i, "", "", "", "") for i in range(len(gallery))]
    started = time.perf_counter()
    index = GalleryIndex.build(gallery, items, n_trees=N_TREES, seed=42, backend=backend)
    build_s = time.perf_counter() - started
    effort = tune(index, gallery, TARGET, DEFAULT_SEARCH_K)
    found, times = [], []
    for q in queries:
        started = time.perf_counter()
        found.append(index.search(q, K, effort.search_k)[0])
        times.append((time.perf_counter() - started) * 1000)
    return {"items": len(gallery), "backend": backend, "effort": effort.value, "build_s": build_s,
            "recall_at_10": recall_at_k(found, truth, K, queries, gallery),
            "p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def main() -> None:
    import faiss
    faiss.omp_set_num_threads(1)  # a server worker searches on one core
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="a bundle whose embeddings.npy to tile")
    parser.add_argument("--sizes", default="1000,3000,10000,30000,100000")
    args = parser.parse_args()
    base = np.load(args.bundle / "embeddings.npy").astype(np.float32)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        both = tiled(base, max(n, len(base)) + QUERIES, seed=n)
        gallery, queries = both[:n], both[-QUERIES:]
        truth = exact_topk(queries, gallery, K)
        for backend in (FAISS_FLAT, ANNOY, FAISS_HNSW):
            rows.append(row(backend, gallery, queries, truth))
            print(rows[-1], flush=True)
    flat = {r["items"]: r["p50_ms"] for r in rows if r["backend"] == FAISS_FLAT}
    for r in rows:
        r["p50_of_flat"] = r["p50_ms"] / flat[r["items"]]
    print(table(rows, ["items", "backend", "effort", "recall_at_10", "p50_ms", "p99_ms", "p50_of_flat", "build_s"]))
    save("crossover", {"bundle_dim": int(base.shape[1]), "queries": QUERIES, "rows": rows})


if __name__ == "__main__":
    main()
