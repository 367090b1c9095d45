"""Bench 1: retrieval quality with baselines: Fashion-MNIST (10k test queries vs the 60k train gallery) and
the colour dev sets (bench/colour_sets.py: test queries vs the train + eval gallery).

python -m bench.quality [--epochs N] [--config demo] [--set key=value ...]
  -> bench/results/quality[-demo].json, a table, PNG plots (Fashion-MNIST, the default config)
python -m bench.quality --dataset tuxpaint|oxygen|wesnoth [--routes pixels,features,scratch,head,full,default]
  -> bench/results/quality-<dataset>.json: the training routes side by side, one run (P@1, P@10, mAP@R,
     training time, embedding throughput at the model's input size)
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from bench import colour_sets
from bench.baselines import pixel_embeddings, untrained_model
from bench.common import RESULTS, protocol_manifest, save, table
from imgsim import config as settings
from imgsim import plots
from imgsim.images import Preprocess
from imgsim.metrics import mean_average_precision, retrieval_metrics
from imgsim.nn.data import label_ids, load_items
from imgsim.nn.embed import embed_batches
from imgsim.stages.settings import TrainConfig
from imgsim.stages.train import train_model

CONFIGS = {"default": TrainConfig(), "demo": TrainConfig(epochs=4)}
PIXEL_SIZE = 64  # the comparison: cosine similarity on raw 64 x 64 pixels
PRETRAINED = {"backbone": "efficientnet_lite0", "weights": "DEFAULT"}
# The colour routes compared: settings over TrainConfig's defaults. "default" is whatever auto picks.
ROUTES = {"features": PRETRAINED | {"mode": "none"},
          "scratch": {"backbone": "resnet_small", "weights": "none", "mode": "full"},
          "head": PRETRAINED | {"mode": "head"},
          # Full fine-tuning at a size and length that fit the 15-minute budget on 2 cores.
          "full": PRETRAINED | {"mode": "full", "image_size": 128, "epochs": 4, "batch_size": 32, "lr": 0.02},
          "default": {}}


def evaluate(name: str, gallery, queries, g_labels, q_labels, logits=None) -> dict:
    row = {"embedding": name} | retrieval_metrics(queries, q_labels, gallery, g_labels)
    row["map_full"] = mean_average_precision(queries, q_labels, gallery, g_labels)
    row["accuracy"] = float((logits.argmax(1) == q_labels).mean()) if logits is not None else float("nan")
    return row


def _epoch_map(cfg, manifest, gallery_items, query_items, g_labels, q_labels, n_gallery=10000, n_queries=2000):
    """mAP@R after each epoch on a fixed sample (a few seconds), for the by-epoch plot."""
    rng = np.random.default_rng(0)
    g_pick, q_pick = rng.permutation(len(gallery_items))[:n_gallery], rng.permutation(len(query_items))[:n_queries]
    cache = {}

    def measure(model) -> dict:
        if "g" not in cache:  # only size and channels matter for loading; the model normalises
            pre = dataclasses.replace(model.preprocess)
            cache["g"] = load_items([gallery_items[i] for i in g_pick], manifest.root, pre, desc="bench: epoch sample")
            cache["q"] = load_items([query_items[i] for i in q_pick], manifest.root, pre, desc="bench: epoch sample")
        g, _ = embed_batches(model, cache["g"], 512, "bench: epoch gallery")
        q, _ = embed_batches(model, cache["q"], 512, "bench: epoch queries")
        return {"sample_map_at_r": retrieval_metrics(q, q_labels[q_pick], g, g_labels[g_pick])["map_at_r"]}

    return measure


def _plot_by_epoch(history: list[dict], out: Path) -> None:
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(epochs, [h["eval_accuracy"] for h in history], marker="o", label="eval accuracy")
    ax.plot(epochs, [h["sample_map_at_r"] for h in history], marker="s", label="mAP@R (2k queries, 10k gallery)")
    ax.set_xlabel("epoch"), ax.set_ylim(0, 1), ax.grid(alpha=0.3), ax.legend()
    ax.set_title("Fashion-MNIST: quality by epoch")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def compare(dataset: str, routes: list[str], overrides: dict, tag: str) -> None:
    """One run per dev set: each route trained and measured on the same split, side by side."""
    manifest = colour_sets.manifest(dataset)
    root = manifest.root
    gallery_items = [i for i in manifest.items if i.split in ("train", "eval")]
    query_items = manifest.split("test")
    g_labels, q_labels = label_ids(gallery_items, manifest.classes), label_ids(query_items, manifest.classes)
    rows = []
    for route in routes:
        if route == "pixels":
            pixels = Preprocess(size=PIXEL_SIZE, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
            rows.append(evaluate(f"raw pixels ({PIXEL_SIZE} px)", pixel_embeddings(load_items(gallery_items, root, pixels)),
                                 pixel_embeddings(load_items(query_items, root, pixels)), g_labels, q_labels))
            continue
        cfg = settings.resolve(TrainConfig, None, ROUTES[route] | overrides | {
            "checkpoint_dir": str(RESULTS / "checkpoints" / f"{dataset}-{route}{tag}"), "register_name": "",
            "feature_store": str(RESULTS / "checkpoints" / f"{dataset}-{route}{tag}" / "features")})
        shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)  # no cached features: training time from scratch
        started = time.perf_counter()
        result = train_model(cfg, manifest)
        train_seconds = time.perf_counter() - started
        bundle = result.bundle
        model = bundle.build()
        g_x = load_items(gallery_items, root, bundle.preprocess, desc="bench: gallery")
        q_x = load_items(query_items, root, bundle.preprocess, desc="bench: queries")
        started = time.perf_counter()
        gallery, _ = embed_batches(model, g_x, 64, "bench: embedding gallery")
        rate = len(g_x) / (time.perf_counter() - started)
        queries, logits = embed_batches(model, q_x, 64, "bench: embedding queries")
        used = bundle.config  # the route train_model resolved
        name = f"{route}: {used['backbone']}, {used['mode']}"
        name += ", stages" if used.get("feature_levels") == "stages" else ""
        name += f", {len(result.history)} epochs" if result.history else ""
        rows.append(evaluate(name, gallery, queries, g_labels, q_labels, logits if logits.shape[1] else None) |
                    {"train_min": train_seconds / 60, "embed_img_s": rate, "size_px": bundle.preprocess.size})
        print(table(rows[-1:], COLUMNS), flush=True)
    print(f"\n{dataset}: {len(query_items)} queries, {len(gallery_items)} gallery images, {len(manifest.classes)} "
          f"classes; {torch.get_num_threads()} threads")
    print(table(rows, COLUMNS))
    path = save(f"quality-{dataset}{tag}", {"dataset": dataset, "routes": {r: ROUTES.get(r) for r in routes},
                                             "overrides": overrides, "rows": rows})
    print(f"wrote {path}")


COLUMNS = ["embedding", "precision_at_1", "precision_at_10", "map_at_r", "accuracy", "train_min", "embed_img_s",
           "size_px"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["fashion-mnist", *colour_sets.SOURCES], default="fashion-mnist")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="default")
    parser.add_argument("--epochs", type=int, help="override the config's epochs")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other TrainConfig settings")
    parser.add_argument("--tag", default="", help="suffix for the result file (to compare settings)")
    parser.add_argument("--routes", default="pixels,features,scratch,head,full",
                        help=f"colour dev sets: comma-separated, of pixels, {', '.join(ROUTES)}")
    args = parser.parse_args()
    cfg = CONFIGS[args.config]
    overrides = dict(kv.split("=", 1) for kv in args.set)
    if args.dataset != "fashion-mnist":
        return compare(args.dataset, args.routes.split(","), overrides | ({"epochs": args.epochs} if args.epochs else {}),
                       f"-{args.tag}" if args.tag else "")
    cfg = settings.resolve(TrainConfig, None, dataclasses.asdict(cfg) | {"epochs": args.epochs or cfg.epochs} |
                           overrides | {"checkpoint_dir": str(RESULTS / "checkpoints" / f"{args.dataset}{args.tag}"),
                                        "register_name": ""})
    colour = args.dataset != "fashion-mnist"
    manifest = colour_sets.manifest(args.dataset) if colour else protocol_manifest()
    root = manifest.root
    gallery_items = [i for i in manifest.items if i.split in ("train", "eval")]
    query_items = manifest.split("test")
    g_labels, q_labels = label_ids(gallery_items, manifest.classes), label_ids(query_items, manifest.classes)

    epoch_map = _epoch_map(cfg, manifest, gallery_items, query_items, g_labels, q_labels)
    started = time.perf_counter()
    result = train_model(cfg, manifest, epoch_metrics=epoch_map)
    train_seconds = time.perf_counter() - started
    bundle = result.bundle
    model = bundle.build()
    g_x = load_items(gallery_items, root, bundle.preprocess, desc="bench: gallery")
    q_x = load_items(query_items, root, bundle.preprocess, desc="bench: queries")
    gallery, _ = embed_batches(model, g_x, 512, "bench: embedding gallery")
    queries, logits = embed_batches(model, q_x, 512, "bench: embedding queries")
    untrained = untrained_model(bundle.args, bundle.preprocess)
    u_gallery, _ = embed_batches(untrained, g_x, 512, "bench: untrained gallery")
    u_queries, _ = embed_batches(untrained, q_x, 512, "bench: untrained queries")
    rows = [evaluate(f"trained ({args.config}, {len(result.history)} epochs)", gallery, queries, g_labels, q_labels, logits),
            evaluate("untrained network", u_gallery, u_queries, g_labels, q_labels),
            evaluate(f"raw pixels ({bundle.preprocess.size} px)", pixel_embeddings(g_x), pixel_embeddings(q_x),
                     g_labels, q_labels)]
    if colour:  # also at 64 x 64, the size a user would compare with
        pixels = dataclasses.replace(bundle.preprocess, size=PIXEL_SIZE, resize=0)
        rows.append(evaluate(f"raw pixels ({PIXEL_SIZE} px)", pixel_embeddings(load_items(gallery_items, root, pixels)),
                             pixel_embeddings(load_items(query_items, root, pixels)), g_labels, q_labels))
    suffix = ("" if not colour else f"-{args.dataset}") + ("" if args.config == "default" else f"-{args.config}") + \
        (f"-{args.tag}" if args.tag else "")
    print(table(rows, ["embedding", "accuracy", "precision_at_1", "precision_at_10", "map_at_r", "map_full"]))
    print(f"training: {train_seconds / 60:.1f} min wall for {len(result.history)} epochs on {torch.get_num_threads()} threads")
    plots.training_curves(result.history, RESULTS / f"training_curves{suffix}.png")
    _plot_by_epoch(result.history, RESULTS / f"accuracy_map_by_epoch{suffix}.png")
    if args.config == "default" and not colour and not args.tag:  # the index bench reuses these
        np.save(RESULTS / "gallery_embeddings.npy", gallery)
        np.save(RESULTS / "query_embeddings.npy", queries)
        bundle.save(RESULTS / "model")
    path = save(f"quality{suffix}", {"dataset": args.dataset, "config": dataclasses.asdict(cfg),
                                     "preprocess": dataclasses.asdict(bundle.preprocess), "train_seconds": train_seconds,
                                     "history": result.history, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
