"""Retrieval metrics: Precision@k, mAP@R and index recall against exact search."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


# Cosine similarities this close to the k-th are a tie: float32 rounding of one vector's products, not a nearer item.
TIE = 1e-6


def exact_topk(queries: NDArray[np.float32], gallery: NDArray[np.float32], k: int,
               chunk: int = 1024) -> NDArray[np.int64]:
    """Indices of the ``k`` most cosine-similar gallery rows per query (unit vectors), best first."""
    k = min(k, len(gallery))
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        sims = queries[start:start + chunk] @ gallery.T
        part = np.argpartition(sims, sims.shape[1] - k, axis=1)[:, -k:]  # the k largest, no negated copy
        order = np.take_along_axis(sims, part, 1).argsort(axis=1)[:, ::-1]
        out[start:start + chunk] = np.take_along_axis(part, order, 1)
    return out


def retrieval_metrics(queries: NDArray[np.float32], query_labels: NDArray[np.int64],
                      gallery: NDArray[np.float32], gallery_labels: NDArray[np.int64], *,
                      chunk: int = 512) -> dict[str, float]:
    """Precision@1, Precision@10 and mAP@R (R = gallery items sharing the query's label)."""
    counts = np.bincount(gallery_labels, minlength=int(max(query_labels.max(), gallery_labels.max())) + 1)
    depth = max(int(counts[np.unique(query_labels)].max()), 10)
    sums = np.zeros(3)
    for start in range(0, len(queries), chunk):
        labels = query_labels[start:start + chunk]
        ranked = exact_topk(queries[start:start + chunk], gallery, depth)
        relevant = gallery_labels[ranked] == labels[:, None]
        r = counts[labels]
        positions = np.arange(1, relevant.shape[1] + 1)
        precision_at_i = np.cumsum(relevant, axis=1) / positions
        hits_within_r = relevant & (positions[None, :] <= r[:, None])
        sums += (relevant[:, 0].sum(), relevant[:, :10].mean(axis=1).sum(),
                 ((precision_at_i * hits_within_r).sum(axis=1) / np.maximum(r, 1)).sum())
    p1, p10, map_r = sums / len(queries)
    return {"precision_at_1": float(p1), "precision_at_10": float(p10), "map_at_r": float(map_r)}


def mean_average_precision(queries: NDArray[np.float32], query_labels: NDArray[np.int64],
                           gallery: NDArray[np.float32], gallery_labels: NDArray[np.int64], *,
                           chunk: int = 256) -> float:
    """mAP over the whole ranked gallery (every relevant item counts, wherever it ranks)."""
    total = 0.0
    for start in range(0, len(queries), chunk):
        sims = queries[start:start + chunk] @ gallery.T
        order = np.argsort(-sims, axis=1, kind="stable")
        relevant = gallery_labels[order] == query_labels[start:start + chunk, None]
        hits = np.cumsum(relevant, axis=1)
        precision = hits / np.arange(1, relevant.shape[1] + 1)
        total += ((precision * relevant).sum(axis=1) / np.maximum(hits[:, -1], 1)).sum()
    return float(total / len(queries))


def recall_at_k(approx: list[list[int]], exact: NDArray[np.int64], k: int = 10,
                queries: NDArray[np.float32] | None = None, gallery: NDArray[np.float32] | None = None) -> float:
    """Mean fraction of the exact top-``k`` that the approximate search also returned. Given the vectors, ties at
    the k-th place count: a returned copy tied with the exact k-th item fills one of the places tied there, as
    exact search's pick among identical files is arbitrary (a colour dev set holds groups of up to 10)."""
    if queries is None or gallery is None:
        hits = [len(set(a[:k]) & set(e[:k].tolist())) / min(k, len(e)) for a, e in zip(approx, exact)]
        return float(np.mean(hits)) if hits else float("nan")
    hits = []
    for q, a, e in zip(queries, approx, exact):
        top = e[:k]
        found = np.asarray(list(dict.fromkeys(i for i in a[:k] if i >= 0)), dtype=np.int64)  # each id once
        kth = float(gallery[top[-1]] @ q)
        sims, tied_slots = gallery[found] @ q, int((np.abs(gallery[top] @ q - kth) <= TIE).sum())
        # Above the k-th (beyond rounding) is in the exact top-k for sure; at the k-th, as many as are tied there.
        better, tied = int((sims > kth + TIE).sum()), int((np.abs(sims - kth) <= TIE).sum())
        hits.append((better + min(tied, tied_slots)) / len(top))
    return float(np.mean(hits)) if hits else float("nan")


def index_recall(queries: NDArray[np.float32], gallery: NDArray[np.float32], index, search_k: int = -1,
                 k: int = 10, query_labels: NDArray[np.int64] | None = None,
                 gallery_labels: NDArray[np.int64] | None = None) -> dict[str, float]:
    """An ``GalleryIndex``'s recall@k against exact search over ``gallery`` (its rows), for ``queries``; with labels
    also the precision@1 and @k of what the index serves (the exact metrics rank the whole gallery)."""
    exact = exact_topk(queries, gallery, k)
    approx = [index.search(q, k, search_k)[0] for q in queries]
    out = {f"index_recall_at_{k}": recall_at_k(approx, exact, k, queries, gallery)}
    if query_labels is not None and gallery_labels is not None and len(queries):
        hits = [gallery_labels[np.asarray([i for i in a[:k] if i >= 0], dtype=np.int64)] == label
                for a, label in zip(approx, query_labels)]
        out |= {"served_precision_at_1": float(np.mean([h[0] if len(h) else False for h in hits])),
                f"served_precision_at_{k}": float(np.mean([h.sum() / k for h in hits]))}
    return out
