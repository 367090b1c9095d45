"""A sharded gallery against the whole one, per index backend: recall@10 against exact search, search latency,
and what `imgsim shard-bundle` writes.

python -m bench.shards [--bundle bundles/demo] [--shards 4]   (after `make demo`)

For each backend the demo bundle's gallery is indexed whole, then cut into N shards with the real
`imgsim.sharded.shard_bundle`. Queries: 1,000 gallery vectors; each query's own item is left out of every answer
(k + 1 fetched), so recall@10 is over its 10 true neighbours. The sharded answer is each shard's top k merged by
`imgsim.serve.graph.Merger` (the graph's COMBINER code). Latency is in-process: the whole index's search against
the slowest shard's (the graph asks the shards in parallel, so that is the critical path) plus the merge; the
HTTP hops of the graph come on top (tests/test_graph.py runs them for real).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import save, table
from imgsim.bundle import ServingBundle
from imgsim.index import BACKENDS, GalleryIndex
from imgsim.serve.graph import Merger
from imgsim.serve.search import Searcher
from imgsim.sharded import part_name
from imgsim.stages.bundle_writer import write_bundle
from imgsim.stages.sharding import shard_bundle

K, N_QUERIES = 10, 1000


def _answer(searcher: Searcher, shard: int, shards: int, vector: np.ndarray) -> dict:
    rows, dists = searcher.nearest(vector, K + 1)
    items = searcher.index.items
    return {"shard": shard, "shards": shards, "gallery": "bench", "items": searcher.size, "query": {"k": K + 1},
            "results": [{"neighbours": [{"id": items[r].id, "path": "", "label": "", "distance": d}
                                        for r, d in zip(rows, dists)]}]}


def _top(ids: list[int], own: int) -> list[int]:
    return [i for i in ids if i != own][:K]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="bundles/demo")
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args()
    source = ServingBundle.load(args.bundle)
    vectors = np.asarray(source.index.embeddings)
    ids = np.asarray([item.id for item in source.index.items])
    queries = np.random.default_rng(0).choice(len(vectors), N_QUERIES, replace=False)
    truth = [_top(ids[np.argsort(-(vectors @ vectors[q]), kind="stable")[:K + 1]].tolist(), int(ids[q]))
             for q in queries]
    merger, rows = Merger(args.shards), []
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        for backend in BACKENDS:
            whole_dir = Path(tmp) / backend
            source.index = GalleryIndex.build(vectors, source.index.items, n_trees=source.index.n_trees,
                                              next_id=source.index.next_id, backend=backend)
            write_bundle(source, whole_dir, model_from=args.bundle)
            started = time.perf_counter()
            summary = shard_bundle(whole_dir, Path(tmp) / f"{backend}-sharded", args.shards)
            shard_s = time.perf_counter() - started
            whole = Searcher(whole_dir)
            parts = [Searcher(Path(summary["out"]) / part_name("shard", i)) for i in range(args.shards)]
            whole_ms, slowest_ms, merge_ms, found_whole, found_sharded = [], [], [], [], []
            for q in queries:
                own = int(ids[q])
                started = time.perf_counter()
                got = whole.nearest(vectors[q], K + 1)[0]
                whole_ms.append(1000 * (time.perf_counter() - started))
                found_whole.append(_top([whole.index.items[r].id for r in got], own))
                answers, times = [], []
                for i, part in enumerate(parts):
                    started = time.perf_counter()
                    answers.append(_answer(part, i, args.shards, vectors[q]))
                    times.append(1000 * (time.perf_counter() - started))
                slowest_ms.append(max(times))
                started = time.perf_counter()
                merged = merger.merge(answers)["results"][0]["neighbours"]
                merge_ms.append(1000 * (time.perf_counter() - started))
                found_sharded.append(_top([n["id"] for n in merged], own))
            recall = [float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))
                      for found in (found_whole, found_sharded)]
            rows.append({"backend": backend, "shards": args.shards, "recall whole": recall[0],
                         "recall sharded": recall[1], "p50 ms whole": float(np.percentile(whole_ms, 50)),
                         "p50 ms slowest shard": float(np.percentile(slowest_ms, 50)),
                         "p50 ms merge": float(np.percentile(merge_ms, 50)), "shard-bundle s": shard_s,
                         "MB written": summary["bytes"] / 1e6,
                         "whole bundle MB": sum(f.stat().st_size for f in whole_dir.iterdir()) / 1e6})
            print(table(rows[-1:], list(rows[-1])).splitlines()[-1], flush=True)
    columns = list(rows[0])
    print("\n" + table(rows, columns))
    print(f"wrote {save('shards', {'rows': rows, 'queries': N_QUERIES, 'gallery': len(vectors)})}")


if __name__ == "__main__":
    main()
