"""Living gallery on Fashion-MNIST: adding 1% of the gallery vs a full extract, recall after add and remove, and
the duplicate finder's throughput and counts over all 70,000 images.

    python -m bench.gallery            # ~10 min on 2 cores; needs bundles/demo (`make demo`) for its model

The extract runs with the model of the demo bundle on the default split, minus 525 training images held back;
`gallery add` then adds exactly those 525. Everything runs through a fresh MLflow store in a temp folder.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import DATA, save, table
from bench.hostile import demo_bundle
from imgsim import duplicates
from imgsim.bundle import ServingBundle
from imgsim.fashion_mnist import prepare
from imgsim.runs import tracking
from imgsim.runs.export import fetched_version
from imgsim.runs.extract import run_extract
from imgsim.runs.gallery import run_gallery_add, run_gallery_remove
from imgsim.split import SplitConfig, split_dataset
from imgsim.stages.settings import AddConfig, ExtractConfig, RemoveConfig
from support.store import mlflow_store

HELD_BACK = 525  # 1% of the 52,500-image gallery the default split indexes


def main() -> None:
    model = demo_bundle()
    root = prepare(DATA)
    rows, dup_rows = [], []
    with tempfile.TemporaryDirectory() as tmp, mlflow_store(Path(tmp)):
        tracking.setup()
        started = time.perf_counter()
        manifest = split_dataset(SplitConfig(data_dir=str(root)))
        split_seconds = time.perf_counter() - started
        train = [i for i, item in enumerate(manifest.items) if item.split == "train"]
        held = set(np.random.default_rng(0).choice(train, HELD_BACK, replace=False).tolist())
        added_paths = [str(Path(manifest.root) / manifest.items[i].path) for i in sorted(held)]
        manifest.items = [item for i, item in enumerate(manifest.items) if i not in held]
        manifest_dir = manifest.save(Path(tmp) / "split")

        started = time.perf_counter()
        extract_id = run_extract(ExtractConfig(model_uri=str(model), manifest_uri=str(manifest_dir)))
        extract_seconds = time.perf_counter() - started
        run = tracking.mlflow.get_run(extract_id)
        gallery_seconds = run.data.metrics["gallery_size"] / run.data.metrics["embed_images_per_second"] + \
            run.data.metrics["index_build_seconds"]
        rows.append({"step": "extract (whole stage: gallery, queries, evaluation, plots)", "images": int(
            run.data.metrics["gallery_size"]), "seconds": f"{extract_seconds:.1f}", "vs extract": "1.000",
            "recall@10": round(run.data.metrics["index_recall_at_10"], 4)})

        started = time.perf_counter()
        added = run_gallery_add(AddConfig(paths=",".join(added_paths)))
        add_seconds = time.perf_counter() - started
        rows.append({"step": f"gallery add ({HELD_BACK} images = 1%)", "images": added["added"],
                     "seconds": f"{add_seconds:.1f}", "vs extract": f"{add_seconds / extract_seconds:.3f}",
                     "recall@10": added["index_recall_at_10"]})

        with fetched_version("models:/imgsim-gallery@serving") as (folder, _):
            ids = [item.id for item in ServingBundle.load(folder).index.items]
        gone = np.random.default_rng(1).choice(ids, HELD_BACK, replace=False)
        started = time.perf_counter()
        removed = run_gallery_remove(RemoveConfig(ids=",".join(map(str, gone))))
        remove_seconds = time.perf_counter() - started
        rows.append({"step": f"gallery remove ({HELD_BACK} images)", "images": removed["removed"],
                     "seconds": f"{remove_seconds:.1f}", "vs extract": f"{remove_seconds / extract_seconds:.3f}",
                     "recall@10": removed["index_recall_at_10"]})

        with fetched_version("models:/imgsim-gallery@serving") as (folder, _):
            started = time.perf_counter()
            in_bundle, _ = duplicates.find_in_bundle(folder)
            bundle_seconds = time.perf_counter() - started
    started = time.perf_counter()
    in_folder = duplicates.find_in_folder(root)
    folder_seconds = time.perf_counter() - started
    for name, report, seconds in (("folder: 70,000 PNGs, perceptual hash", in_folder, folder_seconds),
                                  (f"gallery v3: {in_bundle.scanned} items, hash + embedding", in_bundle, bundle_seconds)):
        counts = report.counts()
        dup_rows.append({"scan": name, "seconds": f"{seconds:.1f}", "images/s": round(counts["scanned"] / seconds),
                         "exact pairs": counts["exact_pairs"], "near pairs": counts["near_pairs"],
                         "groups": counts["groups"], "images in groups": counts["images_in_groups"]})
    print(table(rows, ["step", "images", "seconds", "vs extract", "recall@10"]))
    print(f"\nadd vs the gallery part of extract alone (embedding {int(run.data.metrics['gallery_size'])} images + "
          f"index build, {gallery_seconds:.1f} s): {add_seconds / gallery_seconds:.3f}; split of 70,000 images: "
          f"{split_seconds:.0f} s\n")
    print(table(dup_rows, ["scan", "seconds", "images/s", "exact pairs", "near pairs", "groups", "images in groups"]))
    path = save("gallery", {"rows": rows, "duplicates": dup_rows, "extract_gallery_seconds": round(gallery_seconds, 1),
                            "split_seconds": round(split_seconds, 1), "held_back": HELD_BACK,
                            "defaults": {"hash_distance": duplicates.DEFAULT_HASH_DISTANCE,
                                         "embedding_distance": duplicates.DEFAULT_EMBEDDING_DISTANCE},
                            "extract": dataclasses.asdict(ExtractConfig())})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
