"""Each stage as a tracked MLflow run that logs its artifact; ``main`` chains them by artifact URI."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import torch

from imgsim import config, distributed, gallery, plots, tracking
from imgsim.bundle import ServingBundle
from imgsim.export import BUNDLE_ARTIFACT, fetched_version
from imgsim.gallery import AddConfig, RemoveConfig
from imgsim.index import INDEX_FILE, ITEM_FIELDS
from imgsim.errors import ImgsimError
from imgsim.extract import ExtractConfig, Part, assemble, embed_part, extract
from imgsim.images import decode_image
from imgsim.manifest import Manifest
from imgsim.model import ModelBundle
from imgsim.modelspec import MODEL_JSON, WEIGHTS
from imgsim.split import SplitConfig, split_dataset
from imgsim.train import TrainConfig, embed_only, read_checkpoint, resolve_schedule, resumes, train_model


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
    previous = read_checkpoint(cfg) if resumes(cfg) else None
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
    """Embed, index, evaluate; log metrics, plots and the serving bundle under ``bundle/``; returns the run id.

    Sharded (``num_shards`` > 1): embed one shard and log it as a shard run of ``shard_group``; ``merge``:
    join a group's shards into the one extract run a single process would have logged."""
    if cfg.merge:
        return run_extract_merge(cfg)
    if cfg.num_shards > 1 or cfg.shard_group:
        return run_extract_shard(cfg)
    tracking.setup()
    with _start("extract") as run:
        mlflow.set_tag("imgsim.stage", "extract")
        _log_params(config.to_params(cfg))
        bundle, manifest, manifest_uri, _ = _model_and_manifest(cfg)
        result = extract(cfg, bundle, manifest)
        _log_extract(cfg, bundle, manifest, manifest_uri, result, run.info.run_id)
        return run.info.run_id


def _model_and_manifest(cfg: ExtractConfig) -> tuple[ModelBundle, Manifest, str, str]:
    """The model, the manifest (the model's own unless one is given), its URI, and the model's fingerprint."""
    with tracking.fetched(cfg.model_uri, "model") as folder:
        bundle = ModelBundle.load(folder)
    manifest_uri = cfg.manifest_uri or bundle.config.get("manifest_uri", "")
    with tracking.fetched(manifest_uri, "manifest") as folder:
        manifest = Manifest.load(folder)
    return bundle, manifest, manifest_uri, bundle.fingerprint()


def _log_extract(cfg: ExtractConfig, bundle: ModelBundle, manifest: Manifest, manifest_uri: str, result,
                 run_id: str) -> None:
    """Tags, metrics, the serving bundle, plots, and the gallery registration of an extract run."""
    ref = tracking.model_reference(cfg.model_uri)
    mlflow.set_tags({"imgsim.model_uri": cfg.model_uri, "imgsim.manifest_uri": manifest_uri} |
                    {f"imgsim.model_{k}": ref[k] for k in ("name", "version") if k in ref})
    mlflow.log_metrics(result.metrics)
    root = Path(cfg.data_dir or manifest.root).expanduser().resolve()
    with tempfile.TemporaryDirectory() as tmp:
        serving = ServingBundle(bundle.spec, result.index, result.probes, ref, cfg.search_k,
                                result.metrics.get("index_recall_at_10"), weights=bundle,
                                gallery={"root": str(root), "run_id": run_id})
        mlflow.log_artifacts(str(serving.save(Path(tmp) / BUNDLE_ARTIFACT)), BUNDLE_ARTIFACT)
        mlflow.log_artifacts(str(_plot_extract(cfg, result, manifest, Path(tmp) / "plots")), "plots")
    print("extract: " + ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))
    if cfg.gallery_name:
        version = tracking.register_bundle(cfg.gallery_name, run_id, mlflow.get_artifact_uri(BUNDLE_ARTIFACT),
                                           cfg.gallery_alias, index_sha256=serving.files[INDEX_FILE])
        mlflow.set_tag("imgsim.gallery_version", version)
        print(f"extract: gallery models:/{cfg.gallery_name}/{version}"
              + (f" (now {cfg.gallery_name}@{cfg.gallery_alias})" if cfg.gallery_alias else ""))


SHARD_ARTIFACT = "shard/part.npz"


