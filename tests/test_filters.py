"""Filtered queries (labels, excluded ids): k admissible answers whenever the gallery has them, ranked as exact
search over the admissible items would rank them, on every path (exact, over-fetch, fallback)."""

from __future__ import annotations

import numpy as np
import pytest

from imgsim.errors import BadInput
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
