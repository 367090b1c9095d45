"""Bench 22: the colour default served in float32 and in int8 (``precision=int8``), side by side in one run on a
colour dev set (bench/colour_sets.py): retrieval quality of each, and the backbone's pace on each runtime.

python -m bench.int8 [--dataset oxygen]   -> bench/results/int8-<dataset>.json

One head-mode model is trained (every setting at its default); extract then runs twice on it, at ``precision=fp32``
(the default: the head on the features train kept) and at ``precision=int8`` (ONNX Runtime's static quantization,
calibrated on 256 gallery images, embeds the gallery and the queries). Speed, on the same decoded gallery images:
images per second as extract runs each path on all cores (torch fp32 channels-last backbone and the head, ONNX
Runtime fp32 backbone and the head, the int8 serving model), and one image's latency on one thread as a server
process runs the model (the fp32 export against the int8 model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import colour_sets
from bench.common import RESULTS, save, table
from imgsim import config as settings
from imgsim.nn.data import ImageFiles
from imgsim.nn.feature_store import head_outputs
from imgsim.nn.onnx_export import export_onnx
from imgsim.nn.trunk import Trunk
from imgsim.serve.runtime import OnnxModel
from imgsim.stages.extract import extract, quantized
from imgsim.stages.settings import ExtractConfig, TrainConfig
from imgsim.stages.train import train_model

SPEED_IMAGES, LATENCY_IMAGES, BATCH = 256, 100, 64
QUALITY = ["precision", "precision_at_1", "map_at_r", "served_precision_at_1", "index_recall_at_10", "extract_s",
           "int8_probe_cosine_mean", "int8_probe_cosine_min"]


def quality(dataset: str, work: Path) -> tuple[list[dict], object, object, object]:
    """Train once, then extract at each precision; rows of their metrics, and the model, manifest and config."""
    manifest = colour_sets.manifest(dataset)
    shutil.rmtree(work, ignore_errors=True)
    common = {"feature_store": str(work / "features")}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = settings.resolve(TrainConfig, None, {k: v for k, v in (common | {"checkpoint_dir": str(work),
                                                                           "register_name": ""}).items() if k in names})
    bundle = train_model(cfg, manifest).bundle
    rows = []
    for precision in ("fp32", "int8"):
        extract_cfg = settings.resolve(ExtractConfig, None, common | {"gallery_name": "", "precision": precision})
        started = time.perf_counter()
        m = extract(extract_cfg, bundle, manifest).metrics
        rows.append({"precision": precision, "extract_s": time.perf_counter() - started,
                     **{k: m[k] for k in QUALITY if k in m}})
    return rows, bundle, manifest, extract_cfg


def speed(bundle, manifest, cfg) -> tuple[list[dict], list[dict]]:
    """Images per second of each extraction path on all cores, and one image's latency on one thread; each path
    in a fresh process (torch's and ONNX Runtime's idle threads spin a while after their work and would slow the
    next path in the same process)."""
    gallery = [item for item in manifest.items if item.split == "train"]
    files = ImageFiles(gallery, manifest.root, bundle.preprocess)
    with tempfile.TemporaryDirectory(prefix="imgsim-bench-int8-") as tmp:
        work = Path(tmp)
        images = np.stack([files.read(i) for i in range(min(SPEED_IMAGES, len(gallery)))])
        np.save(work / "images.npy", images)
        bundle.save(work / "model")
        export_onnx(bundle, work / "fp32.onnx", images[:32])
        (work / "int8.onnx").write_bytes(quantized(cfg, bundle, manifest).onnx)
        rates = [child("rate", path, work) for path in PATHS]
        latency = [child("latency", model, work) for model in ("fp32", "int8")]
    for rows, key in ((rates, "images_per_second"), (latency, "p50_ms")):
        for row in rows:
            row["ratio"] = row[key] / rows[0][key]
    return rates, latency


PATHS = ("torch fp32 (backbone) + head", "onnxruntime fp32 (backbone) + head", "onnxruntime int8 (serving model)")


def child(kind: str, name: str, work: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.int8", "--child", kind, name, str(work)], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(kind: str, name: str, work: Path) -> dict:
    """One path's images per second (extract's way, BATCH images a call, all cores), or one model's latency."""
    from imgsim.nn.model import TrainedModel

    images, bundle = np.load(work / "images.npy"), TrainedModel.load(work / "model")
    if kind == "latency":
        engine = OnnxModel(work / f"{name}.onnx", bundle.preprocess, 1)
        engine(images[:1])
        times = []
        for i in range(LATENCY_IMAGES):
            started = time.perf_counter()
            engine(images[i % len(images)][None])
            times.append((time.perf_counter() - started) * 1000)
        return {"model": name, "p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}
    model, threads = bundle.build().eval(), torch.get_num_threads()
    if name == PATHS[2]:  # the int8 serving model whole; the others a backbone runtime then the head
        run = OnnxModel(work / "int8.onnx", bundle.preprocess, threads)
    else:
        trunk = Trunk(model, "onnxruntime" if name == PATHS[1] else "torch", threads)
        run = lambda x: head_outputs(model, trunk(x))  # noqa: E731
    run(images[:BATCH])  # warm: the export, arenas, the channels-last copy
    started = time.perf_counter()
    for i in range(0, len(images), BATCH):
        run(images[i:i + BATCH])
    return {"path": name, "images_per_second": len(images) / (time.perf_counter() - started)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="oxygen", choices=sorted(colour_sets.SOURCES))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], Path(args.child[2]))))
        return
    rows, bundle, manifest, cfg = quality(args.dataset, RESULTS / "checkpoints" / f"int8-{args.dataset}")
    for row in rows:
        row["d_p@1"], row["d_map_at_r"] = (row["precision_at_1"] - rows[0]["precision_at_1"],
                                            row["map_at_r"] - rows[0]["map_at_r"])
    rates, latency = speed(bundle, manifest, cfg)
    save(f"int8-{args.dataset}", {"dataset": args.dataset, "images": len(manifest.items), "rows": rows,
                                  "extraction": rates, "latency": latency})
    print(table(rows, [*QUALITY[:5], "d_p@1", "d_map_at_r", *QUALITY[5:]]))
    print(table(rates, ["path", "images_per_second", "ratio"]))
    print(table(latency, ["model", "p50_ms", "p99_ms", "ratio"]))


if __name__ == "__main__":
    main()
