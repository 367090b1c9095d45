"""The extract stage as a tracked run (whole, or as shards and a merge): the serving bundle, metrics and pictures."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np

from imgsim import config, plots
from imgsim.bundle import ServingBundle
from imgsim.bundle_format import BUNDLE_JSON, Lineage, ModelSource
from imgsim.errors import ImgsimError, redact
from imgsim.images import decode_image
from imgsim.index import INDEX_FILE
from imgsim.manifest import Manifest
from imgsim.modelspec import file_sha256
from imgsim.nn.model import TrainedModel
from imgsim.runs import tracking
from imgsim.runs.common import log_params, start
from imgsim.runs.export import BUNDLE_ARTIFACT
from imgsim.stages.bundle_writer import write_bundle
from imgsim.stages.extract import Part, assemble, embed_part, extract
from imgsim.stages.settings import ExtractConfig


def run_extract(cfg: ExtractConfig) -> str:
    """Embed, index, evaluate; log metrics, plots and the serving bundle under ``bundle/``; returns the run id.

    Sharded (``num_shards`` > 1): embed one shard and log it as a shard run of ``shard_group``; ``merge``:
    join a group's shards into the one extract run a single process would have logged."""
    if cfg.merge:
        return run_extract_merge(cfg)
    if cfg.num_shards > 1 or cfg.shard_group:
        return run_extract_shard(cfg)
    tracking.setup()
    with start("extract") as run:
        mlflow.set_tag("imgsim.stage", "extract")
        log_params(config.to_params(cfg))
        bundle, manifest, manifest_uri, _ = _model_and_manifest(cfg)
        result = extract(cfg, bundle, manifest)
        _log_extract(cfg, bundle, manifest, manifest_uri, result, run.info.run_id)
        return run.info.run_id


def _model_and_manifest(cfg: ExtractConfig) -> tuple[TrainedModel, Manifest, str, str]:
    """The model, the manifest (the model's own unless one is given), its URI, and the model's fingerprint."""
    with tracking.fetched(cfg.model_uri, "model") as folder:
        bundle = TrainedModel.load(folder)
    manifest_uri = cfg.manifest_uri or bundle.config.get("manifest_uri", "")
    with tracking.fetched(manifest_uri, "manifest") as folder:
        manifest = Manifest.load(folder)
    return bundle, manifest, manifest_uri, bundle.fingerprint()


def _log_extract(cfg: ExtractConfig, bundle: TrainedModel, manifest: Manifest, manifest_uri: str, result,
                 run_id: str) -> None:
    """Tags, metrics, the serving bundle, plots, and the gallery registration of an extract run."""
    ref = tracking.model_reference(cfg.model_uri)
    mlflow.set_tags({"imgsim.model_uri": cfg.model_uri, "imgsim.manifest_uri": manifest_uri} |
                    {f"imgsim.model_{k}": ref[k] for k in ("name", "version") if k in ref})
    mlflow.log_metrics(result.metrics)
    root = Path(cfg.data_dir or manifest.root).expanduser().resolve()
    with tempfile.TemporaryDirectory() as tmp:
        serving = ServingBundle(bundle.spec, result.index, result.probes, ModelSource.from_json(ref), result.search_k,
                                result.metrics.get("index_recall_at_10"), torch_model=bundle,
                                lineage=Lineage(root=str(root), run_id=run_id), recall_target=cfg.recall_target,
                                **({"onnx_model": result.int8.onnx, "quantization": result.int8.record(),
                                    "onnx_parity": result.int8.export_parity} if result.int8 else {}))
        saved = write_bundle(serving, Path(tmp) / BUNDLE_ARTIFACT)
        bundle_sha256 = file_sha256(saved / BUNDLE_JSON)  # what the registry vouches for, from the bytes logged
        mlflow.log_artifacts(str(saved), BUNDLE_ARTIFACT)
        mlflow.log_artifacts(str(_plot_extract(cfg, result, manifest, Path(tmp) / "plots")), "plots")
    print("extract: " + ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))
    if cfg.gallery_name:
        version = tracking.register_bundle(cfg.gallery_name, run_id, mlflow.get_artifact_uri(BUNDLE_ARTIFACT),
                                           cfg.gallery_alias, bundle_sha256=bundle_sha256,
                                           index_sha256=serving.files[INDEX_FILE])
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
    with start(f"extract-shard-{shard}") as run:
        log_params(config.to_params(cfg))
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
    with start("extract") as run:
        mlflow.set_tags({"imgsim.stage": "extract", "imgsim.shard_group": cfg.merge,
                         "imgsim.shard_runs": ",".join(r.info.run_id for r in sorted(
                             runs, key=lambda r: int(r.data.tags["imgsim.shard"])))})
        log_params(config.to_params(cfg))
        _log_extract(cfg, bundle, manifest, manifest_uri, result, run.info.run_id)
        return run.info.run_id


def _wait_for_shards(group: str, wait_s: float) -> list:
    """The finished shard runs of ``group``, once there are as many distinct shards as they say there are."""
    deadline = time.monotonic() + wait_s
    while True:
        # This experiment only: a shard group planted in another user's experiment must not become the gallery.
        runs = mlflow.search_runs(experiment_ids=[tracking.experiment_id()], output_format="list", filter_string=(
            f"tags.`imgsim.stage` = 'extract_shard' and tags.`imgsim.shard_group` = '{group}' and "
            "attributes.status = 'FINISHED'"))
        expected = max((int(r.data.tags["imgsim.num_shards"]) for r in runs), default=0)
        if runs and len({r.data.tags["imgsim.shard"] for r in runs}) >= expected or time.monotonic() >= deadline:
            break
        time.sleep(min(10.0, max(0.5, deadline - time.monotonic())))
    if not runs:
        raise ImgsimError(f"no finished shard runs of group {group!r} in {redact(mlflow.get_tracking_uri())}"
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
        ids, dists = result.index.search(queries[q], 8, result.search_k)
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
