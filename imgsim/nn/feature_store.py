"""Pooled backbone features kept per image, keyed by the file's sha256 and the backbone's fingerprint
(:func:`imgsim.nn.trunk.fingerprint`): head-mode training keeps the plain view of every image it embeds, and extract
runs only the head on them, so no image goes through the backbone twice."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from imgsim import atomic, hashing
from imgsim.errors import ImgsimError
from imgsim.images import Preprocess
from imgsim.manifest import Item
from imgsim.nn import allocator
from imgsim.nn.data import ImageFiles, make_loader
from imgsim.nn.model import EmbeddingNet
from imgsim.nn.trunk import Trunk, fingerprint


class FeatureStore:
    """A folder of parts, each a features file (``<key>-<part>.npy``, memory-mapped when read) and its ids
    (``<key>-<part>.ids.npz``: sha256 and perceptual hash per row), written ids last so a part is whole or absent.
    No folder: nothing is kept and every lookup misses. The store only saves work: a damaged part is a miss, and a
    part that cannot be written is a warning."""

    def __init__(self, folder: str | Path | None, key: str) -> None:
        self.folder, self.key = (Path(folder) if folder else None), key
        self._rows: list[NDArray[np.float32]] = []
        self._where: dict[str, tuple[int, int, str]] = {}  # sha256 -> (part, row, perceptual hash)
        self.width: int | None = None
        for ids in sorted(self.folder.glob(f"{key}-*.ids.npz")) if self.folder and self.folder.is_dir() else []:
            try:
                with np.load(ids, allow_pickle=False) as d:
                    shas, hashes = d["sha256"], d["phash"]
                    if shas.ndim != 1 or hashes.shape != shas.shape:
                        continue
                    shas, hashes = [str(x) for x in shas], [str(x) for x in hashes]
                rows = np.load(ids.with_name(ids.name[:-len(".ids.npz")] + ".npy"), mmap_mode="r")
            except Exception:  # noqa: BLE001 - any damage (truncated zip, bad header) is a miss, not an error
                continue
            if rows.ndim != 2 or rows.dtype != np.float32 or len(rows) != len(shas) or \
                    rows.shape[1] != (self.width or rows.shape[1]):
                continue
            part, self.width = len(self._rows), rows.shape[1]
            self._rows.append(rows)
            self._where.update({s: (part, r, h) for r, (s, h) in enumerate(zip(shas, hashes))})

    def __len__(self) -> int:
        return len(self._where)

    def find(self, shas: Sequence[str]) -> tuple[NDArray[np.bool_], list[str]]:
        """Which of ``shas`` are kept, and the perceptual hashes of those (in order)."""
        found = np.array([s in self._where for s in shas], dtype=bool)
        return found, [self._where[s][2] for s in shas if s in self._where]

    def read_into(self, shas: Sequence[str], out: NDArray[np.float32], rows: NDArray[np.int64]) -> None:
        """Copy the kept features of ``shas`` (all kept) into rows ``rows`` of ``out``, one indexed read per part."""
        spots = np.array([self._where[s][:2] for s in shas], dtype=np.int64).reshape(-1, 2)
        for part in np.unique(spots[:, 0]):
            mine = np.flatnonzero(spots[:, 0] == part)
            out[rows[mine]] = self._rows[part][spots[mine, 1]]

    def put(self, shas: Sequence[str], features: NDArray[np.float32], hashes: Sequence[str]) -> None:
        """Keep new rows as one more part (nothing without a folder or rows)."""
        if self.folder is None or not len(shas):
            return
        # Named by content: the same images give the same part, so two processes keeping them write equal files.
        stem = f"{self.key}-{hashlib.sha256(''.join(shas).encode()).hexdigest()[:16]}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic.atomic_path(self.folder / f"{stem}.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, np.ascontiguousarray(features, dtype=np.float32))
            with atomic.atomic_path(self.folder / f"{stem}.ids.npz") as tmp, open(tmp, "wb") as fh:
                np.savez(fh, sha256=np.asarray(shas, dtype="U64"), phash=np.asarray(hashes, dtype="U16"))
        except OSError as exc:
            print(f"warning: the feature store {self.folder} could not keep {len(shas)} images' features "
                  f"({exc.strerror or exc}); they will be embedded again next time")


def _unchanged(items: Sequence[Item], root: str | Path) -> None:
    """Kept features stand for a file's bytes: a file changed or gone since split is refused, as decoding would."""
    for item in items:
        path = Path(root) / item.path
        try:
            if hashlib.sha256(path.read_bytes()).hexdigest() != item.sha256:
                raise ImgsimError(f"cannot use {path}: its content changed since split. Run split again so the "
                                  "manifest matches the folder.")
        except OSError as exc:
            raise ImgsimError(f"cannot use {path}: {exc.strerror or exc}. Run split again so the manifest matches "
                              "the folder.") from None


