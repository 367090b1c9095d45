"""Bench 2: Annoy against exact search on the real Fashion-MNIST embeddings (60k x 128).

python -m bench.index_speed    (after bench/quality.py, which saves the embeddings)
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, require, save, table
from imgsim.explore.ann import annoy_grid
from imgsim.metrics import exact_topk

K, N_QUERIES = 10, 1000
TREES = (10, 20, 50, 100)
SEARCH_K = (-1, 500, 1000, 1250, 1500, 2000, 5000, 10000)
TARGET_RECALL = 0.99


def single_query_qps(search, queries) -> float:
    started = time.perf_counter()
    for q in queries:
        search(q)
    return len(queries) / (time.perf_counter() - started)


def exact_single(gallery):
    def search(q):
        sims = gallery @ q
        top = np.argpartition(-sims, K)[:K]
        return top[np.argsort(-sims[top])]
    return search


def main() -> None:
    require("gallery_embeddings.npy", "query_embeddings.npy")
    gallery = np.load(RESULTS / "gallery_embeddings.npy")
    queries = np.load(RESULTS / "query_embeddings.npy")[:N_QUERIES]
    truth = exact_topk(queries, gallery, K)
    exact_qps = single_query_qps(exact_single(gallery), queries[:300])
    every_query = np.load(RESULTS / "query_embeddings.npy")
    started = time.perf_counter()
    exact_topk(every_query, gallery, K)
    batched_qps = len(every_query) / (time.perf_counter() - started)
    rows = [{"method": "exact numpy, one query at a time", "recall_at_10": 1.0, "qps": exact_qps, "speedup": 1.0},
            {"method": f"exact numpy, batched ({len(every_query):,} queries)", "recall_at_10": 1.0, "qps": batched_qps,
             "speedup": batched_qps / exact_qps}]
    for r in annoy_grid(gallery, queries, truth, {n: SEARCH_K for n in TREES}, K, seed=42):
        r["recall_at_10"] = r.pop("recall_at_k")
        rows.append({"method": f"annoy n_trees={r['n_trees']} search_k={r['search_k']}", **r,
                     "speedup": r["qps"] / exact_qps})
    print(f"gallery {gallery.shape}, {len(queries)} queries, k={K}")
    print(table(rows, ["method", "recall_at_10", "qps", "speedup", "build_seconds", "index_mb"]))
    best = operating_point(rows)
    print(f"fastest with recall@10 >= {TARGET_RECALL}: {best['method'] if best else 'none'}"
          + (f" ({best['recall_at_10']:.4f} at {best['speedup']:.1f}x exact)" if best else ""))
    _plot(rows, RESULTS / "recall_vs_qps.png")
    print(f"wrote {save('index', {'gallery': list(gallery.shape), 'queries': len(queries), 'rows': rows, 'best': best})}")


def operating_point(rows: list[dict]) -> dict | None:
    """The fastest Annoy setting that reaches the recall target."""
    good = [r for r in rows if "n_trees" in r and r["recall_at_10"] >= TARGET_RECALL]
    return max(good, key=lambda r: r["qps"], default=None)


def _plot(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n_trees in TREES:
        pts = [r for r in rows if r.get("n_trees") == n_trees]
        ax.plot([r["qps"] for r in pts], [r["recall_at_10"] for r in pts], marker="o", label=f"annoy, {n_trees} trees")
    exact = rows[0]
    ax.scatter([exact["qps"]], [1.0], marker="*", s=150, color="black", label="exact (numpy, single query)")
    ax.set_xscale("log"), ax.set_xlabel("single-query queries/second (log)"), ax.set_ylabel("recall@10")
    ax.grid(alpha=0.3), ax.legend(), ax.set_title("Annoy vs exact search, 60k x 128 embeddings")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
