"""The notebooks: committed without outputs, executed on the fixture bundle (and a real server), and right."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import papermill
import pytest

from imgsim.index import BACKENDS
from imgsim.serve.search import Searcher
from support.servers import start_server
from tests.bundles import pipeline_bundle
from tests.conftest import CLASSES

pytestmark = pytest.mark.slow
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def fixture_bundle(pipeline_run, tmp_path_factory):
    return pipeline_bundle(pipeline_run, tmp_path_factory.mktemp("nb") / "bundle")


def run(name: str, tmp_path: Path, **parameters) -> dict:
    results = tmp_path / f"{name}.json"
    papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(tmp_path / f"{name}.out.ipynb"),
                               parameters={"out_dir": str(tmp_path / "out"), "results_json": str(results), **parameters},
                               kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
    return json.loads(results.read_text())


@pytest.mark.parametrize("name", ["ann_vs_exact", "embedding_explorer", "top_k_viewer"])
def test_committed_without_outputs(name):
    book = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])  # papermill injects its parameters after this cell


def test_ann_vs_exact(fixture_bundle, pipeline_run, tmp_path):
    result = run("ann_vs_exact", tmp_path, bundle=str(fixture_bundle), gallery_root=str(pipeline_run["root"]),
                 n_trees=[1, 3], search_k=[-1, 2, 10, 50], queries=20, k=5)
    rows, backends = result["rows"], {r["backend"]: r for r in result["backends"]}
    # Every backend on the same gallery; the fixture bundle's own (annoy) is marked; exact search is exact (but
    # for the order of tied copies).
    assert sorted(backends) == sorted(BACKENDS) and [b for b, r in backends.items() if r["bundle_backend"]] == ["annoy"]
    assert backends["faiss-flat"]["recall_at_k"] > 0.98 and all(0 < r["recall_at_k"] <= 1 for r in backends.values())
    assert sum(r["bundle_setting"] for r in rows) == 1 and (tmp_path / "out" / "ann_vs_exact.png").stat().st_size
    for trees in {r["n_trees"] for r in rows}:
        line = sorted((r for r in rows if r["n_trees"] == trees),
                      key=lambda r: r["search_k"] if r["search_k"] >= 0 else trees * 5)  # -1: Annoy's n_trees * k
        recalls = [r["recall_at_k"] for r in line]
        assert recalls == sorted(recalls), f"recall fell as search_k grew at {trees} trees: {recalls}"
        assert all(0 < r <= 1 for r in recalls)
    assert max(r["recall_at_k"] for r in rows) == 1.0  # a budget above the gallery's size is exhaustive


def test_embedding_explorer(fixture_bundle, pipeline_run, tmp_path):
    result = run("embedding_explorer", tmp_path, bundle=str(fixture_bundle), gallery_root=str(pipeline_run["root"]),
                 sample=200, k=3)
    assert result["classes_on_map"] == sorted(CLASSES)  # every class is on the map
    matrix = np.array(result["confusion"])
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
    assert len(result["worst"]) == 3 and result["worst"][0]["mixing"] >= result["worst"][-1]["mixing"]
    html = (tmp_path / "out" / "embedding_map.html").read_text()
    assert "data:image/png;base64," in html and "cdn.bokeh.org" not in html  # thumbnails inline, no CDN
    assert (tmp_path / "out" / "embedding_map.png").stat().st_size > 0


def test_top_k_viewer_against_a_real_server_and_in_process(fixture_bundle, pipeline_run, tmp_path):
    srv = start_server({"IMGSIM_MODEL_URI": str(fixture_bundle)}, tmp_path / "server.log")
    try:
        served = run("top_k_viewer", tmp_path, bundle=str(fixture_bundle), gallery_root=str(pipeline_run["root"]),
                     server_url=srv.rest, queries=12, k=3)
    finally:
        srv.stop()
    local = run("top_k_viewer", tmp_path, bundle=str(fixture_bundle), gallery_root=str(pipeline_run["root"]),
                queries=12, k=3)
    searcher = Searcher(fixture_bundle)
    for review in served["reviews"]:  # the viewer's top-1 is what `imgsim search` answers (its own copy aside)
        data = (pipeline_run["root"] / review["path"]).read_bytes()
        expected = [n for n in searcher.search_bytes([data], 4)[0].neighbours if n.id != review["id"]][0]
        assert review["neighbours"][0]["id"] == expected.id
    assert [r["neighbours"][0]["id"] for r in served["reviews"]] == [r["neighbours"][0]["id"] for r in local["reviews"]]
    wrong = [r for r in served["reviews"] if r["wrong"]]
    assert sorted(served["wrong"]) == sorted(r["id"] for r in wrong)
    assert len(served["walk"]) >= 2 and served["walk"][0] == served["start"] and len(set(served["walk"])) == len(served["walk"])


def test_a_corrupt_or_missing_gallery_image_is_a_blank_tile_not_a_crash(fixture_bundle, tmp_path):
    # decode_image raises BadInput (not OSError or ValueError) for a file that is not an image: the maps and
    # the top-k grids used to crash on the first such file in a gallery.
    import shutil

    from imgsim.explore.gallery import Gallery

    root = tmp_path / "images"
    gallery = Gallery.open(fixture_bundle, root)
    items = gallery.index.items
    for item in items[:3]:
        (root / item.path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(gallery_root_of(fixture_bundle)) / items[0].path, root / items[0].path)
    (root / items[1].path).write_bytes(b"not an image at all")
    assert gallery.thumbnail(0, 32).size[0] <= 32  # a good file: a thumbnail
    assert gallery.thumbnail(1) is None and gallery.thumbnail(2) is None  # corrupt, missing: blank tiles
    assert gallery.classes == list(CLASSES) and gallery.search_k > 0 and gallery.n_trees > 0


def test_a_gallery_opens_without_starting_a_model_runtime(fixture_bundle):
    import subprocess
    import sys

    code = ("import sys; from imgsim.explore.gallery import Gallery; g = Gallery.open(sys.argv[1]); "
            "assert len(g.index.items) > 0; "
            "print(sorted(m for m in ('onnxruntime', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(fixture_bundle)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def gallery_root_of(bundle: Path) -> str:
    return json.loads((bundle / "bundle.json").read_text())["gallery"]["root"]