def item_features(items: Sequence[Item], root: str | Path, preprocess: Preprocess, trunk: Trunk,
                  store: FeatureStore, *, batch: int = 64, workers: int | None = None, desc: str = "embedding",
                  keep_new: bool = True) -> tuple[NDArray[np.float32], list[str], int]:
    """The features and perceptual hashes of ``items``: kept ones from the store, the rest decoded (in workers)
    and run through the backbone, then kept (``keep_new``). Returns them with how many images went through the
    backbone."""
    allocator.keep_freed_memory()
    shas = [it.sha256 for it in items]
    found, kept_hashes = store.find(shas)
    _unchanged([it for it, hit in zip(items, found) if hit], root)
    missing = [items[i] for i in np.flatnonzero(~found)]
    new_rows: list[NDArray[np.float32]] = []
    new_hashes: list[str] = []
    if missing:
        for images, _ in tqdm(make_loader(ImageFiles(missing, root, preprocess), batch, workers=workers),
                              desc=desc, unit="batch", mininterval=1.0):
            batch_images = images.numpy()
            new_hashes.extend(hashing.to_hex(hashing.phash_inputs(batch_images)))
            new_rows.append(trunk(batch_images))
    new = np.concatenate(new_rows) if new_rows else None
    if new is not None and keep_new:
        store.put([it.sha256 for it in missing], new, new_hashes)
    width = store.width if found.any() else new.shape[1] if new is not None else 0
    features = np.empty((len(items), width), dtype=np.float32)
    if found.any():
        store.read_into([s for s, hit in zip(shas, found) if hit], features, np.flatnonzero(found))
    if new is not None:
        features[~found] = new
    hashes = [""] * len(items)
    for where, row_hashes in ((found, kept_hashes), (~found, new_hashes)):
        for i, h in zip(np.flatnonzero(where), row_hashes):
            hashes[i] = h
    return features, hashes, len(missing)


def head_outputs(model: EmbeddingNet, features: NDArray[np.float32], batch: int = 4096
                 ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Normalised embeddings and logits from pooled features: the rest of the network after the backbone."""
    model = model.cpu().eval()
    embeddings = np.empty((len(features), model.dim), dtype=np.float32)
    logits = np.empty((len(features), model.args.num_classes), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(features), batch):
            emb, logit = model.embed_features(torch.from_numpy(np.ascontiguousarray(features[start:start + batch])))
            embeddings[start:start + len(emb)], logits[start:start + len(emb)] = emb.numpy(), logit.numpy()
    return embeddings, logits


DEFAULT_FOLDER = "checkpoints/features"


def open_store(folder: str | Path | None, model: EmbeddingNet) -> FeatureStore:
    """``model``'s store in ``folder`` (the ``feature_store`` setting: None is :func:`store_folder`'s choice;
    empty keeps nothing)."""
    return FeatureStore(store_folder(folder), fingerprint(model))


def store_folder(folder: str | Path | None) -> str | Path:
    """The feature store's folder: as given, or left auto, $IMGSIM_FEATURE_STORE, else DEFAULT_FOLDER."""
    if folder is None:
        return os.environ.get("IMGSIM_FEATURE_STORE") or DEFAULT_FOLDER
    return folder
