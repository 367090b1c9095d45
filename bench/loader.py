"""Bench: Fashion-MNIST throughput of the streaming data path against the in-memory path it replaced, in one run.

python -m bench.loader [--batches 80]   -> bench/results/loader.json

- train: optimizer steps of the default model (batch 128, shift augmentation) fed from the uint8 array in
  memory (before) and from the DataLoader over the decoded-image cache (now); interleaved, best of 3.
- extract: 10,000 PNG files to embeddings, decoding them all into memory first (before) and streamed through
  DataLoader workers (now).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import protocol_manifest, save, table
from imgsim.images import Preprocess
from imgsim.modelspec import ModelArgs
from imgsim.nn import augment
from imgsim.nn.data import ImageFiles, cache_images, label_ids, load_items, make_loader
from imgsim.nn.embed import embed_batches, embed_dataset
from imgsim.nn.model import EmbeddingNet

REPEATS, N_EXTRACT = 3, 10_000


def step(model, optimizer, images: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
    images = augment.shift_flip(images.float() / 255.0, seed)
    loss = F.cross_entropy(model(images, labels), labels, label_smoothing=0.1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def in_memory(x: np.ndarray, y: np.ndarray, order: np.ndarray, batch: int):
    """The loop before: index the whole decoded array."""
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        yield torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


def best(fn) -> float:
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=80)
    args = parser.parse_args()
    manifest = protocol_manifest()
    items = manifest.split("train")
    pre = Preprocess()
    labels = label_ids(items, manifest.classes)
    torch.manual_seed(0)
    model = EmbeddingNet(ModelArgs(num_classes=10), pre).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    order = np.random.default_rng(0).permutation(len(items))[:args.batches * 128]
    n_train = len(order)
    with tempfile.TemporaryDirectory() as tmp:
        x = load_items(items, manifest.root, pre, desc="bench: decoding into memory")
        cached = cache_images(ImageFiles(items, manifest.root, pre, labels=labels), tmp, desc="bench: cache")
        runs = {"before": lambda: [step(model, optimizer, a, b, i) for i, (a, b) in
                                   enumerate(in_memory(x, labels, order, 128))],
                "now": lambda: [step(model, optimizer, a, b, i) for i, (a, b) in
                                enumerate(make_loader(cached, 128, order=order.tolist()))]}
        train = {name: 0.0 for name in runs}
        for _ in range(REPEATS):  # interleaved so both see the same machine load
            for name, fn in runs.items():
                started = time.perf_counter()
                fn()
                train[name] = max(train[name], n_train / (time.perf_counter() - started))
    model.eval()
    sample = items[:N_EXTRACT]
    extract = {"before": N_EXTRACT / best(lambda: embed_batches(model, load_items(sample, manifest.root, pre), 512, "")),
               "now": N_EXTRACT / best(lambda: embed_dataset(model, ImageFiles(sample, manifest.root, pre), 512, ""))}
    rows = [{"stage": stage, "before_images_per_second": rates["before"], "now_images_per_second": rates["now"],
             "now_over_before": rates["now"] / rates["before"]} for stage, rates in (("train", train), ("extract", extract))]
    print(f"Fashion-MNIST, {torch.get_num_threads()} torch threads; train: {n_train} images per pass; "
          f"extract: {N_EXTRACT} PNG files; best of {REPEATS}")
    print(table(rows, ["stage", "before_images_per_second", "now_images_per_second", "now_over_before"]))
    print(f"wrote {save('loader', {'train_images': n_train, 'extract_images': N_EXTRACT, 'rows': rows, 'model': dataclasses.asdict(model.args)})}")


if __name__ == "__main__":
    main()
