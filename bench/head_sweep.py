"""Head-mode settings side by side on a colour dev set: each variant trained through the real trainer on the
cached backbone features (seconds per run once cached), the test images ranked against train + eval, over
several seeds. How the head's defaults (kept features, label smoothing, ...) were chosen: docs/benchmarks.md
section 6.

python -m bench.head_sweep --dataset oxygen --seeds 42,1 --variant default: \
    --variant smooth0.3:label_smoothing=0.3 --variant keep0:keep_features=0
  -> a table (P@1 and mAP@R per seed and their mean) and bench/results/head-sweep-<dataset>.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench import colour_sets
from bench.common import RESULTS, save, table
from imgsim import config as settings
from imgsim.metrics import retrieval_metrics
from imgsim.nn.data import label_ids
from imgsim.nn.feature_store import head_outputs, item_features, open_store
from imgsim.nn.trunk import Trunk
from imgsim.stages.settings import TrainConfig
from imgsim.stages.train import train_model

PRETRAINED_HEAD = {"backbone": "efficientnet_lite0", "weights": "DEFAULT", "mode": "head", "register_name": ""}


def variant(text: str) -> tuple[str, dict]:
    """``name:key=value,key=value`` (an empty list: the defaults)."""
    name, _, pairs = text.partition(":")
    return name, dict(pair.split("=", 1) for pair in pairs.split(",") if pair)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=colour_sets.SOURCES, required=True)
    parser.add_argument("--seeds", default="42,1", help="comma-separated training seeds")
    parser.add_argument("--variant", action="append", type=variant, default=[], metavar="NAME:KEY=VALUE,...",
                        help="TrainConfig settings over head mode's defaults; repeat for each variant")
    args = parser.parse_args()
    manifest = colour_sets.manifest(args.dataset)
    gallery_items = [i for i in manifest.items if i.split in ("train", "eval")]
    query_items = manifest.split("test")
    g_labels, q_labels = label_ids(gallery_items, manifest.classes), label_ids(query_items, manifest.classes)
    checkpoints = RESULTS / "checkpoints" / f"{args.dataset}-head-sweep"  # its cache serves every variant and seed
    rows = []
    for name, overrides in args.variant or [("default", {})]:
        scores = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            cfg = settings.resolve(TrainConfig, None, PRETRAINED_HEAD | overrides | {
                "seed": seed, "checkpoint_dir": str(checkpoints)})
            started = time.perf_counter()
            bundle = train_model(cfg, manifest).bundle
            seconds = time.perf_counter() - started
            model = bundle.build().eval()
            trunk, store = Trunk(model), open_store(checkpoints / "features", model)

            def features(items, what: str):
                return head_outputs(model, item_features(items, manifest.root, bundle.preprocess, trunk, store,
                                                         workers=0, desc=f"bench: {what}")[0])[0]

            gallery, queries = features(gallery_items, "gallery"), features(query_items, "queries")
            metrics = retrieval_metrics(queries, q_labels, gallery, g_labels)
            scores.append((metrics["precision_at_1"], metrics["map_at_r"]))
            rows.append({"variant": name, "seed": seed, "precision_at_1": scores[-1][0], "map_at_r": scores[-1][1],
                         "dim": gallery.shape[1], "train_s": seconds})
            print(table(rows[-1:], COLUMNS), flush=True)
        mean = np.mean(scores, axis=0)
        rows.append({"variant": name, "seed": "mean", "precision_at_1": float(mean[0]), "map_at_r": float(mean[1])})
    print(f"\n{args.dataset}: {len(query_items)} queries, {len(gallery_items)} gallery images; "
          f"{torch.get_num_threads()} threads")
    print(table(rows, COLUMNS))
    path = save(f"head-sweep-{args.dataset}", {"dataset": args.dataset, "variants": dict(args.variant), "rows": rows})
    print(f"wrote {path}")


COLUMNS = ["variant", "seed", "precision_at_1", "map_at_r", "dim", "train_s"]

if __name__ == "__main__":
    main()
