"""Gallery changes as tracked runs: each add or remove is one run and one new registered gallery version."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import mlflow

from imgsim import config
from imgsim.bundle import ServingBundle
from imgsim.bundle_format import BUNDLE_JSON
from imgsim.errors import ImgsimError
from imgsim.index import ITEM_FIELDS
from imgsim.modelspec import WEIGHTS, file_sha256
from imgsim.nn.model import TrainedModel
from imgsim.runs import tracking
from imgsim.runs.common import log_params, start
from imgsim.runs.export import BUNDLE_ARTIFACT, fetched_version, locate_bundle
from imgsim.stages import gallery
from imgsim.stages.bundle_writer import write_bundle
from imgsim.stages.settings import AddConfig, RemoveConfig


def run_gallery_add(cfg: AddConfig, files: list[str] | None = None) -> dict:
    """Add images to the gallery ``cfg.bundle`` names, as a new tracked bundle version; returns a summary."""
    tracking.setup()
    pinned = locate_bundle(cfg.bundle)[0]
    with fetched_version(pinned) as (folder, version):
        parent = ServingBundle.load(folder, threads=os.cpu_count() or 1)
        if cfg.model_uri:
            with tracking.fetched(cfg.model_uri, "model") as model_folder:
                gallery.check_model(TrainedModel.load(parent.model_folder), TrainedModel.load(model_folder))
        change = gallery.add_images(parent, cfg, files, as_changes=_lasting(pinned))
        return _log_change("gallery_add", cfg, change, parent, pinned, version)


def run_gallery_remove(cfg: RemoveConfig) -> dict:
    """Remove images from the gallery ``cfg.bundle`` names, as a new tracked bundle version."""
    tracking.setup()
    pinned = locate_bundle(cfg.bundle)[0]
    with fetched_version(pinned) as (folder, version):
        parent = ServingBundle.load(folder, threads=os.cpu_count() or 1)
        change = gallery.remove_images(parent, cfg, as_changes=_lasting(pinned))
        return _log_change("gallery_remove", cfg, change, parent, pinned, version)


def _lasting(pinned: str) -> bool:
    """Whether a version can name this parent as its base: a bundle in the registry's tracking server (runs:/,
    models:/ version), the only place a server follows a base to; not a local folder that may be gone or replaced
    tomorrow, nor other storage."""
    return pinned.startswith(("runs:/", "models:/"))


def _log_change(stage: str, cfg, change: gallery.Change, parent_bundle: ServingBundle, parent_uri: str,
                parent_version: str) -> dict:
    """Log a gallery change as one MLflow run (lineage, counts, recall, duplicates report, the new bundle) and
    register it; a change that changes nothing writes nothing."""
    summary = {"stage": stage, **change.counts(), "duplicates": change.duplicates.counts(),
               "skipped": [f"{path}: {why}" for path, why in change.skipped]}
    if not change.added and not change.removed:
        print(f"{stage}: nothing to change ({len(change.skipped)} skipped); no new version written")
        return summary | {"run_id": None, "version": None}
    parent = {"uri": cfg.bundle, "version": parent_version, "run_id": parent_bundle.lineage.run_id or "",
              "index_sha256": parent_bundle.gallery_sha256}
    with start(stage) as run:
        mlflow.set_tags({"imgsim.stage": stage, "imgsim.parent_bundle": cfg.bundle,
                         "imgsim.parent_version": parent_version, "imgsim.parent_run_id": parent["run_id"],
                         "imgsim.model_sha256": parent_bundle.files[WEIGHTS]})
        params = config.to_params(cfg)
        if len(params.get("paths", "")) > 500:  # MLflow truncates long params; changes/added.csv lists them all
            params["paths"] = f"{len(gallery.split_list(params['paths']))} files (see changes/)"
        log_params(params)
        counts = {k: v for k, v in change.counts().items() if k != "gallery_size"}
        mlflow.log_metrics({f"{k}_images": float(v) for k, v in counts.items()} | change.metrics
                           | {f"duplicates_{k}": float(v) for k, v in change.duplicates.counts().items()})
        new = change.bundle
        new.lineage = dataclasses.replace(new.lineage, run_id=run.info.run_id, parent=parent, change=counts)
        if new.base is not None and not new.base.uri:
            # The parent, whole, is the base of this version of changes.
            new.base = dataclasses.replace(new.base, uri=parent_uri)
        if new.base is not None:
            mlflow.set_tag(tracking.BASE_TAG, new.base.uri)
        with tempfile.TemporaryDirectory() as tmp:
            saved = write_bundle(new, Path(tmp) / BUNDLE_ARTIFACT, model_from=parent_bundle.model_folder)
            stored = sum(f.stat().st_size for f in saved.iterdir())
            mlflow.log_metric("version_bytes", float(stored))
            bundle_sha256 = file_sha256(saved / BUNDLE_JSON)  # what the registry vouches for
            mlflow.log_artifacts(str(saved), BUNDLE_ARTIFACT)
            mlflow.log_artifacts(str(_write_change_report(change, Path(tmp) / "changes")), "changes")
        version = None
        if cfg.register_name:
            # Compare-and-set: refused (the run fails, nothing registered) unless the alias still names the
            # gallery this change was built from, by content, whichever URI named it.
            version = tracking.register_bundle(
                cfg.register_name, run.info.run_id, mlflow.get_artifact_uri(BUNDLE_ARTIFACT), cfg.alias,
                bundle_sha256=bundle_sha256, index_sha256=new.gallery_sha256,
                base=new.base.uri if new.base is not None else "", base_sha256=_base_sha256(new, parent_bundle),
                parent=tracking.Parent(parent["index_sha256"], parent_version if _names(cfg.bundle, cfg.register_name) else ""))
            mlflow.set_tag("imgsim.gallery_version", version)
    return summary | {"run_id": run.info.run_id, "version": version,
                      "index_recall_at_10": round(change.metrics["index_recall_at_10"], 4),
                      "stored": "changes" if new.base is not None else "whole", "stored_bytes": stored,
                      "bundle_uri": f"models:/{cfg.register_name}/{version}" if version else
                      f"runs:/{run.info.run_id}/{BUNDLE_ARTIFACT}"}


def _base_sha256(version: ServingBundle, parent: ServingBundle) -> str:
    """The sha256 of the bundle.json of a version of changes' base: the parent's model folder holds the base (the
    parent itself when whole, its own base when changes), checked to be the very version the changes name."""
    if version.base is None:
        return ""
    meta = parent.model_folder / BUNDLE_JSON
    if json.loads(meta.read_text()).get("files") != version.base.files:
        raise ImgsimError(f"the base version {version.base.uri} is not the one the changes were made on; "
                          "nothing was registered: run the change again")
    return file_sha256(meta)


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
    change.duplicates.write(out, change.bundle.lineage.root or None)
    return out
