"""A version of changes finding its base version: where the base is, and that it is exactly the version the changes
were made on; and a bundle's index read without its model, put together with its base."""

from __future__ import annotations

from pathlib import Path

from imgsim.bundle_format import BASE_DIR, BUNDLE_JSON, BundleError, index_backend, read_meta
from imgsim.changes import Changes
from imgsim.index import GalleryIndex


def base_folder(pinned: Path, folder: str | Path, meta: dict, given: str | Path | None) -> Path:
    """Where the base version of a version of changes is: given, inside it, or the local folder it names."""
    if given is not None:
        return Path(given)
    if (pinned / BASE_DIR / BUNDLE_JSON).is_file():
        return pinned / BASE_DIR
    uri = str(meta["base"].get("uri", "")) if isinstance(meta["base"], dict) else ""
    local = Path(uri.removeprefix("file://")) if uri and (uri.startswith("file://") or ":/" not in uri) else None
    if local is not None and (local / BUNDLE_JSON).is_file():
        return local
    raise BundleError(f"{folder} holds the changes of a gallery version over its base version {uri or '(unnamed)'}, "
                      "which is not here: load it by its runs:/ or models:/ URI (imgsim fetches the base with it), "
                      "or export it (imgsim export --uri URI --out DIR writes one folder with its base)")


def base_meta(base: Path, name: str | Path, meta: dict, folder: str | Path) -> dict:
    """The bundle.json of the base of the changes in ``folder``, refused unless it is exactly the base they name."""
    found = read_meta(base, name)
    if found.get("base"):
        raise BundleError(f"{name}, the base of {folder}, is itself a version of changes; a base must hold a whole "
                          "gallery. Export the version again.")
    if found.get("files") != meta["base"].get("files"):
        raise BundleError(f"{name} is not the gallery version the changes in {folder} were made on (its files' "
                          f"checksums differ from those bundle.json names for {meta['base'].get('uri') or 'its base'})"
                          ": fetch that version as its base")
    return found


def load_index(folder: str | Path) -> tuple[GalleryIndex, Path]:
    """A bundle's index without its model (exploring and finding duplicates need only vectors; no checksum is
    computed), a version of changes put together with its base; and the folder that holds the model files."""
    meta = read_meta(folder)
    n_trees, next_id = int(meta["index"]["n_trees"]), int(meta["index"].get("next_id", -1))
    if not meta.get("base"):
        return GalleryIndex.load(folder, n_trees=n_trees, next_id=next_id, backend=index_backend(meta)), Path(folder)
    base = base_folder(Path(folder), folder, meta, None)
    base_meta(base, base, meta, folder)
    index = GalleryIndex.load(base, n_trees=n_trees, next_id=next_id, backend=index_backend(meta))
    return Changes.load(index, Path(folder)).index(next_id), base
