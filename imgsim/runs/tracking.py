"""MLflow glue: the default local store, experiments, and resolving artifact and model URIs to folders."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from imgsim.errors import ImgsimError, redact

EXPERIMENT = "imgsim"
KIND_TAG = "imgsim.kind"  # on registered versions: "bundle" for a serving bundle (a gallery version)


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's local ``sqlite:///mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def experiment_id() -> str:
    """The experiment this process logs to (:func:`setup` chose it): one only the pipeline identity writes to."""
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        raise ImgsimError(f"no experiment {name!r} in the tracking store; run the pipeline first")
    return experiment.experiment_id


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
        refused = access_error(exc)
        if refused is not None:
            raise refused from None
        raise ImgsimError(redact(f"{what} {uri} cannot be fetched from MLflow at {mlflow.get_tracking_uri()}: "
                                 f"{str(exc).splitlines()[0]}. Check the run id / model name and "
                                 "MLFLOW_TRACKING_URI.")) from None


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
        except MlflowException as exc:  # not there is an answer; a refusal is not
            refused = access_error(exc)
            if refused is not None:
                raise refused from None
            version = None
        if version is not None:
            ref |= {"name": version.name, "version": str(version.version), "run_id": version.run_id,
                    "kind": (version.tags or {}).get(KIND_TAG, "model")}
    elif uri.startswith("runs:/"):
        ref["run_id"] = uri.removeprefix("runs:/").split("/")[0]
    return ref


def find_index_run(name: str, version: str) -> str:
    """The newest finished extract run that indexed registered model ``name`` version ``version``, searched in the
    experiment of the run that trained it only: any signed-in user may create an experiment of its own and tag runs
    there to look like imgsim's, and a search of every experiment would pick the newest."""
    run_id = MlflowClient().get_model_version(name, version).run_id
    if not run_id:
        raise ImgsimError(f"model {name} version {version} names no training run, so no extract run can be found "
                          "for it; pass the bundle's runs:/ URI or a gallery version instead")
    runs = mlflow.search_runs(
        experiment_ids=[MlflowClient().get_run(run_id).info.experiment_id], output_format="list", max_results=1,
        order_by=["attributes.start_time DESC"],
        filter_string=(f"tags.`imgsim.stage` = 'extract' and tags.`imgsim.model_name` = '{name}' and "
                       f"tags.`imgsim.model_version` = '{version}' and attributes.status = 'FINISHED'"))
    if not runs:
        raise ImgsimError(f"no finished extract run has indexed model {name} version {version}; "
                          f"run 'mlflow run . -e extract -P model_uri=models:/{name}/{version}' first")
    return runs[0].info.run_id


INDEX_TAG = "imgsim.index_sha256"  # on registered bundle versions: which gallery (index content) it is
# On registered bundle versions, written by the identity that registers them: the sha256 of the version's
# bundle.json (whose per-file checksums cover every other file) and of its base's, so a server trusts what the
# registry recorded, not what the artifact store holds now.
BUNDLE_SHA_TAG = "imgsim.bundle_sha256"
BASE_SHA_TAG = "imgsim.base_bundle_sha256"
# On gallery-change runs and their registered versions: the base version's URI when the version is stored as its
# changes over that base (imgsim.changes), absent when it holds the whole gallery.
BASE_TAG = "imgsim.base"
LOCK_SUFFIX = ".imgsim-lock"  # a registered model that exists while a change to the gallery is registered
LOCK_WAIT_S, LOCK_STALE_S = 30.0, 600.0


@dataclasses.dataclass(frozen=True)
class Parent:
    """The gallery a change was built from: its index checksum, and its registry version when it had one."""

    index_sha256: str
    version: str = ""


def register_bundle(name: str, run_id: str, artifact_uri: str, alias: str = "", *, bundle_sha256: str,
                    index_sha256: str = "", parent: Parent | None = None, base: str = "",
                    base_sha256: str = "") -> str:
    """Register the bundle at ``artifact_uri`` as a new version of ``name`` (tagged with its bundle.json's sha256,
    its base's, and its index checksum) and point ``alias`` at it; returns the version.

    With ``parent`` this is compare-and-set: the alias must still name the gallery the change was built from,
    whatever form the change named it by (alias, pinned version, runs:/ URI, folder), or nothing is registered.
    The check and the move run under a registry lock, so of two changes from one parent exactly one lands;
    the other is refused, saying to run it again (its new ids would otherwise collide with the winner's)."""
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        with contextlib.suppress(MlflowException):  # another process may create it at the same moment
            client.create_registered_model(name, description="imgsim serving bundles: each version is one gallery")
    with _registry_lock(client, name):
        if alias and parent is not None:
            _check_alias(client, name, alias, parent)
        tags = {KIND_TAG: "bundle", BUNDLE_SHA_TAG: bundle_sha256} | \
            ({INDEX_TAG: index_sha256} if index_sha256 else {}) | \
            ({BASE_TAG: base, BASE_SHA_TAG: base_sha256} if base else {})
        version = str(client.create_model_version(name, artifact_uri, run_id, tags=tags).version)
        if alias:
            client.set_registered_model_alias(name, alias, version)
    return version