def run_extract_shard(cfg: ExtractConfig) -> str:
    """Embed one shard (``shard``, or the Indexed Job's JOB_COMPLETION_INDEX) and log it as a shard run."""
    shard = cfg.shard if cfg.shard >= 0 else int(os.environ.get("JOB_COMPLETION_INDEX", "-1"))
    if not cfg.shard_group:
        raise ImgsimError("a sharded extract needs --shard-group NAME: the name the merge finds its shards by")
    if not 0 <= shard < cfg.num_shards:
        raise ImgsimError(f"shard must be in 0..{cfg.num_shards - 1} (--shard, or JOB_COMPLETION_INDEX in an "
                          f"Indexed Job), got {shard}")
    tracking.setup()
    with _start(f"extract-shard-{shard}") as run:
        _log_params(config.to_params(cfg))
        bundle, manifest, manifest_uri, weights = _model_and_manifest(cfg)
        mlflow.set_tags({"imgsim.stage": "extract_shard", "imgsim.shard_group": cfg.shard_group,
                         "imgsim.shard": str(shard), "imgsim.num_shards": str(cfg.num_shards),
                         "imgsim.model_uri": cfg.model_uri, "imgsim.model_fingerprint": weights,
                         "imgsim.manifest_uri": manifest_uri})
        part = embed_part(cfg, bundle, manifest, shard, cfg.num_shards)
        mlflow.log_metrics({"shard_gallery_images": float(len(part.gallery)),
                            "embed_images_per_second": len(part.gallery) / max(part.embed_seconds, 1e-9)})
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(part.save(Path(tmp) / "part.npz")), "shard")
        print(f"extract: shard {shard + 1}/{cfg.num_shards} of group {cfg.shard_group!r}: "
              f"{len(part.gallery)} gallery and {len(part.queries)} query images")
        return run.info.run_id


def run_extract_merge(cfg: ExtractConfig) -> str:
    """Wait (up to ``wait_s``) for every shard of group ``merge``, check they belong together, and log the one
    extract run a single process would have; a missing, repeated or foreign shard stops it before any run."""
    tracking.setup()
    runs = _wait_for_shards(cfg.merge, cfg.wait_s)
    first = runs[0].data.tags
    for key in ("imgsim.model_fingerprint", "imgsim.manifest_uri", "imgsim.num_shards"):
        values = {r.data.tags.get(key) for r in runs}
        if len(values) > 1:
            culprits = ", ".join(f"{r.info.run_id} (shard {r.data.tags['imgsim.shard']}: {r.data.tags.get(key)})"
                                 for r in runs)
            raise ImgsimError(f"shard group {cfg.merge!r} mixes runs with different {key.split('.')[1]}: {culprits}. "
                              "A foreign shard does not belong in this gallery; rerun the group under a new name")
    cfg = dataclasses.replace(cfg, model_uri=first["imgsim.model_uri"], manifest_uri=first["imgsim.manifest_uri"])
    with tempfile.TemporaryDirectory() as tmp:
        parts = [Part.load(Path(mlflow.artifacts.download_artifacts(
            run_id=r.info.run_id, artifact_path=SHARD_ARTIFACT, dst_path=f"{tmp}/{r.info.run_id}"))) for r in runs]
    bundle, manifest, manifest_uri, _ = _model_and_manifest(cfg)
    result = assemble(cfg, bundle, manifest, parts)  # checks every shard is there exactly once, before any run
    with _start("extract") as run:
        mlflow.set_tags({"imgsim.stage": "extract", "imgsim.shard_group": cfg.merge,
                         "imgsim.shard_runs": ",".join(r.info.run_id for r in sorted(
                             runs, key=lambda r: int(r.data.tags["imgsim.shard"])))})
        _log_params(config.to_params(cfg))
        _log_extract(cfg, bundle, manifest, manifest_uri, result, run.info.run_id)
        return run.info.run_id


def _wait_for_shards(group: str, wait_s: float) -> list:
    """The finished shard runs of ``group``, once there are as many distinct shards as they say there are."""
    deadline = time.monotonic() + wait_s
    while True:
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string=(
            f"tags.`imgsim.stage` = 'extract_shard' and tags.`imgsim.shard_group` = '{group}' and "
            "attributes.status = 'FINISHED'"))
        expected = max((int(r.data.tags["imgsim.num_shards"]) for r in runs), default=0)
        if runs and len({r.data.tags["imgsim.shard"] for r in runs}) >= expected or time.monotonic() >= deadline:
            break
        time.sleep(min(10.0, max(0.5, deadline - time.monotonic())))
    if not runs:
        raise ImgsimError(f"no finished shard runs of group {group!r} in {mlflow.get_tracking_uri()}"
                          f"{f' after waiting {wait_s:g} s' if wait_s else ''}: run `imgsim extract --num-shards N "
                          f"--shard I --shard-group {group}` for every I first")
    return runs


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


