"""Index backends (annoy, faiss-flat, faiss-hnsw): one interface, the same answers, recorded in the bundle."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from imgsim import config
from imgsim.bundle import ServingBundle
from imgsim.bundle_format import BUNDLE_JSON
from imgsim.errors import ImgsimError
from imgsim.index import (BACKENDS, FAISS_FLAT, FAISS_HNSW, FAISS_IVF, HNSW_EF_SEARCH, IVF_NPROBE, GalleryItem,
                          GalleryIndex, check_backend, cosine_from_angular, cosines)
from imgsim.metrics import exact_topk
from imgsim.runs.export import export_bundle
from imgsim.runs.extract import run_extract
from imgsim.serve.search import Searcher
from imgsim.stages.settings import ExtractConfig
from support.store import mlflow_store
from tests.galleries import add, load_version, new_images


def clustered(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Unit vectors near an 8-dimensional subspace, as a trained embedding's are (on isotropic noise in all 32
    dimensions an HNSW graph at the default effort finds about 0.8 of the true top 10)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)) @ np.random.default_rng(99).normal(size=(8, dim)) + 0.05 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def items(n: int) -> list[GalleryItem]:
    return [GalleryItem(1000 + i, f"img-{i}.png", "", "train", f"{i:064x}") for i in range(n)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_saves_loads_and_answers_like_exact_search(backend, tmp_path):
    gallery, queries = clustered(3000), clustered(100, seed=1)
    GalleryIndex.build(gallery, items(len(gallery)), n_trees=10, backend=backend).save(tmp_path)
    index = GalleryIndex.load(tmp_path, n_trees=10, backend=backend)
    assert index.backend == backend and len(index.ann) == len(gallery)
    if backend == FAISS_HNSW:  # its search effort travels in the file
        assert index.ann.index.hnsw.efSearch == HNSW_EF_SEARCH
    if backend == FAISS_IVF:  # so does IVF's, with lists for the gallery's size
        assert index.ann.index.nprobe == IVF_NPROBE and 1 < index.ann.index.nlist <= len(gallery) // 40
    truth = exact_topk(queries, gallery, 10)
    found = [index.search(q, 10, 2000) for q in queries]
    recall = np.mean([len(set(rows) & set(t)) / 10 for (rows, _), t in zip(found, truth)])
    # Every backend reports angular distances: cos recovered from them is the true cosine of the row it names.
    for q, (rows, dists) in zip(queries, found):
        np.testing.assert_allclose([cosine_from_angular(d) for d in dists], gallery[rows] @ q, atol=1e-4)
        assert dists == sorted(dists)
    if backend == FAISS_FLAT:  # exact: the same rows as numpy's brute force (up to ties)
        assert recall > 0.999
    else:
        assert recall >= 0.95, f"{backend} recall@10 {recall:.3f}"
    # The indexed vectors read back: exact, or (faiss-ivf) 8-bit quantized, which its exact re-ranking undoes above.
    np.testing.assert_allclose(index.ann.vectors([0, 17, 2999]), gallery[[0, 17, 2999]],
                               atol=1e-2 if backend == FAISS_IVF else 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gallery_smaller_than_k_returns_what_it_has(backend):
    gallery = clustered(3)
    rows, dists = GalleryIndex.build(gallery, items(3), n_trees=2, backend=backend).search(gallery[1], 10, -1)
    assert sorted(rows) == [0, 1, 2] and rows[0] == 1 and len(dists) == 3


@pytest.mark.parametrize("dim", [32, 100, 128, 1280])
def test_an_item_s_cosine_does_not_depend_on_the_rows_it_is_scored_with(dim):
    """Exact scoring gives a row the same float32 whatever rows come with it (a filter's, a shard's, a block's):
    BLAS's matrix-vector product did not (OpenBLAS on AVX-512 put one item 1 ulp apart in a shard and in the
    whole gallery); and it is the dot product, to float32 precision."""
    gallery, rng = clustered(300, dim), np.random.default_rng(dim)
    for query in (gallery[7], gallery[7] + np.float32(1e-3) * clustered(1, dim, seed=1)[0]):
        whole = cosines(gallery, query)
        assert whole.dtype == np.float32
        np.testing.assert_allclose(whole, gallery.astype(np.float64) @ query.astype(np.float64), atol=1e-6)
        for rows in (np.arange(n) for n in range(1, 40)):
            assert np.array_equal(cosines(gallery[rows], query), whole[rows])
        for _ in range(40):
            rows = rng.choice(300, size=int(rng.integers(1, 300)), replace=False)
            assert np.array_equal(cosines(gallery[rows], query), whole[rows])
    assert cosines(gallery[:0], gallery[0]).shape == (0,)
    strided = np.repeat(gallery[7], 2)[::2]  # the same values, laid out otherwise
    assert np.array_equal(cosines(np.asfortranarray(gallery), strided), cosines(gallery, gallery[7]))


def test_an_unknown_backend_or_a_file_of_another_backend_is_a_clear_error(tmp_path):
    with pytest.raises(ImgsimError, match=r"unknown index backend 'faiss-ivfpq'; choose one of annoy, faiss-flat"):
        config.resolve(ExtractConfig, None, {"index": "faiss-ivfpq"})
    GalleryIndex.build(clustered(50), items(50), n_trees=2).save(tmp_path / "annoy")
    with pytest.raises(ImgsimError, match="cannot open the faiss-hnsw index in .*annoy.*rebuild it with the extract"):
        GalleryIndex.load(tmp_path / "annoy", n_trees=2, backend=FAISS_HNSW)
    GalleryIndex.build(clustered(50), items(50), n_trees=2, backend=FAISS_FLAT).save(tmp_path / "flat")
    with pytest.raises(ImgsimError, match="IndexFlatIP, not the faiss-hnsw index bundle.json names"):
        GalleryIndex.load(tmp_path / "flat", n_trees=2, backend=FAISS_HNSW)


def test_a_faiss_backend_without_faiss_installed_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # what `import faiss` meets where faiss-cpu is not installed
    with pytest.raises(ImgsimError, match=r"faiss-hnsw needs faiss-cpu.*pip install faiss-cpu==1\.15\.1"):
        check_backend(FAISS_HNSW)
    check_backend("annoy")


def test_extract_with_faiss_hnsw_writes_a_bundle_that_serves_and_changes_in_its_backend(pipeline_run, tmp_path):
    with mlflow_store(pipeline_run["work"]):
        run_id = run_extract(ExtractConfig(model_uri=pipeline_run["result"]["model_uri"], index=FAISS_HNSW,
                                           plot_points=40, gallery_name=""))
        out = export_bundle(f"runs:/{run_id}/bundle", tmp_path / "hnsw")
        annoy = export_bundle(pipeline_run["result"]["bundle_uri"], tmp_path / "annoy")
    assert json.loads((out / BUNDLE_JSON).read_text())["index"]["backend"] == FAISS_HNSW
    bundle = ServingBundle.load(out)  # the probe check reads the vectors back from the HNSW file
    assert bundle.index.backend == FAISS_HNSW
    # Bundles written before there was a choice of backend name none: they hold an Annoy index.
    meta = json.loads((annoy / BUNDLE_JSON).read_text())
    assert meta["index"].pop("backend") == "annoy"
    (annoy / BUNDLE_JSON).write_text(json.dumps(meta))
    hnsw, reference = Searcher(out), Searcher(annoy)
    assert reference.index.backend == "annoy"
    for item in bundle.index.items[:10]:
        got, want = hnsw.search_id(item.id, 5), reference.search_id(item.id, 5)
        assert got.neighbours[0].id == item.id
        assert [n.id for n in got.neighbours] == [n.id for n in want.neighbours]


def test_a_gallery_change_keeps_the_parent_s_backend(living, pipeline_run):
    # A faiss-flat extract registered as the living gallery's serving version, then an add on top of it.
    run_extract(ExtractConfig(model_uri=pipeline_run["result"]["model_uri"], index=FAISS_FLAT, plot_points=40,
                              gallery_name=living["name"]))
    assert load_version(living["uri"]).index.backend == FAISS_FLAT
    new_images(living["incoming"], 2)
    assert add(living, folder=str(living["incoming"]))["added"] == 2
    version = load_version(living["uri"])
    assert version.index.backend == FAISS_FLAT and sum(i.split == "added" for i in version.index.items) == 2
