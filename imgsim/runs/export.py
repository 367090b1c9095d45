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
from mlflow.exceptions import MlflowException

from imgsim.bundle import ServingBundle
from imgsim.bundle_format import BASE_DIR, BUNDLE_JSON, BundleError
from imgsim.errors import ImgsimError, redact
from imgsim.modelspec import file_sha256
from imgsim.runs import tracking

BUNDLE_ARTIFACT = "bundle"
log = logging.getLogger(__name__)


def locate_bundle(uri: str) -> tuple[str, str]:
    """(URI of the bundle artifact, registry version of the bundle or ""): a gallery alias is resolved once, so
    the download and the version it is reported as cannot disagree when the alias moves meanwhile."""
    if uri.startswith("models:/"):
        ref = tracking.model_reference(uri)
        if "version" not in ref:
            raise ImgsimError(f"model {uri} is not in the model registry at {redact(tracking.mlflow.get_tracking_uri())}; "
                              "check the name, version or alias")
        if ref["kind"] == "bundle":  # a gallery version: the registered artifact is the bundle itself
            return f"models:/{ref['name']}/{ref['version']}", ref["version"]
        return f"runs:/{tracking.find_index_run(ref['name'], ref['version'])}/{BUNDLE_ARTIFACT}", ""
    if uri.startswith("runs:/") and uri.removeprefix("runs:/").strip("/").count("/") == 0:
        return f"{uri.rstrip('/')}/{BUNDLE_ARTIFACT}", ""
    return uri, ""


def resolve_bundle(uri: str, dst: str | Path | None, have: Path | None = None, *, bundle_sha256: str = "",
                   base_root: str = "") -> tuple[Path, str]:
    """A local bundle folder for ``uri`` (folder, runs:/..., models:/..., s3://...) and its registry version (or
    ""), its bundle.json checked against the registry's record (:func:`check_anchor`), its files not yet verified;
    a download goes into ``dst`` and stays there until the caller deletes it, as the server needs (its index is
    memory-mapped from it). ``have``: a whole version already on disk (the server's serving one): a version of
    changes made on exactly it takes its base from those files instead of a download. ``base_root``: the local
    folder a downloaded version's base may be read from (else only the registry)."""
    pinned, version = locate_bundle(uri)
    folder = _bundle_folder(tracking.download(pinned, "bundle", dst))
    tags = check_anchor(folder, pinned, bundle_sha256)
    return _with_base(folder, pinned, have, tags, base_root), version


@contextlib.contextmanager
def fetched_bundle(uri: str) -> Iterator[Path]:
    """:func:`resolve_bundle` for one use: a downloaded copy is deleted on exit."""
    with fetched_version(uri) as (folder, _):
        yield folder


@contextlib.contextmanager
def fetched_version(uri: str) -> Iterator[tuple[Path, str]]:
    """:func:`fetched_bundle` and the registry version it was fetched as."""
    pinned, version = locate_bundle(uri)
    with tracking.fetched(pinned, "bundle") as folder:
        folder = _bundle_folder(folder)
        yield _with_base(folder, pinned, None, check_anchor(folder, pinned)), version


def check_anchor(folder: Path, pinned: str, expected: str = "") -> dict[str, str] | None:
    """Check ``folder``'s bundle.json before anything else is read: against ``expected`` (the sha256 an operator
    configured, e.g. ``imgsim rollout`` from the registry), and for a registered gallery version (``pinned`` is
    models:/name/N) against the registry's :data:`tracking.BUNDLE_SHA_TAG`. Returns that version's tags (None for
    a bundle the registry does not hold); raises ``BundleError`` naming the file and the tag on a mismatch."""
    meta = folder / BUNDLE_JSON
    got = file_sha256(meta) if meta.is_file() else ""
    if not got and (expected or pinned.startswith("models:/")):
        raise BundleError(f"bundle {pinned} has no {BUNDLE_JSON}; not loaded")
    if expected and got != expected:
        raise BundleError(f"bundle {pinned}: {BUNDLE_JSON} has sha256 {got[:12]}..., not the {expected[:12]}... this "
                          f"server was told to expect (bundle_sha256, from the registry's {tracking.BUNDLE_SHA_TAG} "
                          "tag): it changed after it was registered; not loaded")
    if not pinned.startswith("models:/"):
        return None
    name, _, number = pinned.removeprefix("models:/").partition("/")
    try:
        tags = tracking.version_tags(name, number)
    except MlflowException as exc:  # the registry unreachable or refusing: may pass, retried
        raise tracking.access_error(exc) or ImgsimError(redact(f"cannot read the tags of {pinned}: {exc}")) from None
    want = vouched_digest(pinned, tags)
    if got != want:
        raise BundleError(f"gallery version {pinned}: {BUNDLE_JSON} has sha256 {got[:12]}..., but the registry's "
                          f"{tracking.BUNDLE_SHA_TAG} tag says {want[:12]}...: the artifact store's copy changed after "
                          "it was registered; not loaded")
    return tags


