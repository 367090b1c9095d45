"""Retrieval metrics against hand-computed values."""

import numpy as np
import pytest

from imgsim.metrics import exact_topk, mean_average_precision, recall_at_k, retrieval_metrics


def unit(*rows):
    arr = np.array(rows, dtype=np.float32)
    return arr / np.linalg.norm(arr, axis=1, keepdims=True)


def test_exact_topk_orders_by_cosine():
    gallery = unit([1, 0], [0.9, 0.1], [0, 1], [-1, 0])
    assert exact_topk(unit([1, 0]), gallery, 3).tolist() == [[0, 1, 2]]


def test_map_at_r_and_precision_by_hand():
    # Gallery: two of class 0 near (1, 0); eleven of class 1 near (0, 1), one of those close to the query.
    gallery = unit([1, 0], [0.2, 1], [0.6, 0.4], *([[0.0, 1.0]] * 10))
    labels = np.array([0, 1, 0] + [1] * 10)
    m = retrieval_metrics(unit([1, 0.01]), np.array([0]), gallery, labels)
    # ranking: 0 (rel), 2 (rel), 1 ... R = 2 -> AP@R = (1/1 + 2/2) / 2 = 1
    assert m["precision_at_1"] == 1.0 and m["map_at_r"] == pytest.approx(1.0)
    assert m["precision_at_10"] == pytest.approx(0.2)
    # a query whose second relevant item ranks third: AP@R = (1 + 0) / 2
    gallery2 = unit([1, 0], [0.9, 0.2], [0, 1])
    m2 = retrieval_metrics(unit([1, 0]), np.array([0]), gallery2, np.array([0, 1, 0]))
    assert m2["map_at_r"] == pytest.approx(0.5)


def test_recall_at_k():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    assert recall_at_k([[1, 2, 9], [4, 5, 6]], exact, 3) == pytest.approx((2 / 3 + 1) / 2)


def test_recall_counts_a_copy_tied_with_the_kth_item_but_nothing_less_similar():
    # rows 0 and 1 are the same image, tied second; exact search kept row 0, the index may return row 1
    gallery, query = unit([1, 0], [1, 0], [0.9, 0.3], [0.6, 0.8]), unit([0.9, 0.3])
    exact = np.array([[2, 0]])
    assert exact_topk(query, gallery, 2)[0, 0] == 2
    assert recall_at_k([[2, 1]], exact, 2) == pytest.approx(0.5)  # by ids alone: the copy is a miss
    assert recall_at_k([[2, 1]], exact, 2, query, gallery) == 1.0
    assert recall_at_k([[2, 3]], exact, 2, query, gallery) == pytest.approx(0.5)
    assert recall_at_k([[1, -1]], exact, 2, query, gallery) == pytest.approx(0.5)  # a short answer


def test_tied_copies_cannot_stand_in_for_a_better_item_or_count_twice():
    # the best match (row 0) above ten identical copies; exact top-3 is row 0 and two copies
    gallery = unit([1, 0], *([[0.9, 0.4]] * 10))
    query, exact = unit([1, 0.01]), np.array([[0, 1, 2]])
    assert recall_at_k([[3, 4, 5]], exact, 3, query, gallery) == pytest.approx(2 / 3)  # missed the best one
    assert recall_at_k([[1, 1, 1]], exact, 3, query, gallery) == pytest.approx(1 / 3)  # one copy, once
    assert recall_at_k([[0, 5, 9]], exact, 3, query, gallery) == 1.0


def test_full_gallery_map_by_hand():
    # ranking for the query: relevant, irrelevant, relevant -> AP = (1/1 + 2/3) / 2
    gallery = unit([1, 0], [0.9, 0.3], [0.5, 0.8])
    ap = mean_average_precision(unit([1, 0]), np.array([0]), gallery, np.array([0, 1, 0]))
    assert ap == pytest.approx((1 + 2 / 3) / 2)


def test_served_precision_counts_what_the_index_returns_not_the_exact_ranking():
    from imgsim.metrics import index_recall

    gallery = np.eye(4, dtype=np.float32)
    labels = np.array([0, 0, 1, 1])
    queries = gallery[[0, 2]]

    class Lossy:  # serves item 3 first for the first query: a wrong class the exact ranking never puts on top
        def search(self, q, k, search_k):
            return ([3, 0, 1, 2] if q[0] else [2, 3, 0, 1])[:k], [0.0] * k

    out = index_recall(queries, gallery, Lossy(), k=2, query_labels=np.array([0, 1]), gallery_labels=labels)
    assert out["served_precision_at_1"] == 0.5 and out["served_precision_at_2"] == 0.75
    assert "served_precision_at_1" not in index_recall(queries, gallery, Lossy(), k=2)
