"""Write Fashion-MNIST (Debian's IDX files, or torchvision's download) out as a class-per-folder PNG tree."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from imgsim import atomic
from imgsim.errors import ImgsimError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
PARTS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ImgsimError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_source(source: str | None = None) -> Path:
    """The folder holding the IDX files: ``source``, Debian's package, or torchvision's download."""
    for folder in [Path(source)] if source else [DEBIAN_DIR]:
        if all(_idx(folder, name) for pair in PARTS.values() for name in pair):
            return folder
    if source:
        raise ImgsimError(f"no Fashion-MNIST IDX files in {source}")
    try:  # internet fallback where the Debian package is not available
        from torchvision.datasets import FashionMNIST

        cache = Path(os.environ.get("IMGSIM_CACHE", "~/.cache/imgsim")).expanduser()
        FashionMNIST(str(cache), download=True)
        return cache / "FashionMNIST" / "raw"
    except Exception as exc:  # noqa: BLE001 - any download failure means the same thing to the user
        raise ImgsimError("Fashion-MNIST not found: install it with 'apt-get install dataset-fashion-mnist' "
                          f"(files in {DEBIAN_DIR}) or allow torchvision to download it ({exc})") from None


def prepare(out_dir: str | Path, *, source: str | None = None, per_class: int = 0) -> Path:
    """Write ``<out>/<class>/<part>-<index>.png``; ``per_class`` > 0 keeps only that many per class and part."""
    folder, out = find_source(source), Path(out_dir)
    if (out / ".complete").exists() and (out / ".complete").read_text() == str(per_class):
        return out
    with atomic.atomic_dir(out) as tmp:
        for part, (images_name, labels_name) in PARTS.items():
            images, labels = read_idx(_idx(folder, images_name)), read_idx(_idx(folder, labels_name))
            keep = _keep(labels, per_class)
            for i in tqdm(keep, desc=f"prepare: {part}", unit="img", mininterval=1.0):
                target = tmp / CLASSES[labels[i]] / f"{part}-{i:05d}.png"
                target.parent.mkdir(exist_ok=True)
                Image.fromarray(images[i], mode="L").save(target, optimize=False)
        (tmp / ".complete").write_text(str(per_class))
    return out


def _idx(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.exists():
            return candidate
    return None


def _keep(labels: np.ndarray, per_class: int) -> np.ndarray:
    if not per_class:
        return np.arange(len(labels))
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASSES))]))
