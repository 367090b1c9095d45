"""Index backends side by side: Annoy, faiss exact (flat), faiss HNSW and faiss IVF on real demo embeddings.

python -m bench.index_backends [--bundle bundles/demo] [--sizes real,100000,1000000]   (after `make demo`)

"real" is the demo gallery's own 128-d embeddings, 1,000 of them held out as the queries. Each other size is the
demo gallery's embeddings tiled with Gaussian noise (sigma 0.01 per dimension, a noise vector of
norm about 0.11, before re-normalising) up
to that many items; 1,000 other noisy copies are the queries. Per backend at its bundle default (annoy: extract's
20 trees and search_k; faiss-hnsw: imgsim.index.HNSW_*): recall@10 against exact search, single-query latency
p50/p99 and queries/second from 1 and 4 client threads (every backend searches one query on one core: faiss's
OpenMP is set to 1 thread), build seconds on all cores, index bytes per item and the build's peak memory (a fresh process per
build, its peak RSS minus its RSS before loading the vectors). An efSearch sweep at each size shows how
HNSW_EF_SEARCH was chosen: the smallest effort with recall@10 >= 0.99 at every size; an nprobe sweep, IVF_NPROBE.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import save, table
from imgsim.index import (ANNOY, BACKENDS, DEFAULT_SEARCH_K, FAISS_HNSW, FAISS_IVF, HNSW_EF_SEARCH, INDEX_FILE,
                          IVF_NPROBE, GalleryIndex)
from imgsim.metrics import exact_topk, recall_at_k

K, N_QUERIES, N_TREES, NOISE = 10, 1000, 20, 0.01
EF_SWEEP = (16, 32, 48, 64, 96, 128)
NPROBE_SWEEP = (4, 8, 16, 32, 64)
TARGET_RECALL = 0.99


def tiled(base: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` unit vectors: copies of ``base`` rows plus noise (the first len(base) rows are exact copies)."""
    rng = np.random.default_rng(seed)
    rows = np.concatenate([np.arange(min(n, len(base))), rng.integers(0, len(base), max(0, n - len(base)))])
    out = base[rows].astype(np.float32)
    out[len(base):] += rng.normal(0, NOISE, size=out[len(base):].shape).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


# A fresh interpreter per build that imports only the index module; its peak RSS (VmHWM, which exec resets,
# unlike getrusage's ru_maxrss) above the RSS after imports is the build's.
BUILD = """
import json, sys, time
import numpy as np
from imgsim.index import GalleryIndex, GalleryItem
backend, path, folder, n_trees = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
status = lambda key: int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key))) * 1024
before = status("VmRSS:")
vectors = np.load(path)
items = [GalleryItem(i, "", "", "", "") for i in range(len(vectors))]
started = time.perf_counter()
index = GalleryIndex.build(vectors, items, n_trees=n_trees, backend=backend)
seconds = time.perf_counter() - started
index.save(folder)
print(json.dumps({"build_s": seconds, "peak_build_mib": (status("VmHWM:") - before) / 2**20}))
"""


def build(backend: str, vectors_path: Path, folder: Path) -> dict:
    """Build and save in a fresh process: seconds, peak memory above the interpreter's (vectors included)."""
    out = subprocess.run([sys.executable, "-c", BUILD, backend, str(vectors_path), str(folder), str(N_TREES)],
                         check=True, capture_output=True, text=True).stdout
    return {**json.loads(out.splitlines()[-1]), "index_bytes": (folder / INDEX_FILE).stat().st_size}


def timed_search(index: GalleryIndex, queries: np.ndarray, search_k: int, threads: int) -> tuple[np.ndarray, float]:
    """Per-query latencies (s) and overall queries/second with ``threads`` client threads."""
    def one(q):
        started = time.perf_counter()
        index.search(q, K, search_k)
        return time.perf_counter() - started
    started = time.perf_counter()
    if threads == 1:
        lat = [one(q) for q in queries]
    else:
        import faiss  # omp_set_num_threads holds per thread: each client thread searches on one core
        with concurrent.futures.ThreadPoolExecutor(threads, initializer=faiss.omp_set_num_threads,
                                                   initargs=(1,)) as pool:
            lat = list(pool.map(one, queries))
    return np.asarray(lat), len(queries) / (time.perf_counter() - started)


def recall(index: GalleryIndex, queries: np.ndarray, truth: np.ndarray, search_k: int) -> float:
    return recall_at_k([index.search(q, K, search_k)[0] for q in queries], truth, K)


