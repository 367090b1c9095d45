"""Bench 4: extract's images/second against the raw forward pass of the same model, in one run.

python -m bench.extraction
"""

from __future__ import annotations

import time

import torch

from bench.common import RESULTS, protocol_manifest, require, save, table
from imgsim.nn.data import load_items
from imgsim.nn.embed import embed_batches
from imgsim.nn.model import TrainedModel

N, BATCH, REPEATS = 10000, 512, 3


def best_rate(fn, n: int) -> float:
    """Images/second of the fastest of REPEATS runs (the least disturbed by other load)."""
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return n / min(times)


def main() -> None:
    require("model")
    bundle = TrainedModel.load(RESULTS / "model")
    model = bundle.build()
    manifest = protocol_manifest()
    items = manifest.split("train")[:N]
    started = time.perf_counter()
    images = load_items(items, manifest.root, bundle.preprocess, desc="bench: decoding")
    decode_rate = len(items) / (time.perf_counter() - started)
    batches = [torch.from_numpy(images[i:i + BATCH]).float().div_(255.0) for i in range(0, N, BATCH)]

    def raw_forward():
        with torch.inference_mode():
            for batch in batches:
                model.embed(batch)

    raw = best_rate(raw_forward, N)
    extract = best_rate(lambda: embed_batches(model, images, BATCH, "bench: extract")[0], N)
    rows = [{"path": "raw forward (model.embed on prepared float batches)", "images_per_second": raw, "ratio": 1.0},
            {"path": "extract (uint8 array -> embeddings, as the extract stage runs)", "images_per_second": extract,
             "ratio": extract / raw},
            {"path": "decode + preprocess from PNG files (load_items, once)", "images_per_second": decode_rate,
             "ratio": decode_rate / raw}]
    print(f"{N} Fashion-MNIST images, batch {BATCH}, {torch.get_num_threads()} torch threads, best of {REPEATS}")
    print(table(rows, ["path", "images_per_second", "ratio"]))
    print(f"wrote {save('extraction', {'images': N, 'batch': BATCH, 'rows': rows})}")


if __name__ == "__main__":
    main()
