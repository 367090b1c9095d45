"""Filtered queries on the demo bundle: latency and recall@10 of Searcher.nearest with a label filter or excluded
ids, against the same query unfiltered, for each index backend.

python -m bench.filters [--bundle bundles/demo]   (after `make demo`)

Queries are 500 gallery vectors. Filters: one label (a tenth of Fashion-MNIST's gallery, above the exact-ranking
limit of 20,000 items only when the gallery is larger: here it is ranked exactly), two labels, and the query's own
10 nearest ids excluded (over-fetch through the index). Recall is against brute force over the admissible items.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import save, table
from imgsim.index import BACKENDS, GalleryIndex
from imgsim.metrics import recall_at_k
from imgsim.serve import search
from imgsim.serve.search import Filter, Searcher

K, N_QUERIES = 10, 500


def exact(searcher: Searcher, query: np.ndarray, where: Filter | None, labels: np.ndarray,
          ids: np.ndarray) -> list[int]:
    """Brute force over the admissible items (``labels`` and ``ids``: every item's, as arrays)."""
    keep = np.ones(len(ids), dtype=bool)
    if where is not None and where.labels is not None:
        keep &= np.isin(labels, sorted(where.labels))
    if where is not None and where.exclude_ids:
        keep &= ~np.isin(ids, sorted(where.exclude_ids))
    rows = np.flatnonzero(keep)
    sims = np.asarray(searcher.index.embeddings[rows]) @ query
    return rows[np.argsort(-sims, kind="stable")[:K]].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="bundles/demo")
    args = parser.parse_args()
    searcher = Searcher(args.bundle)
    vectors = np.asarray(searcher.index.embeddings)
    queries = np.random.default_rng(0).choice(len(vectors), N_QUERIES, replace=False)
    labels = sorted({item.label for item in searcher.index.items})
    # The items stay the same under every backend: their labels and ids as arrays, for the brute force.
    item_labels = np.asarray([item.label for item in searcher.index.items])
    item_ids = np.asarray([item.id for item in searcher.index.items])
    rows, default_limit = [], search.EXACT_FILTER_ITEMS
    for backend in BACKENDS:
        searcher.index = GalleryIndex.build(vectors, searcher.index.items, n_trees=searcher.index.n_trees,
                                            backend=backend)
        cases = {"none": lambda q: None, "1 label": lambda q: Filter(frozenset(labels[:1])),
                 "2 labels": lambda q: Filter(frozenset(labels[:2])),
                 "exclude its 10 nearest": lambda q: Filter(None, frozenset(
                     searcher.index.items[r].id for r in exact(searcher, vectors[q], None, item_labels, item_ids)))}
        for limit, path in ((default_limit, "default"), (0, "index only")):
            search.EXACT_FILTER_ITEMS = limit
            for name, make in cases.items():
                if path == "index only" and "label" not in name:
                    continue
                filters = [make(q) for q in queries]
                lat, found = [], []
                for q, where in zip(queries, filters):
                    started = time.perf_counter()
                    found.append(searcher.nearest(vectors[q], K, where)[0])
                    lat.append(time.perf_counter() - started)
                truth = np.asarray([exact(searcher, vectors[q], where, item_labels, item_ids)
                                    for q, where in zip(queries, filters)])
                rows.append({"backend": backend, "filter": name, "path": path,
                             "recall_at_10": recall_at_k(found, truth, K),
                             "p50_ms": 1000 * float(np.percentile(lat, 50)),
                             "p99_ms": 1000 * float(np.percentile(lat, 99))})
                print(table(rows[-1:], list(rows[-1])).splitlines()[-1], flush=True)
        search.EXACT_FILTER_ITEMS = default_limit
    print("\n" + table(rows, ["backend", "filter", "path", "recall_at_10", "p50_ms", "p99_ms"]))
    print(f"wrote {save('filters', {'rows': rows, 'queries': N_QUERIES, 'gallery': len(vectors)})}")


if __name__ == "__main__":
    main()
