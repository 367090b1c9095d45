"""Filtered queries (labels, excluded ids): k admissible answers whenever the gallery has them, ranked as exact
search over the admissible items would rank them, on every path (exact, over-fetch, fallback)."""

from __future__ import annotations

import copy
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgsim import index as index_module
from imgsim.errors import BadInput
from imgsim.index import GalleryItem, GalleryIndex, angular_from_cosine, cosines
from imgsim.serve import search
from imgsim.serve.search import Filter, Searcher
from tests.bundles import pipeline_bundle


@pytest.fixture(scope="module")
def searcher(pipeline_run, tmp_path_factory):
    return Searcher(pipeline_bundle(pipeline_run, tmp_path_factory.mktemp("f") / "bundle"))


def exact(searcher: Searcher, query: np.ndarray, k: int, where: Filter) -> np.ndarray:
    """Cosine similarities of the k nearest admissible items, by brute force."""
    rows = [r for r, item in enumerate(searcher.index.items) if where.admits(item.label, item.id)]
    return np.sort(np.asarray(searcher.index.embeddings[rows]) @ query)[::-1][:k]


# exact: labels admit few items; overfetch: force the index path; fallback: the index path gives up at once
PATHS = {"exact": {}, "overfetch": {"EXACT_FILTER_ITEMS": 0}, "fallback": {"EXACT_FILTER_ITEMS": 0, "MAX_FETCH": 1}}


