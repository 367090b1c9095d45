"""Bench 20: the colour default's train and extract stages as they were and with no image embedded twice, side by
side in one run on a colour dev set (bench/colour_sets.py), every setting at its default but the two compared:

- ``torch-no-store``: eager torch runs the backbone, nothing is kept: train embeds, extract embeds again;
- ``onnxruntime-no-store``: ONNX Runtime runs the backbone, nothing is kept (extraction's images per second);
- ``torch-store``, the default, and ``onnxruntime-store``: extract reuses the features train kept and embeds only
  the images train never saw (the test split's queries).

python -m bench.reuse [--dataset oxygen] [--before REV] [--tag T]   -> bench/results/reuse-<dataset>[T].json

``--before REV`` adds a first row: the same measurement on commit REV's code (a git worktree, this environment), how
the stages ran before this bench existed, with extract's batch at BEFORE_BATCH.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench import colour_sets
from bench.common import RESULTS, save, table

VARIANTS = {"torch-no-store": ("torch", False), "onnxruntime-no-store": ("onnxruntime", False),
            "onnxruntime-store": ("onnxruntime", True), "torch-store": ("torch", True)}
# The earlier code embedded extract's default batch of 512 images in one torch pass, which at 224 px took a process
# past 18 GB and was killed here; 64 runs at the same speed within the machine.
BEFORE_BATCH = 64
COLUMNS = ["variant", "train_s", "extract_s", "total_s", "gallery_embedded", "extract_img_s", "precision_at_1",
           "served_precision_at_1", "map_at_r", "index_recall_at_10"]


def measure(dataset: str, variant: str, runtime: str, keep: bool, work, extract_settings: dict | None = None) -> dict:
    """Train then extract at the defaults but ``runtime`` and the store; only what this code's settings declare
    is set, so the same function measures an earlier commit (``--before``)."""
    import dataclasses
    import shutil
    import time

    from bench import colour_sets
    from imgsim import config as settings
    from imgsim.stages.extract import extract
    from imgsim.stages.settings import ExtractConfig, TrainConfig
    from imgsim.stages.train import train_model

    def resolve(cls, values):
        names = {f.name for f in dataclasses.fields(cls)}
        return settings.resolve(cls, None, {k: v for k, v in values.items() if k in names})

    manifest = colour_sets.manifest(dataset)
    shutil.rmtree(work, ignore_errors=True)  # nothing cached from an earlier run: both stages from scratch
    common = {"backbone_runtime": runtime, "feature_store": str(work / "features") if keep else ""}
    cfg = resolve(TrainConfig, common | {"checkpoint_dir": str(work), "register_name": ""})
    started = time.perf_counter()
    bundle = train_model(cfg, manifest).bundle
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    result = extract(resolve(ExtractConfig, common | {"gallery_name": ""} | (extract_settings or {})), bundle, manifest)
    extract_s = time.perf_counter() - started
    m = result.metrics
    embedded = m.get("gallery_images_through_backbone", m["gallery_size"])
    return {"variant": variant, "train_s": train_s, "extract_s": extract_s, "total_s": train_s + extract_s,
            "gallery_embedded": int(embedded), "gallery_size": int(m["gallery_size"]),
            # images through the backbone per second of extract's embedding (none where train's were all reused)
            "extract_img_s": embedded / (m["gallery_size"] / m["embed_images_per_second"]) if embedded else None,
            **{k: m[k] for k in ("precision_at_1", "map_at_r", "served_precision_at_1", "index_recall_at_10")
               if k in m}}


def measure_at(rev: str, dataset: str) -> dict:
    """``measure`` on commit ``rev``'s code: a detached worktree, this interpreter, torch and no store."""
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="imgsim-before-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "-q", str(tree), rev], check=True)
        try:
            (tree / "data").symlink_to(repo / "data")  # the dev sets, built once
            script = inspect.getsource(measure) + (
                "\nimport json, pathlib\n"
                f"print('ROW ' + json.dumps(measure({dataset!r}, {rev + ' (before)'!r}, 'torch', False, "
                f"pathlib.Path({str(Path(tmp) / 'work')!r}), {{'embed_batch_size': {BEFORE_BATCH}}})))\n")
            out = subprocess.run([sys.executable, "-c", script], cwd=tree, check=True, text=True,
                                 stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(tree)}).stdout
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], check=False)
    return json.loads(next(line[4:] for line in out.splitlines() if line.startswith("ROW ")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=list(colour_sets.SOURCES), default="oxygen")
    parser.add_argument("--variants", default="torch-no-store,onnxruntime-no-store,torch-store",
                        help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--tag", default="", help="suffix of the result file (another comparison)")
    parser.add_argument("--before", default="", help="also measure this commit's code (e.g. the last one before "
                        "feature reuse)")
    args = parser.parse_args()
    rows = [measure_at(args.before, args.dataset)] if args.before else []
    if rows:
        print(table(rows, COLUMNS), flush=True)
    for variant in args.variants.split(","):
        runtime, keep = VARIANTS[variant]
        rows.append(measure(args.dataset, variant, runtime, keep,
                            RESULTS / "checkpoints" / f"reuse-{args.dataset}-{variant}"))
        print(table(rows[-1:], COLUMNS), flush=True)
    manifest = colour_sets.manifest(args.dataset)
    print(f"\n{args.dataset}: {len(manifest.items)} images, {len(manifest.classes)} classes; "
          f"{torch.get_num_threads()} threads")
    print(table(rows, COLUMNS))
    print(f"wrote {save(f'reuse-{args.dataset}{args.tag}', {'dataset': args.dataset, 'images': len(manifest.items), 'before': args.before, 'rows': rows})}")


if __name__ == "__main__":
    main()
