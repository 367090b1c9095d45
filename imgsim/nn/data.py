"""Streaming image data: a Dataset that decodes one file per item, DataLoaders, and an on-disk cache for small images."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from imgsim import atomic
from imgsim.errors import BadInput, ImgsimError
from imgsim.images import DEFAULT_MAX_PIXELS, Preprocess
from imgsim.manifest import Item

Transform = Callable[[torch.Tensor], torch.Tensor]


class ImageFiles(Dataset):
    """Manifest items decoded on demand (in DataLoader workers): (uint8 C x H x W tensor, label id)."""

    def __init__(self, items: Sequence[Item], root: str | Path, preprocess: Preprocess, *,
                 labels: NDArray[np.int64] | None = None, size: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.items, self.root, self.preprocess = list(items), Path(root), preprocess
        self.labels = labels if labels is not None else np.full(len(self.items), -1, dtype=np.int64)
        self.size, self.max_pixels = size or preprocess.size, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.read(i)), int(self.labels[i])

    def read(self, i: int) -> NDArray[np.uint8]:
        """One preprocessed image; the file must be unchanged since split."""
        item = self.items[i]
        path = self.root / item.path
        try:
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != item.sha256:
                raise BadInput("its content changed since split")
            return self.preprocess.decode(data, self.size, max_pixels=self.max_pixels)
        except (OSError, BadInput) as exc:
            raise ImgsimError(f"cannot use {path}: {exc}. Run split again so the manifest matches the folder.") from None

    def key(self) -> str:
        """Identifies the decoded content: the same files at the same preprocessing give the same key."""
        digest = hashlib.sha256(json.dumps([self.preprocess.size, self.preprocess.channels, self.preprocess.resize,
                                            self.size]).encode())
        for item in self.items:
            digest.update(item.sha256.encode())
        return digest.hexdigest()[:16]


class ImageArray(Dataset):
    """Already decoded images (an in-memory or memory-mapped uint8 array) with their labels."""

    def __init__(self, images: NDArray[np.uint8], labels: NDArray[np.int64]) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.array(self.images[i])), int(self.labels[i])

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # One fancy-indexed read per batch instead of one per image: the cache path stays as fast as a plain array.
        order = np.asarray(indices)
        return torch.from_numpy(self.images[order]), torch.from_numpy(self.labels[order])


class Transformed(Dataset):
    """Applies a per-image transform (augmentation) to another dataset's images, in the loader's workers."""

    def __init__(self, base: Dataset, transform: Transform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[i]
        return self.transform(image), label


def default_workers() -> int:
    """Decode workers: all cores but one, at most 4 (0 = decode in the main process on a 1-core machine)."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def make_loader(dataset: Dataset, batch_size: int, *, order: Sequence[int] | None = None, workers: int | None = None,
                seed: int = 0) -> DataLoader:
    """A DataLoader over ``dataset`` in ``order`` (default: as stored); ``workers`` None: :func:`default_workers`."""
    workers = default_workers() if workers is None else workers
    batched = isinstance(dataset, ImageArray)  # already decoded: batches come from one array read, no workers needed
    return DataLoader(dataset, batch_size=batch_size, sampler=list(order) if order is not None else None,
                      num_workers=0 if batched else workers, collate_fn=_identity if batched else None,
                      persistent_workers=False, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(seed))


def _identity(batch):
    return batch


def cache_images(dataset: ImageFiles, folder: str | Path, *, workers: int | None = None, desc: str = "decoding") -> ImageArray:
    """Decode ``dataset`` once into a memory-mapped uint8 file under ``folder`` (reused while the files and the
    preprocessing are unchanged); pages are read on demand, so it never has to fit in memory."""
    path = Path(folder) / f"images-{dataset.key()}.npy"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = (len(dataset), dataset.preprocess.channels, dataset.size, dataset.size)
        with atomic.atomic_path(path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            _fill(out, dataset, workers, desc)
            out.flush()
            del out
    return ImageArray(np.load(path, mmap_mode="r"), dataset.labels)


def load_items(items: Sequence[Item], root: str | Path, preprocess: Preprocess, *, desc: str = "loading",
               max_pixels: int = DEFAULT_MAX_PIXELS, workers: int | None = None) -> NDArray[np.uint8]:
    """Decode ``items`` under ``root`` into an in-memory (N, C, H, W) uint8 array (for small sets: baselines, tests)."""
    dataset = ImageFiles(items, root, preprocess, max_pixels=max_pixels)
    out = np.empty((len(items), preprocess.channels, preprocess.size, preprocess.size), dtype=np.uint8)
    return _fill(out, dataset, workers, desc)


def _fill(out: NDArray[np.uint8], dataset: ImageFiles, workers: int, desc: str) -> NDArray[np.uint8]:
    """Decode ``dataset`` in loader order into the preallocated ``out`` (in memory or memory-mapped)."""
    start = 0
    for images, _ in tqdm(make_loader(dataset, 256, workers=workers), desc=desc, unit="batch", mininterval=1.0):
        out[start:start + len(images)] = images.numpy()
        start += len(images)
    return out


def label_ids(items: Sequence[Item], classes: Sequence[str]) -> NDArray[np.int64]:
    """Class indices for ``items`` in the order of ``classes`` (-1 for unlabelled items)."""
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index.get(item.label, -1) for item in items], dtype=np.int64)


def channel_stats(dataset: Dataset, n: int = 2000, seed: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (images scaled to [0, 1]) over a sample of ``n`` images, for normalisation."""
    pick = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:n])
    sums = None
    for images, _ in make_loader(dataset, 256, order=pick.tolist()):
        x = images.double().div_(255.0).transpose(0, 1).reshape(images.shape[1], -1)
        part = torch.stack([x.sum(1), (x * x).sum(1), torch.full((x.shape[0],), float(x.shape[1]), dtype=torch.float64)])
        sums = part if sums is None else sums + part
    mean = sums[0] / sums[2]
    std = torch.clamp(torch.sqrt(torch.clamp(sums[1] / sums[2] - mean * mean, min=0)), min=1e-3)
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)
