"""Stage 1: validate every image in a class-per-folder tree and write a stratified manifest."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from imgsim import hashing
from imgsim.config import setting
from imgsim.duplicates import group_copies
from imgsim.errors import BadInput, ImgsimError
from imgsim.folders import walk_files
from imgsim.images import DEFAULT_MAX_PIXELS, decode_image
from imgsim.manifest import Item, Manifest, Rejected


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """Parameters of the split stage."""

    data_dir: str = setting("data/fashion-mnist", "the image folder: one subfolder per class, or none", "data")
    test_ratio: float = setting(0.2, "share of each class held out as test (the evaluation's queries)", "data")
    eval_ratio: float = setting(0.05, "share of each class held out as eval (picks the best epoch)", "data")
    seed: int = setting(42, "random seed of the split", "data")
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, "refuse images with more pixels (decompression bombs)", "data")
    labels: str = setting("auto", "folders: one subfolder per class; none: every image, unlabelled; auto: "
                          "folders if there are any", "data")
    # Near copies share a split, as exact copies do, so a re-encoded or resized copy cannot sit in test while
    # its original trains.
    near_duplicate_distance: int = setting(hashing.DEFAULT_HASH_DISTANCE, "images whose perceptual hashes differ "
                                           "in at most this many bits of 64 share a split; -1: exact copies only",
                                           "data")

    def __post_init__(self) -> None:
        if self.labels not in ("auto", "folders", "none"):
            raise ValueError(f"labels must be auto, folders or none, got {self.labels!r}")
        if not (0 <= self.test_ratio < 1 and 0 <= self.eval_ratio < 1 and self.test_ratio + self.eval_ratio < 1):
            raise ImgsimError(f"test_ratio={self.test_ratio} and eval_ratio={self.eval_ratio} must each be in [0, 1) "
                              "and sum to less than 1, so that some images remain for training")


@dataclasses.dataclass(frozen=True)
class _Scanned:
    path: str
    label: str
    sha256: str
    width: int
    height: int
    thumbnail: NDArray[np.uint8] = dataclasses.field(repr=False, compare=False, default=None)  # for the hash


def split_dataset(cfg: SplitConfig) -> Manifest:
    """Scan ``cfg.data_dir``, reject bad files with reasons, and split each class deterministically."""
    root = Path(cfg.data_dir).expanduser()
    if not root.is_dir():
        raise ImgsimError(f"image folder {root} does not exist or is not a folder; pass data_dir=<folder with one subfolder per class>")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and not p.is_symlink())
    if cfg.labels == "none" or (cfg.labels == "auto" and not classes):
        classes = []  # an unlabelled gallery: every image, no classes, nothing held out
    elif not classes:
        raise ImgsimError(f"image folder {root} has no class subfolders; put each class's images in {root}/<class name>/ "
                          "or set labels=none to index them unlabelled")
    candidates, rejected = _list_files(root.resolve(), classes)
    scanned: list[_Scanned] = []
    for rel, label in tqdm(candidates, desc="split: validating", unit="img", mininterval=1.0):
        try:
            scanned.append(_validate(root / rel, rel, label, cfg.max_pixels))
        except BadInput as exc:
            rejected.append(Rejected(rel, str(exc)))
        except OSError as exc:
            rejected.append(Rejected(rel, f"unreadable: {exc.strerror or exc}"))
    if not scanned:
        raise ImgsimError(f"found no usable images in {root} ({len(rejected)} file(s) rejected"
                          f"{': ' + rejected[0].reason if rejected else ''}); add JPEG, PNG, WebP, BMP, GIF or TIFF files")
    items = _assign(scanned, classes, cfg)
    params = dataclasses.asdict(cfg) | {"data_dir": str(root.resolve())}
    return Manifest(str(root.resolve()), classes, items, sorted(rejected, key=lambda r: r.path), params)


def _list_files(root: Path, classes: list[str]) -> tuple[list[tuple[str, str]], list[Rejected]]:
    """Every visible file under each class folder (nested folders count for their top-level class)."""
    found: list[tuple[str, str]] = []
    if not classes:
        return walk_files(root, root, "")
    rejected = [Rejected(p.name, "file directly in the image folder, not inside a class folder; move it into one")
                for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")]
    rejected += [Rejected(p.name, "symlinked class folder: not followed; copy the images into the image folder")
                 for p in sorted(root.iterdir()) if p.is_symlink() and p.is_dir() and not p.name.startswith(".")]
    for label in classes:
        files, bad = walk_files(root, root / label, label)
        found += files
        rejected += bad
    return found, rejected


def _validate(path: Path, rel: str, label: str, max_pixels: int) -> _Scanned:
    data = path.read_bytes()
    img = decode_image(data, max_pixels=max_pixels)
    return _Scanned(rel, label, hashlib.sha256(data).hexdigest(), img.width, img.height, hashing.grey_thumbnail(img))


def copy_groups(scanned: list[_Scanned], distance: int) -> dict[str, str]:
    """Each image's group: the sha256 of the first image (by path) it is an exact or near copy of, else its own."""
    ordered = sorted(scanned, key=lambda s: s.path)
    hashes = hashing.phash_grey(np.stack([s.thumbnail for s in ordered])) if ordered else np.zeros(0, np.uint64)
    group = {s.path: s.sha256 for s in ordered}
    for pair in group_copies([s.path for s in ordered], [s.sha256 for s in ordered], hashes, distance):
        group[pair.b] = group[pair.a]  # pairs name a group's first image, which keeps its own sha256
    return group


