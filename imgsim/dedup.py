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

HASH_SIDE = 32  # the image is reduced to 32 x 32 grey levels, then the 8 x 8 lowest DCT frequencies are kept
# Near copies: at most this many of the 64 perceptual-hash bits differ. Re-encoding (JPEG quality 75), a
# resize to half or a 1% crop moves 0-4 bits; different Fashion-MNIST garments of one class rarely come
# within 4 (bench/duplicates.py reports the counts). 0 keeps only hash-identical pairs; -1 turns it off.
DEFAULT_HASH_DISTANCE = 4
# ...and, where embeddings exist, the two images' embeddings lie within this cosine distance: a
# classification embedding alone would call any two sandals near copies, the hash alone would call two
# blank images near copies; both together are rarely wrong.
DEFAULT_EMBEDDING_DISTANCE = 0.05
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _dct_matrix(n: int = HASH_SIDE) -> NDArray[np.float64]:
    k = np.arange(n)[:, None]
    matrix = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2 / n)
    matrix[0] /= np.sqrt(2)
    return matrix


_DCT = _dct_matrix()


def phash_grey(grey: NDArray[np.uint8]) -> NDArray[np.uint64]:
    """64-bit DCT perceptual hashes of (N, 32, 32) grey images: bit set where a low frequency is above the
    median of the 64 (the same construction as imagehash.phash)."""
    low = _DCT[:8]  # only the 8 lowest frequencies of each axis are kept: two small matrix products
    coeffs = (low @ grey.astype(np.float64) @ low.T).reshape(len(grey), 64)
    bits = coeffs > np.median(coeffs, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64).ravel()


def grey_thumbnail(img: Image.Image) -> NDArray[np.uint8]:
    """The 32 x 32 grey levels a hash is computed from."""
    return np.asarray(img.convert("L").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BILINEAR), dtype=np.uint8)


def phash_images(images: Iterable[Image.Image]) -> NDArray[np.uint64]:
    """Perceptual hashes of decoded images."""
    thumbs = [grey_thumbnail(img) for img in images]
    return phash_grey(np.stack(thumbs)) if thumbs else np.zeros(0, dtype=np.uint64)


def phash_inputs(inputs: NDArray[np.uint8]) -> NDArray[np.uint64]:
    """Perceptual hashes of model inputs (N, C, H, W): what extract and gallery add store per item."""
    if not len(inputs):
        return np.zeros(0, dtype=np.uint64)
    images = [Image.fromarray(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)) for x in inputs]
    return phash_images(images)


def to_hex(hashes: NDArray[np.uint64]) -> list[str]:
    return [f"{int(h):016x}" for h in hashes]


def from_hex(texts: Sequence[str]) -> NDArray[np.uint64]:
    return np.array([int(t, 16) for t in texts], dtype=np.uint64)


def hamming(a: NDArray[np.uint64], b: NDArray[np.uint64]) -> NDArray[np.int64]:
    """Bitwise distance between hashes, element-wise with broadcasting."""
    x = np.asarray(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))
    flat = np.ascontiguousarray(x).reshape(-1)
    return _POPCOUNT[flat.view(np.uint8)].reshape(-1, 8).sum(axis=1, dtype=np.int64).reshape(x.shape)


def near_pairs(hashes: NDArray[np.uint64], max_distance: int) -> NDArray[np.int64]:
    """All pairs (i, j, distance), i < j, of hashes at most ``max_distance`` bits apart, without comparing all
    pairs: split the 64 bits into ``max_distance + 1`` blocks; two hashes that close agree exactly on at least
    one block (pigeonhole), so only hashes sharing a block value are compared."""
    if max_distance < 0 or len(hashes) < 2:
        return np.zeros((0, 3), dtype=np.int64)
    unique, inverse = np.unique(hashes, return_inverse=True)
    found = []
    blocks = max_distance + 1
    edges = np.linspace(0, 64, blocks + 1).astype(int)
    for lo, hi in zip(edges[:-1], edges[1:]):
        keys = (unique >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(keys, kind="stable")
        starts = np.flatnonzero(np.r_[True, keys[order][1:] != keys[order][:-1]])
        for start, end in zip(starts, np.r_[starts[1:], len(order)]):
            if end - start > 1:
                found.append(_bucket_pairs(order[start:end], unique, max_distance))
    pairs = np.unique(np.concatenate([p for p in found if len(p)] or [np.zeros((0, 3), np.int64)]), axis=0)
    return _expand(pairs, inverse)


def _bucket_pairs(members: NDArray[np.int64], unique: NDArray[np.uint64], max_distance: int) -> NDArray[np.int64]:
    """Close pairs among unique hashes that share a block value; row chunks bound the memory of big buckets."""
    members = np.sort(members)
    out = []
    for start in range(0, len(members), 2048):
        rows = members[start:start + 2048]
        dist = hamming(unique[rows][:, None], unique[members][None, :])
        i, j = np.nonzero((dist <= max_distance) & (rows[:, None] < members[None, :]))
        out.append(np.stack([rows[i], members[j], dist[i, j]], axis=1))
    return np.concatenate(out)


def _expand(pairs: NDArray[np.int64], inverse: NDArray[np.int64]) -> NDArray[np.int64]:
    """Pairs of unique hashes -> pairs of items (every item holding one hash with every item holding the
    other), plus items that share one hash with each other."""
    holders: dict[int, list[int]] = {}
    for item, u in enumerate(inverse):
        holders.setdefault(int(u), []).append(item)
    out = [(a, b, 0) for members in holders.values() for x, a in enumerate(members) for b in members[x + 1:]]
    out += [(min(a, b), max(a, b), int(d)) for u, v, d in pairs for a in holders[int(u)] for b in holders[int(v)]]
    return np.array(sorted(set(out)), dtype=np.int64).reshape(-1, 3)


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

    from imgsim.images import decode_image
    from imgsim.split import walk_files

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
                   max_pixels: int = 40_000_000) -> DuplicateReport:
    """Exact and near duplicate groups among the images below ``folder`` (perceptual hash only: no model)."""
    paths, sha, hashes, skipped = scan_folder(folder, max_pixels)
    return DuplicateReport(group_copies(paths, sha, hashes, hash_distance), len(paths), skipped)


def find_in_bundle(folder: str | Path, hash_distance: int = DEFAULT_HASH_DISTANCE,
                   embedding_distance: float = DEFAULT_EMBEDDING_DISTANCE) -> tuple[DuplicateReport, Path | None]:
    """Exact and near duplicate groups among a gallery's items, from what the bundle stores (sha256, perceptual
    hash, embedding): no image is read. Also returns the gallery's image root, if recorded."""
    from imgsim.bundle import read_meta
    from imgsim.index import IndexBundle

    meta = read_meta(folder)
    index = IndexBundle.load(folder, n_trees=int(meta["index"]["n_trees"]))
    if not all(item.phash for item in index.items):
        raise ImgsimError(f"bundle {folder} has no perceptual hashes (made before imgsim stored them): run extract "
                          "again, or run 'imgsim duplicates' on the image folder")
    items = index.items
    pairs = group_copies([i.path for i in items], [i.sha256 for i in items], from_hex([i.phash for i in items]),
                         hash_distance, np.asarray(index.embeddings), embedding_distance, [i.id for i in items])
    root = (meta.get("gallery") or {}).get("root")
    return DuplicateReport(pairs, len(items)), Path(root) if root else None
