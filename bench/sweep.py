"""Recipe sweep: train the colour dev sets with one setting changed at a time from a base, side by side.

python -m bench.sweep [--datasets tuxpaint oxygen] [--variants base arcface ...]   -> bench/results/sweep.json

Used to choose the colour defaults (imgsim/nn/recipe.py, TrainConfig); each row is a full train + retrieval
evaluation (test queries against the train + eval gallery), so compare rows within one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from bench.colour_sets import manifest as colour_manifest
from bench.common import RESULTS, save, table
from imgsim import config as settings
from imgsim.metrics import retrieval_metrics
from imgsim.nn.data import ImageFiles, label_ids
from imgsim.nn.embed import embed_dataset
from imgsim.stages.settings import TrainConfig
from imgsim.stages.train import train_model

BASE = {"epochs": 40, "batch_size": 32, "lr": 0.1, "image_size": 32}
VARIANTS = {
    "base": {},
    "arcface": {"head": "arcface"},
    "linear-head": {"head": "linear"},
    "size48": {"image_size": 48},
    "size64": {"image_size": 64},
    "4-stages": {"widths": "32,64,128,256", "depths": "1,1,1,1"},
    "wider": {"widths": "64,128,256"},
    "crop0.6": {"crop_scale": 0.6},
    "no-jitter": {"color_jitter": 0.0},
    "shift-aug": {"augment": "shift"},
    "lr0.2": {"lr": 0.2},
    "lr0.05": {"lr": 0.05},
    "batch64": {"batch_size": 64},
    "epochs80": {"epochs": 80},
    "epochs20": {"epochs": 20},
    "no-smoothing": {"label_smoothing": 0.0},
    "emb256": {"embedding_dim": 256},
    "select-acc": {"select_metric": "accuracy"},
}


def run(dataset: str, name: str, overrides: dict) -> dict:
    manifest = colour_manifest(dataset)
    cfg = settings.resolve(TrainConfig, None, BASE | overrides | {
        "checkpoint_dir": str(RESULTS / "checkpoints" / f"sweep-{dataset}-{name}"), "register_name": ""})
    started = time.perf_counter()
    bundle = train_model(cfg, manifest).bundle
    seconds = time.perf_counter() - started
    model = bundle.build()
    gallery_items = [i for i in manifest.items if i.split in ("train", "eval")]
    query_items = manifest.split("test")
    gallery, _ = embed_dataset(model, ImageFiles(gallery_items, manifest.root, bundle.preprocess), 256, "gallery")
    queries, _ = embed_dataset(model, ImageFiles(query_items, manifest.root, bundle.preprocess), 256, "queries")
    metrics = retrieval_metrics(queries, label_ids(query_items, manifest.classes), gallery,
                                label_ids(gallery_items, manifest.classes))
    return {"dataset": dataset, "variant": name, **metrics, "train_seconds": seconds,
            "settings": dataclasses.asdict(cfg)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["tuxpaint", "oxygen"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--name", default="sweep")
    args = parser.parse_args()
    rows = []
    for name in args.variants:
        for dataset in args.datasets:
            rows.append(run(dataset, name, VARIANTS[name]))
            print(table(rows[-1:], ["dataset", "variant", "precision_at_1", "precision_at_10", "map_at_r",
                                    "train_seconds"]), flush=True)
            save(args.name, {"base": BASE, "rows": rows})
    print(table(rows, ["dataset", "variant", "precision_at_1", "precision_at_10", "map_at_r", "train_seconds"]))


if __name__ == "__main__":
    main()