def _assign(scanned: list[_Scanned], classes: list[str], cfg: SplitConfig) -> list[Item]:
    """Stratify by class over groups of copies (exact, and near within ``near_duplicate_distance``), so copies
    always share a split; unlabelled: all train."""
    if not classes:
        return [Item(s.path, s.label, "train", s.sha256, s.width, s.height) for s in sorted(scanned, key=lambda s: s.path)]
    group = copy_groups(scanned, cfg.near_duplicate_distance)
    split_of: dict[str, str] = {}
    for label in classes:
        hashes = sorted({group[s.path] for s in scanned if s.label == label})
        _check_class_size(label, len(hashes), cfg)
        n_test, n_eval = _quota(len(hashes), cfg)
        forced = [h for h in hashes if h in split_of]  # duplicates already placed by another class
        n_test -= sum(split_of[h] == "test" for h in forced)
        n_eval -= sum(split_of[h] == "eval" for h in forced)
        free = [h for h in hashes if h not in split_of]
        random.Random(f"{cfg.seed}:{label}").shuffle(free)
        n_test, n_eval = max(n_test, 0), max(n_eval, 0)
        for i, h in enumerate(free):
            split_of[h] = "test" if i < n_test else "eval" if i < n_test + n_eval else "train"
    return [Item(s.path, s.label, split_of[group[s.path]], s.sha256, s.width, s.height)
            for s in sorted(scanned, key=lambda s: s.path)]


def _quota(n: int, cfg: SplitConfig) -> tuple[int, int]:
    n_test = max(1, round(n * cfg.test_ratio)) if cfg.test_ratio > 0 else 0
    n_eval = max(1, round(n * cfg.eval_ratio)) if cfg.eval_ratio > 0 else 0
    # Rounding up small classes must still leave at least one training image.
    n_test = min(n_test, n - 1 - (cfg.eval_ratio > 0))
    n_eval = min(n_eval, n - 1 - n_test)
    return n_test, n_eval


def _check_class_size(label: str, n: int, cfg: SplitConfig) -> None:
    """Documented rule: a class needs one unique image for train and one for each non-empty split."""
    needed = 1 + (cfg.test_ratio > 0) + (cfg.eval_ratio > 0)
    if n < needed:
        raise ImgsimError(
            f"class {label!r} has {n} usable image(s) after rejecting bad files and merging exact and near copies; "
            f"each class needs at least {needed} (one for train and one for each of test/eval). "
            f"Add images to that class folder, remove the folder, or set test_ratio/eval_ratio to 0."
        )
