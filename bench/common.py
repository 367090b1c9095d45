"""Shared bench helpers: the Fashion-MNIST protocol split, result files and plain-text tables."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from imgsim.fashion_mnist import prepare
from imgsim.manifest import Manifest
from imgsim.split import SplitConfig, split_dataset

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(os.environ.get("IMGSIM_BENCH_DATA", Path(__file__).resolve().parents[1] / "data" / "fashion-mnist"))


def protocol_manifest(eval_share: float = 0.05, seed: int = 42) -> Manifest:
    """The published protocol: queries are the 10k test images, the gallery the 60k train images.

    Training uses the train images minus a small eval share for model selection; the gallery keeps all 60k.
    """
    root = prepare(DATA)
    manifest = split_dataset(SplitConfig(data_dir=str(root), test_ratio=0.0, eval_ratio=eval_share, seed=seed))
    for i, item in enumerate(manifest.items):
        if Path(item.path).name.startswith("t10k-"):
            manifest.items[i] = type(item)(item.path, item.label, "test", item.sha256, item.width, item.height)
    return manifest


def require(*names: str) -> None:
    """Stop with one line naming the command that makes ``names`` (outputs of bench/quality.py) if any is missing."""
    missing = [n for n in names if not (RESULTS / n).exists()]
    if missing:
        raise SystemExit(f"bench/results/{missing[0]} is missing: run `python -m bench.quality` first "
                         "(it trains the default model, ~22 min on 2 cores, and saves its embeddings and model)")


def machine() -> dict:
    """What the figures were measured on."""
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    tmp.replace(path)
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub-flavoured markdown table, so the output pastes into the README as is."""
    def fmt(v):
        if v is None:  # a column that does not apply to this row
            return ""
        return f"{v:.4f}" if isinstance(v, float) and abs(v) < 10 else f"{v:,.1f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
