"""Scale-out: extraction throughput of 1 vs 2 shard processes on this machine, and the merge's index build
time and memory for 10^5 and 10^6 embeddings.

    python -m bench.scale          # ~8 min on 2 cores; needs bundles/demo (`make demo`) for its model

Extraction: 20,000 Fashion-MNIST gallery images and 2,000 queries, the demo model, each configuration as real
`imgsim extract` shard processes against one MLflow store. The machine's cores are shared fairly: one process
with 2 torch threads, or two processes with 1 each (each with one decoding worker). Merge: synthetic unit
vectors (128-d, the demo model's size) through GalleryIndex.build with extract's 20 trees, each size in its
own process so its peak memory (VmHWM) is its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]

from bench.common import DATA, save, table
from bench.hostile import demo_bundle
from imgsim.fashion_mnist import prepare
from imgsim.split import SplitConfig, split_dataset
from support.store import mlflow_store

GALLERY, QUERIES = 20_000, 2_000
BUILD = """
import json, sys, time
import numpy as np
from imgsim.index import GalleryIndex, GalleryItem

def status_mb(key):  # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child reports its parent's
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) / 1024

n, dim = int(sys.argv[1]), 128
before = status_mb("VmRSS")  # the interpreter and libraries
rng = np.random.default_rng(0)
vectors = rng.standard_normal((n, dim), dtype=np.float32)
vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
items = [GalleryItem(i, f"{i}.png", "", "train", "") for i in range(n)]
started = time.perf_counter()
index = GalleryIndex.build(vectors, items, n_trees=20)
seconds = time.perf_counter() - started
index.save(sys.argv[2])
size = sum(p.stat().st_size for p in __import__("pathlib").Path(sys.argv[2]).iterdir())
print(json.dumps({"seconds": seconds, "peak_mb": status_mb("VmHWM"),
                  "base_mb": before, "files_mb": size / 2**20}))
"""


def extraction_rows(model: Path) -> list[dict]:
    manifest = split_dataset(SplitConfig(data_dir=str(prepare(DATA))))
    train = [i for i in manifest.items if i.split == "train"][:GALLERY]
    test = [i for i in manifest.items if i.split == "test"][:QUERIES]
    manifest.items = train + test
    rows = []
    with tempfile.TemporaryDirectory() as tmp, mlflow_store(Path(tmp)):
        manifest_dir = manifest.save(Path(tmp) / "split")
        subprocess.run([sys.executable, "-m", "imgsim.cli", "setup-tracking"], check=True, capture_output=True)
        for processes, threads in ((1, 2), (2, 1)):
            group = f"p{processes}"
            cmds = [[sys.executable, "-m", "imgsim.cli", "extract", "--model-uri", str(model), "--manifest-uri",
                     str(manifest_dir), "--num-shards", str(processes), "--shard", str(s), "--shard-group", group,
                     "--threads", str(threads), "--workers", "1"] for s in range(processes)]
            started = time.perf_counter()
            procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                      env=os.environ | {"OMP_NUM_THREADS": str(threads)}) for c in cmds]
            for proc in procs:
                _, err = proc.communicate()
                if proc.returncode:
                    raise SystemExit(err[-2000:])
            seconds = time.perf_counter() - started
            rows.append({"processes": processes, "torch threads each": threads, "images": GALLERY + QUERIES,
                         "wall seconds": f"{seconds:.1f}", "images/s": round((GALLERY + QUERIES) / seconds)})
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "imgsim.cli", "extract", "--merge", group, "--gallery-name", "",
                            "--n-trees", "20"], check=True, capture_output=True)
            rows[-1]["merge seconds"] = f"{time.perf_counter() - started:.1f}"
    base = rows[0]["images/s"]
    for row in rows:
        row["vs 1 process"] = f"{row['images/s'] / base:.2f}"
    return rows


def merge_rows() -> list[dict]:
    rows = []
    for n in (100_000, 1_000_000):
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, "-c", BUILD, str(n), tmp], check=True, capture_output=True,
                                 text=True, env=os.environ | {"PYTHONPATH": str(REPO)})
        result = json.loads(out.stdout.strip().splitlines()[-1])
        growth = result["peak_mb"] - result["base_mb"]
        rows.append({"embeddings": f"{n:,}", "build seconds": f"{result['seconds']:.1f}",
                     "peak MB": round(result["peak_mb"]), "of which the data": round(growth),
                     "index files MB": round(result["files_mb"]), "bytes per item": round(growth * 2**20 / n)})
    return rows


def main() -> None:
    model = demo_bundle()
    extraction = extraction_rows(model)
    print(table(extraction, ["processes", "torch threads each", "images", "wall seconds", "images/s",
                             "vs 1 process", "merge seconds"]))
    merge = merge_rows()
    print()
    print(table(merge, ["embeddings", "build seconds", "peak MB", "of which the data", "index files MB",
                        "bytes per item"]))
    print(f"\nwrote {save('scale', {'extraction': extraction, 'merge': merge, 'gallery': GALLERY, 'queries': QUERIES})}")


if __name__ == "__main__":
    main()