def version_tags(name: str, version: str) -> dict[str, str]:
    """The tags of registered model ``name`` version ``version``."""
    return dict(MlflowClient().get_model_version(name, version).tags or {})


def access_error(exc: Exception) -> ImgsimError | None:
    """One line for a tracking server that refused who we are (401) or what we asked (403), naming what to set;
    None for any other failure."""
    text = str(exc)
    code = getattr(exc, "error_code", "")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    where = redact(mlflow.get_tracking_uri())
    if code == "UNAUTHENTICATED" or "error code 401" in text or "401 Client Error" in text:
        said = "wrong or expired" if user else "not set"
        return ImgsimError(f"the tracking server at {where} did not accept the credentials ({said}): set "
                           "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to this role's identity")
    if "Invalid Host header" in text:  # MLflow 3's DNS-rebinding guard, not a permission
        return ImgsimError(f"the tracking server at {where} does not answer to that host name: add it to the "
                           "server's --allowed-hosts, or set MLFLOW_TRACKING_URI to a name it lists")
    if code == "PERMISSION_DENIED" or "error code 403" in text or "403 Client Error" in text:
        return ImgsimError(f"the tracking server at {where} refused this to {user or 'an anonymous user'} "
                           "(403): this identity may not do it; run it as the role that may (the pipeline's "
                           "identity writes; the serving identity only reads)")
    return None


def _check_alias(client: MlflowClient, name: str, alias: str, parent: Parent) -> None:
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return  # no alias yet: nothing to overwrite
    sha = _index_sha256(client, current)
    same = sha == parent.index_sha256 if sha else str(current.version) == parent.version
    if same:
        return
    built_from = f"version {parent.version}" if parent.version else f"the gallery with index {parent.index_sha256[:12]}"
    raise ImgsimError(f"{name}@{alias} moved to version {current.version} while this change was built from "
                      f"{built_from}: nothing was registered and {alias!r} still names {current.version}. Run the "
                      f"change again on models:/{name}@{alias} (it then includes version {current.version}'s "
                      "changes).")


def _index_sha256(client: MlflowClient, version) -> str:
    """A registered bundle version's index checksum: its tag, or (versions registered before the tag) the
    bundle.json it was registered with, one small file; "" if neither can be read."""
    from imgsim.bundle_format import BUNDLE_JSON
    from imgsim.index import INDEX_FILE

    if (version.tags or {}).get(INDEX_TAG):
        return version.tags[INDEX_TAG]
    uri = client.get_model_version_download_uri(version.name, version.version).rstrip("/") + "/" + BUNDLE_JSON
    with tempfile.TemporaryDirectory() as tmp:
        try:
            meta = json.loads(Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)).read_text())
            return str(meta["files"][INDEX_FILE])
        except (MlflowException, OSError, KeyError, TypeError, ValueError):
            return ""


@contextlib.contextmanager
def _registry_lock(client: MlflowClient, name: str) -> Iterator[None]:
    """Mutual exclusion between processes through the registry itself: creating a registered model is atomic
    (a unique name). A lock older than LOCK_STALE_S belongs to a process that died holding it."""
    lock, deadline = name + LOCK_SUFFIX, time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            client.create_registered_model(lock, description=f"held while a change to {name} is registered")
            break
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            if time.time() * 1000 - client.get_registered_model(lock).creation_timestamp > LOCK_STALE_S * 1000:
                client.delete_registered_model(lock)
                continue
        except MlflowException as exc:
            if access_error(exc) is not None:  # another identity made the lock: waiting cannot help
                raise ImgsimError(f"the registry lock {lock!r} was created by another identity, which this one may "
                                  "not read or delete: nothing was registered; the tracking server's admin should "
                                  "delete that registered model") from None
        if time.monotonic() > deadline:
            raise ImgsimError(f"another change to {name} has held the registry lock {lock!r} for over {LOCK_WAIT_S:g} s; "
                              "nothing was registered: run this change again (delete that registered model if no "
                              "change is running)")
        time.sleep(0.2)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock)