def export_bundle(uri: str, out: str | Path) -> Path:
    """Copy the verified bundle for ``uri`` into ``out`` (replaced atomically); a version of changes with its
    base in ``out/base``, so the folder serves on its own."""
    out = Path(out)
    with fetched_bundle(uri) as source, atomic.atomic_dir(out) as staging:
        bundle = ServingBundle.load(source)  # refuse to export a bundle that would not serve
        shutil.copytree(source, staging, dirs_exist_ok=True)
        if bundle.changes is not None and not (staging / BASE_DIR).exists():  # its base found elsewhere
            shutil.copytree(bundle.model_folder, staging / BASE_DIR)
    return out


def vouched_digest(pinned: str, tags: dict[str, str]) -> str:
    """The bundle.json sha256 the registry recorded for gallery version ``pinned`` (its ``tags``); a version without
    one is refused, not served unchecked."""
    want = tags.get(tracking.BUNDLE_SHA_TAG, "")
    if not want:
        raise BundleError(f"gallery version {pinned} has no {tracking.BUNDLE_SHA_TAG} tag (registered before imgsim "
                          "recorded one): the registry does not vouch for it; register the gallery again (run "
                          "extract, or a gallery change on the version's runs:/<run id>/bundle URI) and use that "
                          "version")
    return want


def _with_base(folder: Path, uri: str, have: Path | None = None, tags: dict[str, str] | None = None,
               base_root: str = "") -> Path:
    """A downloaded version of changes gets its base version downloaded into its ``base/`` (ServingBundle.load
    reads it from there; an export copies both), or linked there from ``have`` when that is the very version (its
    files' checksums are the ones the changes name; loading checks every file against them). A base is followed
    only into the same registry (models:/ or runs:/ URIs) or to a local folder under ``base_root``; a registered
    version's base bundle.json must match the registry's :data:`tracking.BASE_SHA_TAG`. A local folder is left as
    it is: its base must be in its own ``base/`` or the local folder it names (the operator's own files)."""
    if tracking.local_path(uri) is not None:
        return folder
    try:
        base = json.loads((folder / BUNDLE_JSON).read_text()).get("base") or {}
    except (OSError, ValueError, AttributeError):
        return folder  # not a bundle: ServingBundle.load says so
    base_uri = str(base.get("uri", "")) if isinstance(base, dict) else ""
    if not base:
        return folder
    local = tracking.local_path(base_uri) if base_uri else None
    if local is not None:
        if not _inside(local, base_root):
            raise BundleError(f"{uri} names a local folder as its base, outside the one this server may read bases "
                              "from (base_root): a served version's base must be in the same registry (models:/ or "
                              "runs:/), or under base_root")
        # ServingBundle.load reads a base/ the download carries before the folder named: check what it will read.
        _check_base(folder / BASE_DIR if (folder / BASE_DIR / BUNDLE_JSON).is_file() else local, uri, tags)
        return folder
    if not base_uri.startswith(("models:/", "runs:/")):
        raise BundleError(f"{uri} names its base at {redact(base_uri)}, outside the registry: a server follows a base "
                          "only to models:/ or runs:/ URIs of its own tracking server (or a local folder under "
                          "base_root)")
    if not (folder / BASE_DIR / BUNDLE_JSON).is_file():
        _place_base(folder, base_uri, base.get("files"), have)
    _check_base(folder / BASE_DIR, uri, tags)
    return folder


def _place_base(folder: Path, uri: str, files, have: Path | None) -> None:
    """Put the base version at ``uri`` into ``folder/base``: linked from ``have`` when it is that very version, else
    downloaded."""
    if have is not None and _is_whole_version(have, files):
        staging = folder / (BASE_DIR + ".link")
        try:
            shutil.copytree(have, staging, copy_function=_link_or_copy)
            staging.rename(folder / BASE_DIR)
            log.info("imgsim: base version %s linked from %s, the same version already here: not downloaded", uri,
                     have)
            return
        except (OSError, shutil.Error) as exc:  # (a file gone meanwhile, a full disk on the copy): download it
            shutil.rmtree(staging, ignore_errors=True)
            log.warning("imgsim: could not link the base version %s from %s (%s); downloading it", uri, have, exc)
    staging = folder / (BASE_DIR + ".download")
    got = _bundle_folder(tracking.download(uri, "base gallery version", staging))
    got.rename(folder / BASE_DIR)
    shutil.rmtree(staging, ignore_errors=True)


def _check_base(base: Path, uri: str, tags: dict[str, str] | None) -> None:
    """A registered version's base must be the one the registry recorded (its bundle.json's sha256)."""
    if tags is None:
        return
    want = tags.get(tracking.BASE_SHA_TAG, "")
    meta = base / BUNDLE_JSON
    got = file_sha256(meta) if meta.is_file() else ""
    if not want or got != want:
        raise BundleError(f"gallery version {uri}: its base's {BUNDLE_JSON} (sha256 {got[:12] or 'missing'}) does not "
                          f"match the registry's {tracking.BASE_SHA_TAG} tag ({want[:12] or 'not recorded'}); not "
                          "loaded")


def _inside(path: Path, root: str) -> bool:
    """Whether ``path`` lies inside the folder ``root`` ("" is no folder at all)."""
    if not root:
        return False
    try:
        return path.resolve().is_relative_to(Path(root).resolve())
    except OSError:
        return False


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