def run_gallery_add(cfg: AddConfig, files: list[str] | None = None) -> dict:
    """Add images to the gallery ``cfg.bundle`` names, as a new tracked bundle version; returns a summary."""
    tracking.setup()
    with fetched_version(cfg.bundle) as (folder, version):
        parent = ServingBundle.load(folder, threads=os.cpu_count() or 1)
        if cfg.model_uri:
            with tracking.fetched(cfg.model_uri, "model") as model_folder:
                gallery.check_model(ModelBundle.load(folder), ModelBundle.load(model_folder))
        change = gallery.add_images(parent, cfg, files)
        return _log_change("gallery_add", cfg, change, parent, folder, version)


def run_gallery_remove(cfg: RemoveConfig) -> dict:
    """Remove images from the gallery ``cfg.bundle`` names, as a new tracked bundle version."""
    tracking.setup()
    with fetched_version(cfg.bundle) as (folder, version):
        parent = ServingBundle.load(folder, threads=os.cpu_count() or 1)
        return _log_change("gallery_remove", cfg, gallery.remove_images(parent, cfg), parent, folder, version)


def _log_change(stage: str, cfg, change: gallery.Change, parent_bundle: ServingBundle, parent_folder: Path,
                parent_version: str) -> dict:
    """Log a gallery change as one MLflow run (lineage, counts, recall, duplicates report, the new bundle) and
    register it; a change that changes nothing writes nothing."""
    summary = {"stage": stage, **change.counts(), "duplicates": change.duplicates.counts(),
               "skipped": [f"{path}: {why}" for path, why in change.skipped]}
    if not change.added and not change.removed:
        print(f"{stage}: nothing to change ({len(change.skipped)} skipped); no new version written")
        return summary | {"run_id": None, "version": None}
    parent = {"uri": cfg.bundle, "version": parent_version, "run_id": parent_bundle.gallery.get("run_id", ""),
              "index_sha256": parent_bundle.files[INDEX_FILE]}
    with _start(stage) as run:
        mlflow.set_tags({"imgsim.stage": stage, "imgsim.parent_bundle": cfg.bundle,
                         "imgsim.parent_version": parent_version, "imgsim.parent_run_id": parent["run_id"],
                         "imgsim.model_sha256": parent_bundle.files[WEIGHTS]})
        params = config.to_params(cfg)
        if len(params.get("paths", "")) > 500:  # MLflow truncates long params; changes/added.csv lists them all
            params["paths"] = f"{len(gallery.split_list(params['paths']))} files (see changes/)"
        _log_params(params)
        counts = {k: v for k, v in change.counts().items() if k != "gallery_size"}
        mlflow.log_metrics({f"{k}_images": float(v) for k, v in counts.items()} | change.metrics
                           | {f"duplicates_{k}": float(v) for k, v in change.duplicates.counts().items()})
        change.bundle.gallery |= {"run_id": run.info.run_id, "parent": parent, "change": counts}
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifacts(str(change.bundle.save(Path(tmp) / BUNDLE_ARTIFACT, model_from=parent_folder)),
                                 BUNDLE_ARTIFACT)
            mlflow.log_artifacts(str(_write_change_report(change, Path(tmp) / "changes")), "changes")
        version = None
        if cfg.register_name:
            # Compare-and-set: refused (the run fails, nothing registered) unless the alias still names the
            # gallery this change was built from, by content, whichever URI named it.
            version = tracking.register_bundle(
                cfg.register_name, run.info.run_id, mlflow.get_artifact_uri(BUNDLE_ARTIFACT), cfg.alias,
                index_sha256=change.bundle.files[INDEX_FILE],
                parent=tracking.Parent(parent["index_sha256"], parent_version if _names(cfg.bundle, cfg.register_name) else ""))
            mlflow.set_tag("imgsim.gallery_version", version)
    return summary | {"run_id": run.info.run_id, "version": version,
                      "index_recall_at_10": round(change.metrics["index_recall_at_10"], 4),
                      "bundle_uri": f"models:/{cfg.register_name}/{version}" if version else
                      f"runs:/{run.info.run_id}/{BUNDLE_ARTIFACT}"}


def _names(uri: str, registered: str) -> bool:
    """Whether ``uri`` is a version or alias of the registered model ``registered``."""
    return uri.startswith((f"models:/{registered}/", f"models:/{registered}@"))


def _write_change_report(change: gallery.Change, out: Path) -> Path:
    """added.csv, removed.csv, skipped.csv, and the duplicates CSV and PNG of the copies found."""
    out.mkdir(parents=True, exist_ok=True)
    for name, header, rows in (("added", ITEM_FIELDS, [dataclasses.astuple(i) for i in change.added]),
                               ("removed", ITEM_FIELDS, [dataclasses.astuple(i) for i in change.removed]),
                               ("skipped", ("path", "reason"), change.skipped)):
        with open(out / f"{name}.csv", "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
    change.duplicates.write(out, change.bundle.gallery.get("root") or None)
    return out
