"""Each stage as a tracked MLflow run that logs its artifact; ``main`` chains them by artifact URI."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch

from imgsim import config, distributed, plots, tracking
from imgsim.bundle import ServingBundle
from imgsim.export import BUNDLE_ARTIFACT
from imgsim.extract import ExtractConfig, extract
from imgsim.images import decode_image
from imgsim.manifest import Manifest
from imgsim.model import ModelBundle
from imgsim.modelspec import MODEL_JSON, WEIGHTS
from imgsim.split import SplitConfig, split_dataset
from imgsim.train import TrainConfig, embed_only, read_checkpoint, resolve_schedule, train_model


def _start(name: str):
    return mlflow.start_run(run_name=name, nested=mlflow.active_run() is not None)


def _log_params(params: dict[str, str]) -> None:
    """Log the resolved config, except keys `mlflow run` already logged as typed (e.g. "7.0" for 7):
    MLflow refuses to change a logged param, and the resolved values live in the artifacts too."""
    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})


def run_split(cfg: SplitConfig) -> str:
    """Split and log the manifest under ``split/``; returns the run id."""
    tracking.setup()
    with _start("split") as run:
        mlflow.set_tag("imgsim.stage", "split")
        _log_params(config.to_params(cfg))
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
    cfg = resolve_schedule(cfg, manifest)  # log the batch size, epochs and lr actually used, not "0 = auto"
    if not distributed.is_main():
        train_model(cfg, manifest)
        distributed.shutdown()
        return "", ""
    previous = read_checkpoint(cfg) if cfg.resume else None
    run_id = previous.get("mlflow_run_id") if previous else None
    with mlflow.start_run(run_id=run_id, run_name=cfg.run_name or "train", nested=mlflow.active_run() is not None) as run:
        mlflow.set_tag("imgsim.stage", "train")
        mlflow.set_tag("imgsim.manifest_uri", cfg.manifest_uri)
        if run_id is None:
            _log_params(config.to_params(cfg) | {"world_size": str(distributed.world())})
        if not manifest.classes:  # an unlabelled folder: the pretrained backbone as is
            bundle, history = embed_only(cfg, manifest), []
            mlflow.set_tag("imgsim.embed_only", "true")
        else:
            result = train_model(cfg, manifest, on_epoch=lambda epoch, m: mlflow.log_metrics(m, step=epoch),
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


def _log_model(bundle: ModelBundle, register_name: str) -> str:
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


def run_extract(cfg: ExtractConfig) -> str:
    """Embed, index, evaluate; log metrics, plots and the serving bundle under ``bundle/``; returns the run id."""
    tracking.setup()
    with _start("extract") as run:
        mlflow.set_tag("imgsim.stage", "extract")
        _log_params(config.to_params(cfg))
        with tracking.fetched(cfg.model_uri, "model") as folder:
            bundle = ModelBundle.load(folder)
        manifest_uri = cfg.manifest_uri or bundle.config.get("manifest_uri", "")
        with tracking.fetched(manifest_uri, "manifest") as folder:
            manifest = Manifest.load(folder)
        result = extract(cfg, bundle, manifest)
        ref = tracking.model_reference(cfg.model_uri)
        mlflow.set_tags({"imgsim.model_uri": cfg.model_uri, "imgsim.manifest_uri": manifest_uri} |
                        {f"imgsim.model_{k}": ref[k] for k in ("name", "version") if k in ref})
        mlflow.log_metrics(result.metrics)
        with tempfile.TemporaryDirectory() as tmp:
            serving = ServingBundle(bundle.spec, result.index, result.probes, ref, cfg.search_k,
                                    result.metrics.get("index_recall_at_10"), weights=bundle)
            mlflow.log_artifacts(str(serving.save(Path(tmp) / BUNDLE_ARTIFACT)), BUNDLE_ARTIFACT)
            mlflow.log_artifacts(str(_plot_extract(cfg, result, manifest, Path(tmp) / "plots")), "plots")
        print("extract: " + ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))
        return run.info.run_id


def _plot_extract(cfg: ExtractConfig, result, manifest: Manifest, out: Path) -> Path:
    root = Path(cfg.data_dir or manifest.root)
    # Without labelled queries (an unlabelled gallery) the pictures show gallery items and their neighbours.
    queries, query_items = (result.queries, result.query_items) if len(result.queries) else \
        (np.asarray(result.index.embeddings), result.index.items)
    if len(queries) >= 5:  # t-SNE needs a handful of points
        plots.embedding_map(queries, [i.label or "unlabelled" for i in query_items], out / "embeddings_tsne.png",
                            max_points=cfg.plot_points, seed=cfg.seed)
    rows = []
    for q in np.random.default_rng(cfg.seed).permutation(len(queries))[:8]:
        ids, dists = result.index.search(queries[q], 8, cfg.search_k)
        neighbours = [(_picture(root / result.index.items[i].path), result.index.items[i].label, d)
                      for i, d in zip(ids, dists)]
        rows.append((_picture(root / query_items[q].path), query_items[q].label, neighbours))
    plots.neighbour_grid(rows, out / "query_neighbours.png")
    (out / "metrics.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result.metrics, indent=2))
    return out


def _picture(path: Path):
    # The same decoding as training (transparency on white, 16-bit scaled), so the grid shows what the model saw.
    return decode_image(path.read_bytes())


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
