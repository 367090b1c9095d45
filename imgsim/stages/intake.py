"""A gallery change's intake: the new files (listed by split's rules, inside the gallery's root), read and
checked, and the copies among them and against the gallery (exact by sha256, near by hash and embedding)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from imgsim import duplicates, hashing
from imgsim.bundle import ServingBundle
from imgsim.errors import BadInput, ImgsimError
from imgsim.folders import walk_files
from imgsim.index import GalleryIndex


def image_root(parent: ServingBundle, root: str) -> Path:
    chosen = root or parent.lineage.root or ""
    if not chosen:
        raise ImgsimError("this bundle does not record its image root (it predates living galleries): pass --root "
                          "DIR, the folder its gallery paths are relative to; added images must lie inside it")
    path = Path(chosen).expanduser().resolve()
    if not path.is_dir():
        raise ImgsimError(f"image root {chosen} is not a folder here; pass --root with the folder the gallery's "
                          "images live in (added images must lie inside it)")
    return path


def list_inputs(paths: list[str], folder: str, root: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The files to add, resolved; every one inside ``root`` (symlinks resolved), regular, and named once.
    A folder is walked by split's rules (hidden files and folders such as ``.thumbnails/`` are not images of
    the collection); what those rules leave out with a reason comes back as (path, why)."""
    if bool(paths) == bool(folder):
        raise ImgsimError("give the images to add: either file paths or --folder DIR (not both)")
    left_out: list[tuple[str, str]] = []
    if folder:
        top = Path(folder).expanduser().resolve()
        if not top.is_dir():
            raise ImgsimError(f"--folder {folder} is not a folder")
        if top != root and root not in top.parents:
            raise ImgsimError(f"--folder {folder} lies outside the image root {root}. Copy it under the root (or "
                              "pass --root) first; nothing was changed.")
        found, rejected = walk_files(root, top, "")
        candidates = [root / rel for rel, _ in found]
        left_out = [(r.path, r.reason) for r in rejected]
        if not candidates:
            raise ImgsimError(f"--folder {folder} holds no files to add")
    else:
        candidates = [Path(p).expanduser() for p in paths]
    outside = [str(p) for p in candidates if root not in p.resolve().parents]
    if outside:
        raise ImgsimError(f"{len(outside)} file(s) lie outside the image root {root}: {', '.join(outside[:5])}"
                          f"{', ...' if len(outside) > 5 else ''}. Copy them under the root (or pass --root) first; "
                          "nothing was changed.")
    resolved = [p.resolve() for p in candidates]
    missing = [str(p) for p, r in zip(candidates, resolved) if not r.is_file()]
    if missing:
        raise ImgsimError(f"not a file: {', '.join(missing[:5])}; nothing was changed")
    return list(dict.fromkeys(resolved)), left_out


def read_all(parent: ServingBundle, files: list[Path], max_pixels: int):
    """Model inputs and sha256 of every file, and (path, reason) for those that are not usable images."""
    preprocess = parent.spec.preprocess
    inputs = np.zeros((len(files), preprocess.channels, preprocess.size, preprocess.size), dtype=np.uint8)
    sha, errors = [], []
    for i, path in enumerate(tqdm(files, desc="gallery add: reading", unit="img", mininterval=1.0)):
        try:
            data = path.read_bytes()
            inputs[i] = preprocess.decode(data, max_pixels=max_pixels)
        except BadInput as exc:
            errors.append((str(path), str(exc)))
            data = b""
        except OSError as exc:
            errors.append((str(path), f"unreadable: {exc.strerror or exc}"))
            data = b""
        sha.append(hashlib.sha256(data).hexdigest())
    return inputs, sha, errors


@dataclasses.dataclass(frozen=True)
class Found:
    pair: duplicates.Pair
    b_index: int  # the new image's position among those embedded


def drop_exact(index: GalleryIndex, rel: list[str], sha: list[str]) -> tuple[list[int], list, list]:
    """Rows of the files to embed: not byte-identical to a gallery image or to an earlier file of this change."""
    in_gallery = {item.sha256: item for item in index.items}
    seen: dict[str, int] = {}
    keep, skipped, pairs = [], [], []
    for i, (path, digest) in enumerate(zip(rel, sha)):
        if digest in in_gallery:
            item = in_gallery[digest]
            skipped.append((path, f"exact copy of gallery image {item.id} ({item.path})"))
            pairs.append(Found(duplicates.Pair(item.path, path, "exact", 0, None, item.id, None), -1))
        elif digest in seen:
            skipped.append((path, f"exact copy of {rel[seen[digest]]}, added in this change"))
            pairs.append(Found(duplicates.Pair(rel[seen[digest]], path, "exact", 0, None), -1))
        else:
            seen[digest] = i
            keep.append(i)
    return keep, skipped, pairs


def near_copies(index: GalleryIndex, rel: list[str], hashes: NDArray[np.uint64], embeddings: NDArray[np.float32],
                hash_distance: int, embedding_distance: float) -> list[Found]:
    """Each new image's closest near copy, in the gallery or earlier in this change (hash within
    ``hash_distance`` bits and embeddings within ``embedding_distance``)."""
    best: dict[int, tuple[int, float, Found]] = {}
    if hash_distance < 0:
        return []
    known = np.asarray([bool(item.phash) for item in index.items])  # older bundles have no hashes
    gallery_hashes = np.zeros(len(index.items), dtype=np.uint64)
    gallery_hashes[known] = hashing.from_hex([item.phash for item in index.items if item.phash])
    vectors = np.asarray(index.embeddings)
    # Embedding first (one matrix product per block of new images), hash on those candidates only: comparing
    # every hash pair would cost new x gallery popcounts.
    for start in range(0, len(embeddings), 256):
        cosine = 1.0 - embeddings[start:start + 256] @ vectors.T
        i, j = np.nonzero((cosine <= embedding_distance) & known[None, :])
        bits = hashing.hamming(hashes[start + i], gallery_hashes[j])
        close = bits <= hash_distance
        for a, b, d, cos in zip(start + i[close], j[close], bits[close], cosine[i[close], j[close]]):
            if a not in best or (d, cos) < best[a][:2]:
                item = index.items[b]
                best[a] = (int(d), float(cos), Found(duplicates.Pair(item.path, rel[a], "near", int(d), float(cos),
                                                                 item.id, None), int(a)))
    for a, b, d in hashing.near_pairs(hashes, hash_distance):  # a < b: the later file is the copy
        cos = float(1.0 - np.dot(embeddings[a], embeddings[b]))
        if cos <= embedding_distance and (b not in best or (d, cos) < best[b][:2]):
            best[b] = (int(d), cos, Found(duplicates.Pair(rel[a], rel[b], "near", int(d), cos), int(b)))
    return [found for _, _, found in (best[i] for i in sorted(best))]


def distances(pair: duplicates.Pair) -> str:
    return f"hash distance {pair.hash_distance}, cosine distance {pair.cosine_distance:.4f}"
