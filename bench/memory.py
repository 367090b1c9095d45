"""Bench: peak memory of extract at N and 10 x N images, streamed (DataLoader) against decoding all into memory.

python -m bench.memory [--n 2000] [--size 96]   -> bench/results/memory.json

Generated JPEG copies (160 x 160, varied) stand in for a photo collection; an untrained resnet_small at
--size px embeds them. Each measurement runs in its own process: peak RSS of the main process and of the
largest decode worker (ru_maxrss), and the time taken.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import RESULTS, save, table

WORK = RESULTS / "memory-data"


def make_folder(n: int) -> Path:
    """``n`` JPEGs (an unlabelled folder), written once and reused."""
    root = WORK / f"photos-{n}"
    if (root / ".complete").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (16, 16, 3)).astype(np.uint8)
    for i in range(n):
        tile = np.roll(base, i % 16, axis=i % 2) ^ np.uint8(i % 251)
        Image.fromarray(np.kron(tile, np.ones((10, 10, 1), np.uint8))).save(root / f"{i:06d}.jpg", quality=90)
    (root / ".complete").write_text("")
    return root


def child(mode: str, root: str, size: int) -> None:
    """One measurement: the extract stage's streaming path, or every image decoded into one array first."""
    import torch

    from imgsim.images import Preprocess
    from imgsim.modelspec import ModelArgs
    from imgsim.nn.data import load_items
    from imgsim.nn.embed import embed_batches
    from imgsim.nn.model import EmbeddingNet, TrainedModel
    from imgsim.split import SplitConfig, split_dataset
    from imgsim.stages.extract import extract
    from imgsim.stages.settings import ExtractConfig

    torch.set_num_threads(1)
    manifest = split_dataset(SplitConfig(data_dir=root, labels="none"))
    pre = Preprocess(size=size, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    args = ModelArgs(num_classes=0, widths=(8, 16, 32), depths=(1, 1, 1), embedding_dim=64)
    bundle = TrainedModel(args, pre, [], EmbeddingNet(args, pre).state_dict())
    started = time.perf_counter()
    if mode == "streamed":
        extract(ExtractConfig(n_trees=10, workers=1, embed_batch_size=256), bundle, manifest)
    else:  # the path before the DataLoader: decode everything, then embed
        images = load_items(manifest.items, root, pre, workers=0)
        embed_batches(bundle.build(), images, 256, "embedding")
    seconds = time.perf_counter() - started
    main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": main_mb, "worker_peak_rss_mb": worker_mb, "seconds": seconds}))


def measure(mode: str, n: int, size: int) -> dict:
    root = make_folder(n)
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(root), "--size", str(size)],
                         capture_output=True, text=True, check=True)
    return {"path": mode, "images": n, **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.size)
    rows = [measure(mode, n, args.size) for n in (args.n, 10 * args.n) for mode in ("streamed", "in-memory")]
    for mode in ("streamed", "in-memory"):
        small, large = (r for r in rows if r["path"] == mode)
        large["growth_mb"] = large["peak_rss_mb"] - small["peak_rss_mb"]
    print(f"extract of generated 160 x 160 JPEGs at {args.size} px; peak RSS per process")
    print(table(rows, ["path", "images", "peak_rss_mb", "worker_peak_rss_mb", "growth_mb", "seconds"]))
    print(f"wrote {save('memory', {'size': args.size, 'rows': rows})}")


if __name__ == "__main__":
    main()
