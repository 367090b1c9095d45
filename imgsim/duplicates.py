"""Duplicate finding: exact copies (sha256) and near copies (perceptual hash, confirmed by embedding distance)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from imgsim import atomic
from imgsim.errors import BadInput, ImgsimError
from imgsim.hashing import DEFAULT_HASH_DISTANCE, HASH_SIDE, from_hex, grey_thumbnail, near_pairs, phash_grey
from imgsim.images import DEFAULT_MAX_PIXELS

# ...and their embeddings lie this close: either alone calls two sandals or two blank images copies, both rarely.
DEFAULT_EMBEDDING_DISTANCE = 0.05


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two images that are copies of each other: ``exact`` (same bytes) or ``near``."""

    a: str
    b: str
    kind: str
    hash_distance: int | None = None
    cosine_distance: float | None = None
    a_id: int | None = None  # gallery ids, when the images are gallery items
    b_id: int | None = None


@dataclasses.dataclass
class DuplicateReport:
    """Pairs and the groups they link (every image connected through pairs), over images named by path."""

    pairs: list[Pair]
    scanned: int
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # unreadable files, with the reason

    @property
    def groups(self) -> list[list[str]]:
        # An exact copy of a grouped image joins that image's group: pairs link each copy to one image.
        return connected_groups([(p.a, p.b) for p in self.pairs])

    def counts(self) -> dict[str, int]:
        groups = self.groups
        return {"scanned": self.scanned, "exact_pairs": sum(p.kind == "exact" for p in self.pairs),
                "near_pairs": sum(p.kind == "near" for p in self.pairs), "groups": len(groups),
                "images_in_groups": sum(len(g) for g in groups), "unreadable": len(self.skipped)}

    def write(self, out_dir: str | Path, root: str | Path | None = None, max_pictures: int = 24) -> dict[str, Path]:
        """``duplicates.csv`` (one row per pair, with its group) and ``duplicates.png`` (the closest pairs side by
        side; images read from ``root`` when it is given and they exist)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        group_of = {path: g for g, members in enumerate(self.groups) for path in members}
        with atomic.atomic_path(out / "duplicates.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["group", "kind", "a", "b", "a_id", "b_id", "hash_distance", "cosine_distance"])
            for p in sorted(self.pairs, key=lambda p: (group_of[p.a], p.a, p.b)):
                writer.writerow([group_of[p.a], p.kind, p.a, p.b, _blank(p.a_id), _blank(p.b_id),
                                 _blank(p.hash_distance), "" if p.cosine_distance is None else f"{p.cosine_distance:.5f}"])
        files = {"csv": out / "duplicates.csv"}
        if self.pairs and root is not None:
            files["png"] = pair_picture(self.pairs[:max_pictures] if len(self.pairs) <= max_pictures else
                                        _spread(self.pairs, max_pictures), Path(root), out / "duplicates.png")
        return files


def _blank(value) -> str:
    return "" if value is None else str(value)


def _spread(pairs: list[Pair], n: int) -> list[Pair]:
    """Exact pairs first, then near pairs from closest to farthest, evenly picked so the picture shows the range."""
    ordered = sorted(pairs, key=lambda p: (p.kind != "exact", p.hash_distance or 0, p.cosine_distance or 0.0))
    return [ordered[i] for i in np.linspace(0, len(ordered) - 1, n).astype(int)]


def pair_picture(pairs: Sequence[Pair], root: Path, out: Path) -> Path:
    """A PNG of image pairs side by side with their kind and distances."""
    from imgsim.images import decode_image
    from imgsim.plots import pair_grid

    def load(path: str) -> Image.Image | None:
        try:
            return decode_image((root / path).read_bytes(), draft=128)
        except (OSError, BadInput):
            return None

    rows = [(load(p.a), p.a, load(p.b), p.b, _caption(p)) for p in pairs]
    return pair_grid(rows, out)


def _caption(p: Pair) -> str:
    parts = [p.kind] + ([f"hash {p.hash_distance}"] if p.hash_distance is not None else []) + \
        ([f"cos {p.cosine_distance:.3f}"] if p.cosine_distance is not None else [])
    return ", ".join(parts)


def connected_groups(edges: Iterable[tuple[str, str]]) -> list[list[str]]:
    """Connected components of an undirected graph, each sorted, largest first (union-find)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[str, list[str]] = {}
    for x in parent:
        groups.setdefault(find(x), []).append(x)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: (-len(g), g[0]))


