"""A gallery change stored as its changes over the base version against today's whole copy, per index backend:
seconds, bytes written, recall@10 and search latency.

    python -m bench.changes [--bundle bundles/demo]   (after `make demo`; ~6 min on 2 cores)

For each backend the demo bundle's gallery (52,456 Fashion-MNIST images) is indexed whole and registered as
version 1 of a gallery in a fresh MLflow store (sqlite in a temp folder). Then, through the real
`imgsim.runs.gallery`: 525 images the gallery does not hold (1 %) are added as changes (the default) and, from
the same version 1, as a whole rebuilt copy (``full``, what every change did before); then 525 others are removed
as changes. Bytes: what the new version stores in MLflow. Search: 1,000 gallery vectors as queries, k = 10, one
thread, in-process (`Searcher.nearest`), on each version as `imgsim` loads it, the versions timed in turn query by
query. "index s": making the changed index from base + changes against rebuilding it whole from the same vectors.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np

from bench.common import DATA, save, table
from bench.hostile import demo_bundle
from imgsim.bundle import ServingBundle
from imgsim.bundle_format import BUNDLE_JSON
from imgsim.changes import MAX_CHANGE_FRACTION, MAX_CHANGES
from imgsim.fashion_mnist import prepare
from imgsim.index import BACKENDS, GalleryIndex
from imgsim.metrics import index_recall
from imgsim.modelspec import file_sha256
from imgsim.runs import tracking
from imgsim.runs.export import fetched_version
from imgsim.runs.gallery import run_gallery_add, run_gallery_remove
from imgsim.serve.search import Searcher
from imgsim.stages.bundle_writer import write_bundle
from imgsim.stages.settings import AddConfig, RemoveConfig
from support.store import mlflow_store

CHANGED, K, N_QUERIES = 525, 10, 1000
COLUMNS = ["backend", "version", "seconds", "index s", "MB stored", "recall@10", "search p50 ms", "vs whole"]


def _mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir()) / 1e6


def _p50_ms(uris: list[str], queries: np.ndarray) -> list[float]:
    """Single-query search p50 of each version as imgsim loads it, timed in turn query by query (side by side:
    drift on a shared machine falls on all of them alike)."""
    with contextlib.ExitStack() as stack:
        searchers = [Searcher(stack.enter_context(fetched_version(uri))[0]) for uri in uris]
        times = np.zeros((len(uris), len(queries)))
        for j, q in enumerate(queries):
            for i, searcher in enumerate(searchers):
                started = time.perf_counter()
                searcher.nearest(q, K)
                times[i, j] = 1000 * (time.perf_counter() - started)
    return np.median(times, axis=1).tolist()


def _index_seconds(whole: GalleryIndex, changed: ServingBundle) -> tuple[float, float]:
    """Making the changed version's index: from the base and the changes, against rebuilding it whole."""
    started = time.perf_counter()
    changed.changes.index(changed.index.next_id)
    from_changes = time.perf_counter() - started
    started = time.perf_counter()
    GalleryIndex.build(np.asarray(changed.index.embeddings), changed.index.items, n_trees=whole.n_trees,
                       next_id=changed.index.next_id, backend=whole.backend)
    return from_changes, time.perf_counter() - started


def _register(whole_dir: Path, name: str) -> str:
    with mlflow.start_run(run_name=f"bench {name}") as run:
        mlflow.log_artifacts(str(whole_dir), "bundle")
    tracking.register_bundle(name, run.info.run_id, f"{run.info.artifact_uri}/bundle", "serving",
                             bundle_sha256=file_sha256(whole_dir / BUNDLE_JSON))
    return f"models:/{name}/1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=str(demo_bundle()))
    args = parser.parse_args()
    root = prepare(DATA)
    source = ServingBundle.load(args.bundle)
    vectors = np.asarray(source.index.embeddings)
    held = {item.path for item in source.index.items}
    outside = sorted(str(p.relative_to(root)) for p in root.rglob("*.png") if str(p.relative_to(root)) not in held)
    rng = np.random.default_rng(0)
    new = [str(root / outside[i]) for i in sorted(rng.choice(len(outside), CHANGED, replace=False))]
    gone = rng.choice([item.id for item in source.index.items], CHANGED, replace=False)
    queries = vectors[rng.choice(len(vectors), N_QUERIES, replace=False)]
    for path in new:  # into the page cache, so that the first change timed does not pay for the disk
        Path(path).read_bytes()
    whole_bytes, rows = sum(f.stat().st_size for f in Path(args.bundle).iterdir()), []
    with tempfile.TemporaryDirectory(prefix="bench-changes-") as tmp, mlflow_store(Path(tmp)):
        tracking.setup()
        for backend in BACKENDS:
            whole_dir = Path(tmp) / backend
            source.index = GalleryIndex.build(vectors, source.index.items, n_trees=source.index.n_trees,
                                              next_id=source.index.next_id, backend=backend)
            write_bundle(source, whole_dir, model_from=source.model_folder)
            v1 = _register(whole_dir, f"bench-{backend}")
            found = {"1: the whole gallery": {"seconds": "", "MB stored": f"{_mb(whole_dir):.1f}", "uri": v1,
                                              "recall@10": round(index_recall(
                                                  vectors[rng.choice(len(vectors), 500, replace=False)], vectors,
                                                  source.index, source.search_k)["index_recall_at_10"], 4)}}
            steps = (("add 525 (1 %) as changes", v1, lambda b: run_gallery_add(AddConfig(
                          bundle=b, register_name=f"bench-{backend}", paths=",".join(new), root=str(root)))),
                     ("add 525 (1 %) whole (full)", v1, lambda b: run_gallery_add(AddConfig(
                          bundle=b, register_name="", alias="", paths=",".join(new), root=str(root), full=True))),
                     ("then remove 525 as changes", f"models:/bench-{backend}/2", lambda b: run_gallery_remove(
                          RemoveConfig(bundle=b, register_name=f"bench-{backend}", ids=",".join(map(str, gone))))))
            for step, parent, change in steps:
                started = time.perf_counter()
                summary = change(parent)
                found[step] = {"seconds": f"{time.perf_counter() - started:.1f}", "uri": summary["bundle_uri"],
                               "MB stored": f"{summary['stored_bytes'] / 1e6:.2f}",
                               "recall@10": summary["index_recall_at_10"]}
            p50 = _p50_ms([f["uri"] for f in found.values()], queries)
            with fetched_version(f"models:/bench-{backend}/2") as (folder, _):
                from_changes, rebuilt = _index_seconds(source.index, ServingBundle.load(folder))
            for (step, f), ms in zip(found.items(), p50):
                index_s = {"add 525 (1 %) as changes": f"{from_changes:.3f}",
                           "add 525 (1 %) whole (full)": f"{rebuilt:.2f}"}.get(step, "")
                rows.append({"backend": backend, "version": step, "seconds": f["seconds"], "index s": index_s,
                             "MB stored": f["MB stored"], "recall@10": f["recall@10"], "search p50 ms": f"{ms:.3f}",
                             "vs whole": f"{ms / p50[0]:.2f}"})
            print(table(rows[-4:], COLUMNS))
    print(table(rows, COLUMNS))
    path = save("changes", {"rows": rows, "changed": CHANGED, "queries": N_QUERIES, "gallery": len(vectors),
                            "whole_bundle_bytes": whole_bytes, "max_change_fraction": MAX_CHANGE_FRACTION,
                            "max_changes": MAX_CHANGES})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
