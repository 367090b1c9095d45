"""`main`: split -> train -> extract as nested runs, each step reading the previous step's artifact URI."""

from __future__ import annotations

import dataclasses

import mlflow

from imgsim.runs import tracking
from imgsim.runs.export import BUNDLE_ARTIFACT
from imgsim.runs.extract import run_extract
from imgsim.runs.split import run_split
from imgsim.runs.train import run_train
from imgsim.split import SplitConfig
from imgsim.stages.settings import ExtractConfig, TrainConfig


def run_main(split_cfg: SplitConfig, train_cfg: TrainConfig, extract_cfg: ExtractConfig) -> dict[str, str]:
    """split -> train -> extract as nested runs, each step reading the previous step's artifact URI."""
    tracking.setup()
    with mlflow.start_run(run_name="main") as parent:
        mlflow.set_tag("imgsim.stage", "main")
        split_id = run_split(split_cfg)
        train_id, model_uri = run_train(dataclasses.replace(train_cfg, manifest_uri=f"runs:/{split_id}/split"))
        extract_id = run_extract(dataclasses.replace(extract_cfg, model_uri=model_uri,
                                                     manifest_uri=f"runs:/{split_id}/split"))
        train_metrics = mlflow.get_run(train_id).data.metrics
        metrics = mlflow.get_run(extract_id).data.metrics | {k: v for k, v in train_metrics.items() if k.startswith("best_")}
        mlflow.log_metrics(metrics)  # the parent run shows the headline figures
        return {"main": parent.info.run_id, "split": split_id, "train": train_id, "extract": extract_id,
                "model_uri": model_uri, "bundle_uri": f"runs:/{extract_id}/{BUNDLE_ARTIFACT}",
                "metrics": {k: round(v, 4) for k, v in sorted(metrics.items())}}