def main() -> None:
    import faiss
    faiss.omp_set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="bundles/demo", help="a bundle whose embeddings.npy to tile")
    parser.add_argument("--sizes", default="real,100000,1000000")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    args = parser.parse_args()
    base_file = Path(args.bundle) / "embeddings.npy"
    if not base_file.exists():
        raise SystemExit(f"{base_file} not found: run `make demo` first (or pass --bundle)")
    base = np.load(base_file)
    rows, sweep, probe_sweep = [], [], []
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            if size == "real":
                order = np.random.default_rng(0).permutation(len(base))
                vectors, queries = base[order[N_QUERIES:]], base[order[:N_QUERIES]]
            else:
                vectors = tiled(base, int(size), seed=0)
                queries = tiled(base, len(base) + N_QUERIES, seed=1)[len(base):]
            n = len(vectors)
            path = Path(tmp) / "vectors.npy"
            np.save(path, vectors)
            truth = exact_topk(queries, vectors, K)
            for backend in args.backends.split(","):
                folder = Path(tmp) / backend
                built = build(backend, path, folder)
                index = GalleryIndex.load(folder, n_trees=N_TREES, backend=backend)
                search_k = DEFAULT_SEARCH_K if backend == ANNOY else -1
                if backend == FAISS_HNSW:
                    chosen = index.ann.index.hnsw.efSearch
                    for ef in EF_SWEEP:
                        index.ann.index.hnsw.efSearch = ef
                        lat, qps = timed_search(index, queries[:300], search_k, 1)
                        sweep.append({"items": n, "data": "real" if size == "real" else "tiled", "ef_search": ef, "recall_at_10": recall(index, queries, truth, -1),
                                      "qps_1": qps})
                    index.ann.index.hnsw.efSearch = chosen
                if backend == FAISS_IVF:
                    for nprobe in NPROBE_SWEEP:
                        index.ann.index.nprobe = nprobe
                        lat, qps = timed_search(index, queries[:300], search_k, 1)
                        probe_sweep.append({"items": n, "data": "real" if size == "real" else "tiled",
                                            "lists": index.ann.index.nlist, "nprobe": nprobe,
                                            "recall_at_10": recall(index, queries, truth, -1), "qps_1": qps})
                    index.ann.index.nprobe = IVF_NPROBE
                lat, qps1 = timed_search(index, queries, search_k, 1)
                _, qps4 = timed_search(index, queries, search_k, 4)
                rows.append({"items": n, "data": "real" if size == "real" else "tiled", "backend": backend, "recall_at_10": recall(index, queries, truth, search_k),
                             "p50_ms": 1000 * float(np.percentile(lat, 50)), "p99_ms": 1000 * float(np.percentile(lat, 99)),
                             "qps_1": qps1, "qps_4": qps4, **built, "bytes_per_item": built["index_bytes"] / n})
                print(f"{n:,} items, {backend}: recall@10 {rows[-1]['recall_at_10']:.4f}, "
                      f"{qps1:,.0f} qps, built in {built['build_s']:.1f} s", flush=True)
                del index
    base_rows = {r["items"]: r for r in rows if r["backend"] == ANNOY}
    for r in rows:
        if r["items"] in base_rows:
            r["qps_1_vs_annoy"] = r["qps_1"] / base_rows[r["items"]]["qps_1"]
    columns = ["items", "data", "backend", "recall_at_10", "p50_ms", "p99_ms", "qps_1", "qps_4", "qps_1_vs_annoy", "build_s",
               "bytes_per_item", "peak_build_mib"]
    print("\n" + table(rows, columns))
    if sweep:
        print("\nfaiss-hnsw efSearch sweep (the default is the smallest with recall@10 >= "
              f"{TARGET_RECALL}):\n" + table(sweep, list(sweep[0])))
    if probe_sweep:
        print("\nfaiss-ivf nprobe sweep (the default is the smallest with recall@10 >= "
              f"{TARGET_RECALL}):\n" + table(probe_sweep, list(probe_sweep[0])))
    print(f"wrote {save('index_backends', {'rows': rows, 'ef_sweep': sweep, 'nprobe_sweep': probe_sweep, 'noise': NOISE, 'queries': N_QUERIES, 'ef_search': HNSW_EF_SEARCH, 'nprobe': IVF_NPROBE})}")


if __name__ == "__main__":
    main()
