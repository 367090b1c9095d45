"""Find the serving bundle behind a local folder or MLflow URI, and export it for upload to S3 or a PVC."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator

from imgsim import atomic
from imgsim.bundle import BASE_DIR, BUNDLE_JSON, ServingBundle
from imgsim.errors import ImgsimError
from imgsim.runs import tracking

BUNDLE_ARTIFACT = "bundle"
log = logging.getLogger(__name__)


def bundle_uri(uri: str) -> str:
    """Map a model or run URI onto the URI of its bundle artifact (an alias resolved to its version now)."""
    return locate_bundle(uri)[0]


def locate_bundle(uri: str) -> tuple[str, str]:
    """(URI of the bundle artifact, registry version of the bundle or ""): a gallery alias is resolved once, so
    the download and the version it is reported as cannot disagree when the alias moves meanwhile."""
    if uri.startswith("models:/"):
        ref = tracking.model_reference(uri)
        if "version" not in ref:
            raise ImgsimError(f"model {uri} is not in the model registry at {tracking.mlflow.get_tracking_uri()}; "
                              "check the name, version or alias")
        if ref["kind"] == "bundle":  # a gallery version: the registered artifact is the bundle itself
            return f"models:/{ref['name']}/{ref['version']}", ref["version"]
        return f"runs:/{tracking.find_index_run(ref['name'], ref['version'])}/{BUNDLE_ARTIFACT}", ""
    if uri.startswith("runs:/") and uri.removeprefix("runs:/").strip("/").count("/") == 0:
        return f"{uri.rstrip('/')}/{BUNDLE_ARTIFACT}", ""
    return uri, ""


def resolve_bundle(uri: str, dst: str | Path | None, have: Path | None = None) -> tuple[Path, str]:
    """A local, not yet verified, bundle folder for ``uri`` (folder, runs:/..., models:/..., s3://...) and its
    registry version (or ""); a download goes into ``dst`` and stays there until the caller deletes it, as the
    server needs (its index is memory-mapped from it). ``have``: a whole version already on disk (the server's
    serving one): a version of changes made on exactly it takes its base from those files instead of a download."""
    pinned, version = locate_bundle(uri)
    return _with_base(_bundle_folder(tracking.download(pinned, "bundle", dst)), pinned, have), version


@contextlib.contextmanager
def fetched_bundle(uri: str) -> Iterator[Path]:
    """:func:`resolve_bundle` for one use: a downloaded copy is deleted on exit."""
    pinned = bundle_uri(uri)
    with tracking.fetched(pinned, "bundle") as folder:
        yield _with_base(_bundle_folder(folder), pinned)


@contextlib.contextmanager
def fetched_version(uri: str) -> Iterator[tuple[Path, str]]:
    """:func:`fetched_bundle` and the registry version it was fetched as."""
    pinned, version = locate_bundle(uri)
    with tracking.fetched(pinned, "bundle") as folder:
        yield _with_base(_bundle_folder(folder), pinned), version


def export_bundle(uri: str, out: str | Path) -> Path:
    """Copy the verified bundle for ``uri`` into ``out`` (replaced atomically); a version of changes with its
    base in ``out/base``, so the folder serves on its own."""
    out = Path(out)
    with fetched_bundle(uri) as source, atomic.atomic_dir(out) as staging:
        bundle = ServingBundle.load(source)  # refuse to export a bundle that would not serve
        shutil.copytree(source, staging, dirs_exist_ok=True)
        if bundle.index.changes is not None and not (staging / BASE_DIR).exists():  # its base found elsewhere
            shutil.copytree(bundle.model_folder, staging / BASE_DIR)
    return out


def _with_base(folder: Path, uri: str, have: Path | None = None) -> Path:
    """A downloaded version of changes gets its base version downloaded into its ``base/`` (ServingBundle.load
    reads it from there; an export copies both), or linked there from ``have`` when that is the very version (its
    files' checksums are the ones the changes name; loading checks every file against them). A local folder is
    left as it is: its base must be in its own ``base/`` or the local folder it names."""
    if tracking.local_path(uri) is not None:
        return folder
    try:
        base = json.loads((folder / BUNDLE_JSON).read_text()).get("base") or {}
    except (OSError, ValueError, AttributeError):
        return folder  # not a bundle: ServingBundle.load says so
    uri = str(base.get("uri", "")) if isinstance(base, dict) else ""
    if not uri or tracking.local_path(uri) is not None or (folder / BASE_DIR / BUNDLE_JSON).is_file():
        return folder  # (nothing to fetch: ServingBundle.load finds a local base, or says what is missing)
    if have is not None and _is_whole_version(have, base.get("files")):
        staging = folder / (BASE_DIR + ".link")
        try:
            shutil.copytree(have, staging, copy_function=_link_or_copy)
            staging.rename(folder / BASE_DIR)
            log.info("imgsim: base version %s linked from %s, the same version already here: not downloaded", uri,
                     have)
            return folder
        except (OSError, shutil.Error) as exc:  # (a file gone meanwhile, a full disk on the copy): download it
            shutil.rmtree(staging, ignore_errors=True)
            log.warning("imgsim: could not link the base version %s from %s (%s); downloading it", uri, have, exc)
    staging = folder / (BASE_DIR + ".download")
    got = _bundle_folder(tracking.download(uri, "base gallery version", staging))
    got.rename(folder / BASE_DIR)
    shutil.rmtree(staging, ignore_errors=True)
    return folder


def _is_whole_version(folder: Path, files) -> bool:
    """Whether ``folder`` holds a whole gallery version whose files have exactly the checksums ``files``."""
    try:
        meta = json.loads((folder / BUNDLE_JSON).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and not meta.get("base") and bool(files) and meta.get("files") == files


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (the files of a version never change; the old download's folder can go, the inodes stay), or a
    copy where the two folders are on different file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _bundle_folder(folder: Path) -> Path:
    if not (folder / BUNDLE_JSON).exists() and (folder / BUNDLE_ARTIFACT / BUNDLE_JSON).exists():
        return folder / BUNDLE_ARTIFACT
    return folder
