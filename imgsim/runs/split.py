"""The split stage as a tracked run: the manifest and its report as artifacts."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow

from imgsim import config
from imgsim.runs import tracking
from imgsim.runs.common import log_params, start
from imgsim.split import SplitConfig, split_dataset


def run_split(cfg: SplitConfig) -> str:
    """Split and log the manifest under ``split/``; returns the run id."""
    tracking.setup()
    with start("split") as run:
        mlflow.set_tag("imgsim.stage", "split")
        log_params(config.to_params(cfg))
        manifest = split_dataset(cfg)
        summary = manifest.summary()
        mlflow.log_metrics({f"{split}_items": n for split, n in summary["totals"].items()} |
                           {"rejected_items": summary["rejected"], "classes": summary["classes"]})
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifacts(str(manifest.save(Path(tmp) / "split")), "split")
        print(f"split: {summary['totals']} across {summary['classes']} classes, {summary['rejected']} rejected")
        for rejected in manifest.rejected[:20]:
            print(f"  rejected {rejected.path}: {rejected.reason}")
        return run.info.run_id
