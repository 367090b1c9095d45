"""MLflow glue: the default local store, experiments, and resolving artifact and model URIs to folders."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from imgsim.errors import ImgsimError

EXPERIMENT = "imgsim"
KIND_TAG = "imgsim.kind"  # on registered versions: "bundle" for a serving bundle (a gallery version)


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's local ``sqlite:///mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def setup(experiment: str | None = None) -> str:
    """Point MLflow at :func:`tracking_uri` and make sure the experiment exists (artifacts in ./mlartifacts)."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return uri  # `mlflow run` already chose the experiment
    if mlflow.get_experiment_by_name(name) is None:
        location = None if uri.startswith(("http", "databricks")) else Path("mlartifacts").resolve().as_uri()
        mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(name)
    return uri


def is_remote(uri: str) -> bool:
    return "://" in uri or uri.startswith(("runs:", "models:"))


def local_path(uri: str) -> Path | None:
    """The folder a local path or ``file://`` URI names; None for anything MLflow has to download."""
    if is_remote(uri) and not uri.startswith("file://"):
        return None
    return Path(uri.removeprefix("file://")).expanduser()


def download(uri: str, what: str, dst: str | Path | None) -> Path:
    """A local folder holding ``uri``: a local path as is, anything MLflow knows downloaded into ``dst`` (the
    caller's to delete: :func:`fetched` for one use, the server for as long as it serves the version; None only
    where :func:`local_path` says nothing is downloaded)."""
    if not uri:
        raise ImgsimError(f"no {what} given; pass a local path or an MLflow URI (runs:/<run id>/..., models:/name/version)")
    path = local_path(uri)
    if path is not None:
        if not path.exists():
            raise ImgsimError(f"{what} {uri} does not exist; check the path")
        return path
    if dst is None:
        raise ValueError(f"{uri} is downloaded: pass the folder to download it into")
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except (MlflowException, OSError) as exc:
        raise ImgsimError(f"{what} {uri} cannot be fetched from MLflow at {mlflow.get_tracking_uri()}: "
                          f"{str(exc).splitlines()[0]}. Check the run id / model name and MLFLOW_TRACKING_URI.") from None


@contextlib.contextmanager
def fetched(uri: str, what: str) -> Iterator[Path]:
    """:func:`download` for one use: a downloaded copy is deleted on exit (a local path is left alone)."""
    tmp = tempfile.mkdtemp(prefix="imgsim-")
    try:
        yield download(uri, what, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_reference(uri: str) -> dict:
    """Name, version and source run of a model URI, recorded in the index so mismatches are detectable."""
    ref = {"uri": uri}
    if uri.startswith("models:/"):
        name, _, rest = uri.removeprefix("models:/").partition("/")
        name, _, alias = name.partition("@")
        client = MlflowClient()
        try:
            version = client.get_model_version_by_alias(name, alias) if alias else \
                client.get_model_version(name, rest) if rest.isdigit() else None
        except MlflowException:
            version = None
        if version is not None:
            ref |= {"name": version.name, "version": str(version.version), "run_id": version.run_id,
                    "kind": (version.tags or {}).get(KIND_TAG, "model")}
    elif uri.startswith("runs:/"):
        ref["run_id"] = uri.removeprefix("runs:/").split("/")[0]
    return ref


def find_index_run(name: str, version: str) -> str:
    """The newest finished extract run that indexed registered model ``name`` version ``version``."""
    runs = mlflow.search_runs(
        search_all_experiments=True, output_format="list", max_results=1, order_by=["attributes.start_time DESC"],
        filter_string=(f"tags.`imgsim.stage` = 'extract' and tags.`imgsim.model_name` = '{name}' and "
                       f"tags.`imgsim.model_version` = '{version}' and attributes.status = 'FINISHED'"))
    if not runs:
        raise ImgsimError(f"no finished extract run has indexed model {name} version {version}; "
                          f"run 'mlflow run . -e extract -P model_uri=models:/{name}/{version}' first")
    return runs[0].info.run_id


def register_bundle(name: str, run_id: str, artifact_uri: str, alias: str = "", expected: str | None = None) -> str:
    """Register the bundle at ``artifact_uri`` as a new version of ``name`` and point ``alias`` at it; returns
    the version. ``expected``: the version the alias must still name (the one this change started from): if
    someone moved it meanwhile, the new version stays registered but the alias is left alone, with an error."""
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="imgsim serving bundles: each version is one gallery")
    version = str(client.create_model_version(name, artifact_uri, run_id, tags={KIND_TAG: "bundle"}).version)
    if alias:
        try:
            current = str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            current = None
        if expected is not None and current != expected:
            raise ImgsimError(f"{name}@{alias} moved to version {current} while this change was built from version "
                              f"{expected}: version {version} is registered but {alias!r} still names {current}. "
                              f"Run the change again on models:/{name}@{alias}, or point the alias at {version} "
                              "yourself if it should replace that.")
        client.set_registered_model_alias(name, alias, version)
    return version