@pytest.mark.parametrize("path", PATHS)
def test_filtered_answers_are_the_nearest_admissible_items(searcher, path, monkeypatch):
    for name, value in PATHS[path].items():
        monkeypatch.setattr(search, name, value)
    items = searcher.index.items
    labels = sorted({item.label for item in items})
    rare = min(labels, key=lambda label: sum(item.label == label for item in items))
    for query_row in (0, len(items) // 2, len(items) - 1):
        query = np.asarray(searcher.index.embeddings[query_row])
        nearest = [items[r].id for r in searcher.nearest(query, 5)[0]]
        for where in (Filter(frozenset([rare])), Filter(frozenset(labels[:2])), Filter(None, frozenset(nearest[:3])),
                      Filter(frozenset([rare]), frozenset(nearest))):
            for k in (1, 5, len(items)):
                rows, dists = searcher.nearest(query, k, where)
                admissible = sum(where.admits(item.label, item.id) for item in items)
                assert len(rows) == min(k, admissible), (path, where, k)
                assert all(where.admits(items[r].label, items[r].id) for r in rows)
                assert len(set(rows)) == len(rows) and dists == sorted(dists)
                # Compared as cosines: near 0 the angular distance magnifies float32 noise (Annoy computes its own).
                np.testing.assert_allclose(1 - np.square(dists) / 2, exact(searcher, query, k, where), atol=1e-5)


def test_an_item_s_distance_is_the_same_whichever_filter_ranks_it(searcher):
    """One label's items are told the distances they have among all labels' (the sharded graph and one server of
    the same gallery rank a filtered query over different rows, and must agree to the last bit)."""
    items = searcher.index.items
    labels = sorted({item.label for item in items})
    for query_row in range(0, len(items), max(1, len(items) // 8)):
        query = np.asarray(searcher.index.embeddings[query_row])
        among_all = dict(zip(*searcher.nearest(query, len(items), Filter(frozenset(labels)))))
        assert len(among_all) == len(items)
        for label in labels:
            rows, dists = searcher.nearest(query, len(items), Filter(frozenset([label])))
            assert rows and dict(zip(rows, dists)) == {r: among_all[r] for r in rows}


def test_a_filter_reaches_the_answer_and_unknown_labels_are_refused(searcher):
    item = searcher.index.items[0]
    other = next(label for label in sorted({i.label for i in searcher.index.items}) if label != item.label)
    result = searcher.search_id(item.id, 3, Filter(frozenset([other])))
    assert len(result.neighbours) == 3 and {n.label for n in result.neighbours} == {other}
    assert item.id not in [n.id for n in searcher.search_id(item.id, 3, Filter(None, frozenset([item.id]))).neighbours]
    with pytest.raises(BadInput, match=r"unknown label\(s\) \['hexagon'\] in 'labels'; this gallery holds"):
        searcher.check_filter(Filter(frozenset(["hexagon", other])))


def test_a_huge_unknown_label_is_quoted_short(searcher):
    """A client's megabyte label (or a thousand labels) comes back, and is logged, as a short quote."""
    for labels in (["x" * 2 ** 20], ["\x00" * 2 ** 20, "y" * 2 ** 20, "z"], [f"no-{i}" * 50 for i in range(1000)]):
        with pytest.raises(BadInput) as caught:
            searcher.check_filter(Filter(frozenset(labels)))
        message = str(caught.value)
        assert len(message) < 300 and message.startswith("unknown label(s) [") and "this gallery holds" in message
        assert ("and 997 more" in message) == (len(labels) == 1000)


class NoProposals:
    """An index that proposes nothing: every filtered query that reaches it falls back to exact ranking."""

    name = "none"

    def search(self, vector, k, search_k):
        return [], []


class Gathers:
    """Embeddings that record how many rows each gather takes (the memory an exact ranking holds at once)."""

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors, self.shape, self.sizes = vectors, vectors.shape, []

    def __getitem__(self, rows):
        self.sizes.append(len(np.atleast_1d(rows)))
        return self.vectors[rows]


def on_gallery(searcher: Searcher, embeddings, labels: list[str], ids: list[int]) -> Searcher:
    """``searcher`` answering over another gallery (these vectors, labels and ids), whose index proposes nothing."""
    other = copy.copy(searcher)
    items = [GalleryItem(i, f"{i}.png", label, "train", "") for i, label in zip(ids, labels)]
    other.index = GalleryIndex(embeddings, items, 1, NoProposals())
    return other


def reference(vectors: np.ndarray, labels: list[str], ids: list[int], query: np.ndarray, k: int,
              where: Filter) -> tuple[list[int], list[float]]:
    """Exact ranking as one unblocked sort: every admissible row at once (sorted labels, then rows), ties in that
    order."""
    if where.labels is None:
        rows = list(range(len(labels)))
    else:
        rows = [r for label in sorted(where.labels) for r in range(len(labels)) if labels[r] == label]
    rows = np.asarray([r for r in rows if ids[r] not in where.exclude_ids], dtype=np.int64)
    sims = cosines(vectors[rows], query)
    top = np.argsort(-sims, kind="stable")[:k]
    return rows[top].tolist(), angular_from_cosine(sims[top]).tolist()


@given(n=st.integers(1, 150), distinct=st.integers(1, 10), seed=st.integers(0, 2 ** 32 - 1), k=st.integers(1, 160),
       block=st.integers(1, 160), labels=st.none() | st.frozensets(st.sampled_from("abcd"), min_size=1),
       n_excluded=st.integers(0, 6), fallback=st.booleans())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_blocked_exact_ranking_is_the_unblocked_one(searcher, n, distinct, seed, k, block, labels, n_excluded,
                                                   fallback):
    """Rows and distances to the last bit, ties in the same order, on both exact paths (few admissible items; the
    index giving up), whatever the block size against k and the admissible count; no ranking holds more than a
    block. Few distinct vectors make many exact ties; label d is held by no item."""
    rng = np.random.default_rng(seed)
    pool = rng.normal(size=(distinct, 8)).astype(np.float32)
    vectors = (pool / np.linalg.norm(pool, axis=1, keepdims=True))[rng.integers(0, distinct, n)]
    item_labels = [str(x) for x in rng.choice(list("abc"), n)]
    ids = [int(i) for i in rng.permutation(3 * n)[:n]]
    excluded = frozenset(ids[int(i)] for i in rng.integers(0, n, n_excluded)) | {10 ** 6, 2 ** 70}
    query = vectors[0] if seed % 2 else rng.normal(size=8).astype(np.float32)
    fallback = fallback or labels is None  # (no labels: only the index's fallback ranks exactly)
    if fallback:  # the first over-fetch must ask for less than the gallery, or its (empty) answer stands
        k = min(k, (n - len(excluded) - 1) // search.OVERFETCH)
        if k < 1:
            labels, fallback, k = frozenset("abc"), False, 1
    where = Filter(labels, excluded)
    limits = {"EXACT_FILTER_ITEMS": 0, "MAX_FETCH": 1} if fallback else {"MAX_FETCH": search.MAX_FETCH}
    embeddings, sizes = Gathers(vectors), []
    with mock.patch.multiple(search, **limits), mock.patch.object(index_module, "EXACT_BLOCK", block):
        with mock.patch.object(index_module, "cosines", lambda v, q: sizes.append(len(v)) or cosines(v, q)):
            answer = on_gallery(searcher, embeddings, item_labels, ids).nearest(query, k, where)
    assert answer == reference(vectors, item_labels, ids, query, k, where)
    assert max(embeddings.sizes + sizes, default=0) <= block


def test_a_large_label_is_ranked_a_block_at_a_time(searcher, monkeypatch):
    """Peak memory follows the block: no gather or cosine of more than EXACT_BLOCK rows however many the label
    holds, each admissible row scanned once, and the answer the unblocked ranking's."""
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(6000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = ["big" if i % 10 else "small" for i in range(len(vectors))]
    ids = list(range(len(vectors)))
    monkeypatch.setattr(index_module, "EXACT_BLOCK", 256)
    sizes: list[int] = []
    monkeypatch.setattr(index_module, "cosines", lambda v, q: sizes.append(len(v)) or cosines(v, q))
    embeddings = Gathers(vectors)
    where = Filter(frozenset(["big"]), frozenset(range(0, 3000, 7)))
    answer = on_gallery(searcher, embeddings, labels, ids).nearest(vectors[5], 10, where)
    assert answer == reference(vectors, labels, ids, vectors[5], 10, where)
    admissible = sum(where.admits(label, i) for label, i in zip(labels, ids))
    assert max(sizes) <= 256 and max(embeddings.sizes) <= 256 and sum(sizes) == admissible