def group_copies(names: Sequence[str], sha: Sequence[str], hashes: NDArray[np.uint64], hash_distance: int,
                 embeddings: NDArray[np.float32] | None = None,
                 embedding_distance: float = DEFAULT_EMBEDDING_DISTANCE,
                 ids: Sequence[int] | None = None) -> list[Pair]:
    """Copies among one set of images, as (first of its group, copy) pairs.

    Exact copies (same sha256) always group. Near copies: hashes within ``hash_distance`` bits and, with
    ``embeddings``, cosine distance within ``embedding_distance``. Groups are grown around a leader (the first
    image, in the given order, not yet grouped) from the images near *it*, not chained through neighbours of
    neighbours: chaining joins thousands of merely similar images (11,147 of Fashion-MNIST's at 4 bits)."""
    first: dict[str, int] = {}
    copy_of = np.arange(len(names))
    for i, s in enumerate(sha):
        copy_of[i] = first.setdefault(s, i)
    distinct = np.flatnonzero(copy_of == np.arange(len(names)))
    near: dict[int, list[tuple[int, int, float | None]]] = {}
    for a, b, d in near_pairs(hashes[distinct], hash_distance):
        a, b = int(distinct[a]), int(distinct[b])
        cos = None if embeddings is None else float(1.0 - np.dot(embeddings[a], embeddings[b]))
        if cos is None or cos <= embedding_distance:
            near.setdefault(a, []).append((b, int(d), cos))
            near.setdefault(b, []).append((a, int(d), cos))
    leader = np.full(len(names), -1)
    pairs: list[Pair] = []
    for i in distinct:
        if leader[i] >= 0:
            continue
        leader[i] = i
        for j, d, cos in sorted(near.get(int(i), ())):
            if leader[j] < 0:
                leader[j] = i
                pairs.append(_pair(names, ids, int(i), j, "near", d, cos))
    for i in np.flatnonzero(copy_of != np.arange(len(names))):
        pairs.append(_pair(names, ids, int(copy_of[i]), int(i), "exact", 0, None))
    return pairs


def _pair(names, ids, a: int, b: int, kind: str, d: int | None, cos: float | None) -> Pair:
    return Pair(names[a], names[b], kind, d, cos, None if ids is None else int(ids[a]),
                None if ids is None else int(ids[b]))


def scan_folder(folder: str | Path, max_pixels: int) -> tuple[list[str], list[str], NDArray[np.uint64], list[tuple[str, str]]]:
    """Every image file below ``folder``, listed by split's rules (hidden files skipped, symlinks out of it and
    symlinked folders not followed): relative paths, sha256, perceptual hashes, and the files left out, with
    the reason."""
    from tqdm import tqdm

    from imgsim.folders import walk_files
    from imgsim.images import decode_image

    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise ImgsimError(f"{folder} is not a folder; give the folder of images to check")
    files, rejected = walk_files(root, root, "")
    paths, sha, thumbs, skipped = [], [], [], [(r.path, r.reason) for r in rejected]
    for rel, _ in tqdm(files, desc="duplicates: hashing", unit="img", mininterval=1.0):
        try:
            data = (root / rel).read_bytes()
            thumbs.append(grey_thumbnail(decode_image(data, max_pixels=max_pixels, draft=HASH_SIDE)))
        except (BadInput, OSError) as exc:
            skipped.append((rel, str(exc)))
            continue
        paths.append(rel)
        sha.append(hashlib.sha256(data).hexdigest())
    hashes = phash_grey(np.stack(thumbs)) if thumbs else np.zeros(0, dtype=np.uint64)
    return paths, sha, hashes, skipped


def find_in_folder(folder: str | Path, hash_distance: int = DEFAULT_HASH_DISTANCE,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> DuplicateReport:
    """Exact and near duplicate groups among the images below ``folder`` (perceptual hash only: no model)."""
    paths, sha, hashes, skipped = scan_folder(folder, max_pixels)
    return DuplicateReport(group_copies(paths, sha, hashes, hash_distance), len(paths), skipped)


def find_in_bundle(folder: str | Path, hash_distance: int = DEFAULT_HASH_DISTANCE,
                   embedding_distance: float = DEFAULT_EMBEDDING_DISTANCE) -> tuple[DuplicateReport, Path | None]:
    """Exact and near duplicate groups among a gallery's items, from what the bundle stores (sha256, perceptual
    hash, embedding): no image is read. Also returns the gallery's image root, if recorded."""
    from imgsim.bundle_base import load_index
    from imgsim.bundle_format import read_meta

    meta = read_meta(folder)
    index = load_index(folder)[0]
    if not all(item.phash for item in index.items):
        raise ImgsimError(f"bundle {folder} has no perceptual hashes (made before imgsim stored them): run extract "
                          "again, or run 'imgsim duplicates' on the image folder")
    items = index.items
    pairs = group_copies([i.path for i in items], [i.sha256 for i in items], from_hex([i.phash for i in items]),
                         hash_distance, np.asarray(index.embeddings), embedding_distance, [i.id for i in items])
    root = (meta.get("gallery") or {}).get("root")
    return DuplicateReport(pairs, len(items)), Path(root) if root else None
