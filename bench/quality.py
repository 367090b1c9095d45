"""Bench 1: retrieval quality with baselines: Fashion-MNIST (10k test queries vs the 60k train gallery) and
the colour dev sets (bench/colour_sets.py: test queries vs the train + eval gallery), each with the defaults.

python -m bench.quality [--dataset fashion-mnist|tuxpaint|oxygen] [--epochs N] [--config demo] [--set key=value ...]
  -> bench/results/quality[-<dataset>][-demo].json, a table, PNG plots
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from bench import colour_sets
from bench.baselines import pixel_embeddings, untrained_model
from bench.common import RESULTS, protocol_manifest, save, table
from imgsim import config as settings
from imgsim import plots
from imgsim.metrics import mean_average_precision, retrieval_metrics
from imgsim.nn.data import label_ids, load_items
from imgsim.nn.embed import embed_batches
from imgsim.stages.settings import TrainConfig
from imgsim.stages.train import train_model

CONFIGS = {"default": TrainConfig(), "demo": TrainConfig(epochs=4)}
PIXEL_SIZE = 64  # the comparison: cosine similarity on raw 64 x 64 pixels


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["fashion-mnist", *colour_sets.SOURCES], default="fashion-mnist")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="default")
    parser.add_argument("--epochs", type=int, help="override the config's epochs")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other TrainConfig settings")
    parser.add_argument("--tag", default="", help="suffix for the result file (to compare settings)")
    args = parser.parse_args()
    cfg = CONFIGS[args.config]
    overrides = dict(kv.split("=", 1) for kv in args.set)
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
