"""A bundle's gallery for exploring: its index, class names and images, without opening the model."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from imgsim.bundle_base import load_index
from imgsim.bundle_format import read_meta
from imgsim.errors import BadInput
from imgsim.index import DEFAULT_SEARCH_K, GalleryIndex
from imgsim.modelspec import ModelSpec


@dataclasses.dataclass
class Gallery:
    """A bundle's index and where its images are, loaded without a model (exploring needs only vectors)."""

    index: GalleryIndex
    root: Path | None
    search_k: int
    n_trees: int
    classes: list[str]
    folder: Path | None = None  # the bundle's folder, for in-process search
    download: tempfile.TemporaryDirectory | None = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def open(cls, folder: str | Path, root: str | Path | None = None) -> "Gallery":
        """The index (memory-mapped), the class names and the image root; no model is opened."""
        meta = read_meta(folder)
        index, model_folder = load_index(folder)
        found = root or (meta.get("gallery") or {}).get("root")
        return cls(index, Path(found) if found else None, int(meta["index"].get("search_k", DEFAULT_SEARCH_K)),
                   index.n_trees, list(ModelSpec.load(model_folder).classes), Path(folder))

    @classmethod
    def fetch(cls, uri: str, root: str | Path | None = None) -> tuple["Gallery", str]:
        """The gallery behind any bundle URI (folder, runs:/, models:/) and its registry version or "". A download
        is held by the gallery (its index is memory-mapped) and deleted with it or when the kernel exits."""
        from imgsim.runs import tracking
        from imgsim.runs.export import resolve_bundle

        download = None if tracking.local_path(uri) is not None else tempfile.TemporaryDirectory(prefix="imgsim-")
        folder, version = resolve_bundle(uri, download.name if download else None)
        gallery = cls.open(folder, root)
        gallery.download = download
        return gallery, version

    def sample(self, n: int, seed: int = 0) -> NDArray[np.int64]:
        """``n`` rows spread at random over the gallery (all of them if it is smaller)."""
        return np.sort(np.random.default_rng(seed).permutation(len(self.index.items))[:n])

    def thumbnail(self, row: int, side: int = 64) -> Image.Image | None:
        from imgsim.images import decode_image

        if self.root is None:
            return None
        try:
            img = decode_image((self.root / self.index.items[row].path).read_bytes(), draft=side)
        except (OSError, BadInput):  # a missing or corrupt gallery file: a blank tile, not a crashed map
            return None
        img.thumbnail((side, side))
        return img
