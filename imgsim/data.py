"""Load a manifest's images into memory as uint8 arrays, decoded once with the model's preprocessing."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from imgsim.errors import BadInput, ImgsimError
from imgsim.images import DEFAULT_MAX_PIXELS, Preprocess, decode_image
from imgsim.manifest import Item


def load_items(items: Sequence[Item], root: str | Path, preprocess: Preprocess, *, desc: str = "loading",
               max_pixels: int = DEFAULT_MAX_PIXELS) -> NDArray[np.uint8]:
    """Decode ``items`` under ``root`` into an (N, C, H, W) uint8 array; files must be unchanged since split."""
    out = np.empty((len(items), preprocess.channels, preprocess.size, preprocess.size), dtype=np.uint8)
    root = Path(root)
    for i, item in enumerate(tqdm(items, desc=desc, unit="img", mininterval=1.0)):
        path = root / item.path
        try:
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != item.sha256:
                raise BadInput("its content changed since split")
            out[i] = preprocess.to_array(decode_image(data, max_pixels=max_pixels))
        except (OSError, BadInput) as exc:
            raise ImgsimError(f"cannot use {path}: {exc}. Run split again so the manifest matches the folder.") from None
    return out


def label_ids(items: Sequence[Item], classes: Sequence[str]) -> NDArray[np.int64]:
    """Class indices for ``items`` in the order of ``classes``."""
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[item.label] for item in items], dtype=np.int64)


def channel_stats(images: NDArray[np.uint8]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of images scaled to [0, 1], for normalisation inside the model."""
    scaled = images.astype(np.float32).transpose(1, 0, 2, 3).reshape(images.shape[1], -1) / 255.0
    std = np.maximum(scaled.std(axis=1), 1e-3)
    return tuple(round(float(m), 4) for m in scaled.mean(axis=1)), tuple(round(float(s), 4) for s in std)
