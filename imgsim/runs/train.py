"""The train stage as a tracked run: metrics per epoch, the logged (and registered) PyTorch model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch

from imgsim import config, plots
from imgsim.manifest import Manifest
from imgsim.modelspec import MODEL_JSON, WEIGHTS
from imgsim.nn import distributed
from imgsim.nn.model import TrainedModel
from imgsim.runs import tracking
from imgsim.runs.common import log_params
from imgsim.stages.settings import TrainConfig
from imgsim.stages.plan import plan
from imgsim.stages.train import embed_only, read_checkpoint, resumes, train_model


def run_train(cfg: TrainConfig) -> tuple[str, str]:
    """Train, log metrics per epoch and the best model; returns (run id, model URI). Rank 0 only logs."""
    distributed.init()
    if distributed.is_main():  # one process creates the store; concurrent schema migrations would collide
        tracking.setup()
    distributed.barrier()
    if not distributed.is_main():
        tracking.setup()
    with tracking.fetched(cfg.manifest_uri, "manifest") as folder:
        manifest = Manifest.load(folder)
    resolved = plan(cfg, manifest)  # every auto setting chosen once: what trains, and what is logged
    if not distributed.is_main():
        if resolved.mode == "full":  # head and none run on rank 0 alone: there is nothing worth sharding
            train_model(resolved, manifest)
        distributed.shutdown()
        return "", ""
    previous = read_checkpoint(resolved) if resumes(resolved) else None
    run_id = previous.get("mlflow_run_id") if previous else None
    with mlflow.start_run(run_id=run_id, run_name=cfg.run_name or "train", nested=mlflow.active_run() is not None) as run:
        mlflow.set_tag("imgsim.stage", "train")
        mlflow.set_tag("imgsim.manifest_uri", cfg.manifest_uri)
        if run_id is None:
            log_params(config.to_params(resolved) | {"world_size": str(distributed.world())})
            mlflow.log_dict({"given": config.to_params(cfg), "resolved": config.to_params(resolved)}, "train_plan.json")
        if resolved.mode == "none":  # an unlabelled folder, or asked for: the pretrained backbone as is
            bundle, history = embed_only(resolved, manifest), []
            mlflow.set_tag("imgsim.embed_only", "true")
        else:
            result = train_model(resolved, manifest, on_epoch=lambda epoch, m: mlflow.log_metrics(m, step=epoch),
                                 extra_state={"mlflow_run_id": run.info.run_id})
            bundle, history = result.bundle, result.history
        bundle.config["manifest_uri"] = cfg.manifest_uri
        model_uri = _log_model(bundle, cfg.register_name)
        best = _best(history)
        if history:
            with tempfile.TemporaryDirectory() as tmp:
                mlflow.log_artifact(str(plots.training_curves(history, Path(tmp) / "training_curves.png")), "plots")
            mlflow.log_metrics(best)
    distributed.shutdown()
    print(f"train: {', '.join(f'{k} {v:.4f}' for k, v in best.items()) or 'embed-only (no training)'}; model {model_uri}")
    return run.info.run_id, model_uri


def _best(history: list[dict]) -> dict[str, float]:
    """The best eval figures over the epochs, as headline metrics."""
    keys = ("eval_accuracy", "eval_map_at_r")
    return {f"best_{k}": max(h[k] for h in history) for k in keys if history and k in history[0]}


def _log_model(bundle: TrainedModel, register_name: str) -> str:
    """Log the MLflow pytorch model with our bundle files alongside; register it when a name is set."""
    model = bundle.build()
    p = bundle.preprocess
    example = np.zeros((1, p.channels, p.size, p.size), dtype=np.float32)
    with torch.inference_mode():
        signature = mlflow.models.infer_signature(example, model(torch.from_numpy(example)).numpy())
    with tempfile.TemporaryDirectory() as tmp:
        bundle.save(tmp)
        info = mlflow.pytorch.log_model(
            model, name="model", signature=signature, input_example=example,
            registered_model_name=register_name or None,
            extra_files=[str(Path(tmp) / MODEL_JSON), str(Path(tmp) / WEIGHTS)],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    if register_name and info.registered_model_version:
        return f"models:/{register_name}/{info.registered_model_version}"
    return info.model_uri
