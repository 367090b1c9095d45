"""Perceptual hashes (64-bit DCT of a 32 x 32 grey thumbnail) and the near pairs among them."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from numpy.typing import NDArray
from PIL import Image

HASH_SIDE = 32  # the image is reduced to 32 x 32 grey levels, then the 8 x 8 lowest DCT frequencies are kept
# Near copies differ in at most this many of 64 hash bits: re-encodings do, distinct garments rarely (section 12).
DEFAULT_HASH_DISTANCE = 4
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
