"""The index's search effort chosen by measurement (imgsim.effort): raised until recall@10 reaches the target."""

from __future__ import annotations

import numpy as np
import pytest

from imgsim.effort import retune, tune
from imgsim.index import ANNOY, DEFAULT_SEARCH_K, FAISS_FLAT, FAISS_HNSW, FAISS_IVF, GalleryIndex, GalleryItem
from imgsim.metrics import exact_topk, recall_at_k


def _gallery(n: int = 4000, dim: int = 256, seed: int = 0) -> np.ndarray:
    # Wide, weakly clustered vectors: where few Annoy trees miss neighbours at a small effort.
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32) + rng.normal(size=(20, dim)).astype(np.float32)[
        rng.integers(0, 20, n)] * 0.5
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _index(vectors: np.ndarray, backend: str, n_trees: int = 2) -> GalleryIndex:
    items = [GalleryItem(i, f"{i}.png", "x", "train", f"{i:064x}") for i in range(len(vectors))]
    return GalleryIndex.build(vectors, items, n_trees=n_trees, seed=1, backend=backend)


def _served_recall(index: GalleryIndex, vectors: np.ndarray, search_k: int, seed: int = 7) -> float:
    queries = vectors[np.random.default_rng(seed).permutation(len(vectors))[:300]]
    approx = [index.search(q, 10, search_k)[0] for q in queries]
    return recall_at_k(approx, exact_topk(queries, vectors, 10), 10)


def test_annoy_s_effort_is_raised_until_the_target_and_not_past_it():
    vectors = _gallery()
    index = _index(vectors, ANNOY)
    assert _served_recall(index, vectors, 20) < 0.9  # the starting effort falls well short
    effort = tune(index, vectors, 0.99, 20)
    assert effort.reached and effort.recall >= 0.99 and effort.search_k > 20
    assert _served_recall(index, vectors, effort.search_k) >= 0.98  # on other queries: within sampling noise
    half = tune(index, vectors, 0.99, effort.search_k // 2)  # one step less effort was measured short
    assert half.search_k == effort.search_k or half.recall >= 0.99
    easy = tune(index, vectors, 0.5, 20)
    assert easy.search_k <= effort.search_k


@pytest.mark.parametrize("backend", [FAISS_HNSW, FAISS_IVF])
def test_faiss_keeps_the_effort_it_was_tuned_to_in_its_file(tmp_path, backend):
    vectors = _gallery(3000, 128)
    index = _index(vectors, backend)
    effort = tune(index, vectors, 0.995, -1)
    assert effort.reached, effort
    index.save(tmp_path / "idx")
    loaded = GalleryIndex.load(tmp_path / "idx", n_trees=2, backend=backend)
    knob = loaded.ann.index.hnsw.efSearch if backend == FAISS_HNSW else loaded.ann.index.nprobe
    assert knob == effort.value


def test_exact_search_needs_no_effort_and_an_unreachable_target_is_said():
    vectors = _gallery(500, 32)
    assert tune(_index(vectors, FAISS_FLAT), vectors, 0.999, -1).recall == 1.0
    short = tune(_index(vectors, ANNOY, n_trees=1), vectors, 1.01, 10)  # a target no effort can meet
    assert not short.reached and short.value > 10


def test_a_rebuilt_index_is_tuned_from_the_default_effort_not_from_the_one_it_replaces(capsys):
    vectors = _gallery()
    index = _index(vectors, ANNOY)
    crept = 64 * tune(index, vectors, 0.99, DEFAULT_SEARCH_K).search_k  # what doubling from each tuned value gives
    search_k, recall = retune(index, vectors, 0.99, crept)
    assert DEFAULT_SEARCH_K <= search_k < crept and recall >= 0.99
    assert retune(index, vectors, 0.0, crept) == (crept, None)  # recall_target 0: served as given, not measured
    retune(_index(vectors, ANNOY, n_trees=1), vectors, 1.01, 10)
    assert "short of its recall_target 1.01" in capsys.readouterr().out
