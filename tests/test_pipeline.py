"""split -> train -> extract end to end through the real MLflow store, and what it leaves behind."""

import json
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from imgsim import tracking
from imgsim.bundle import BUNDLE_JSON, load_bundle, verify_bundle
from imgsim.errors import ImgsimError
from imgsim.export import export_bundle, resolve_bundle
from imgsim.extract import ExtractConfig
from imgsim.images import decode_image
from imgsim.manifest import Manifest
from imgsim.model import ModelBundle, file_sha256
from imgsim.search import Searcher
from imgsim.workflow import run_extract
from tests.conftest import mlflow_store

pytestmark = pytest.mark.slow


def test_split_artifact_reports_every_rejected_file(pipeline_run):
    with mlflow_store(pipeline_run["work"]):
        manifest = Manifest.load(tracking.download(f"runs:/{pipeline_run['result']['split']}/split", "manifest"))
    reasons = {r.path: r.reason for r in manifest.rejected}
    assert set(reasons) == set(pipeline_run["bad"])
    assert all(expected in reasons[path] for path, expected in pipeline_run["bad"].items())


def test_runs_log_metrics_params_plots_and_a_registered_model(pipeline_run):
    result = pipeline_run["result"]
    with mlflow_store(pipeline_run["work"]):
        client = mlflow.tracking.MlflowClient()
        train = client.get_run(result["train"])
        assert train.data.params["epochs"] == "2" and train.data.params["widths"] == "8,16"
        assert [m.step for m in client.get_metric_history(result["train"], "train_loss")] == [1, 2]
        extract = client.get_run(result["extract"]).data.metrics
        for key in ("accuracy", "precision_at_1", "precision_at_10", "map_at_r", "index_recall_at_10"):
            assert 0.0 <= extract[key] <= 1.0, key
        assert extract["index_recall_at_10"] > 0.9
        plots = {Path(a.path).name for a in client.list_artifacts(result["extract"], "plots")}
        assert {"embeddings_tsne.png", "query_neighbours.png"} <= plots
        assert client.list_artifacts(result["train"], "plots")[0].path.endswith("training_curves.png")
        assert result["model_uri"] == "models:/imgsim/1"
        bundle = ModelBundle.load(tracking.download(result["model_uri"], "model"))
        assert bundle.classes == ["circle", "square", "stripes"] and bundle.preprocess.size == 32
        assert bundle.config["manifest_uri"] == f"runs:/{result['split']}/split"
        by_run = ModelBundle.load(tracking.download(f"runs:/{result['train']}/model", "model"))
        assert by_run.classes == bundle.classes


def test_bundle_ids_map_to_the_right_files_and_find_themselves(pipeline_run):
    root = pipeline_run["root"]
    with mlflow_store(pipeline_run["work"]):
        folder = resolve_bundle(pipeline_run["result"]["bundle_uri"])
    meta, model_bundle, index = load_bundle(folder)
    assert meta["model"]["name"] == "imgsim" and meta["model"]["version"] == "1"
    searcher = Searcher(folder)
    for item in index.items[:: max(1, len(index.items) // 8)]:
        data = (root / item.path).read_bytes()
        assert file_sha256(root / item.path) == item.sha256
        result = searcher.search_images([decode_image(data)], k=3)[0]
        assert result.neighbours[0].id == item.id or result.neighbours[0].score == pytest.approx(1.0, abs=1e-5)
        embedding, _ = searcher.embed([decode_image(data)])
        assert np.allclose(embedding[0], index.embeddings[item.id], atol=1e-5)


def test_models_uri_resolves_to_the_index_built_from_it(pipeline_run, tmp_path):
    with mlflow_store(pipeline_run["work"]):
        out = export_bundle("models:/imgsim/1", tmp_path / "bundle")
    meta = verify_bundle(out)
    assert meta["model"]["run_id"] == pipeline_run["result"]["train"]


def test_export_and_extract_leave_no_downloads_behind(pipeline_run, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where mkdtemp puts the MLflow downloads
    with mlflow_store(pipeline_run["work"]):
        out = export_bundle(pipeline_run["result"]["bundle_uri"], tmp_path / "bundle")
        run_extract(ExtractConfig(model_uri=pipeline_run["result"]["model_uri"], n_trees=2, plot_points=50))
    assert verify_bundle(out) and not [p.name for p in scratch.iterdir() if p.name.startswith("imgsim-")]


def test_a_bundle_whose_parts_do_not_match_is_refused(pipeline_run, tmp_path):
    with mlflow_store(pipeline_run["work"]):
        good = export_bundle(pipeline_run["result"]["bundle_uri"], tmp_path / "good")
    tampered = tmp_path / "tampered"
    shutil.copytree(good, tampered)
    state = torch.load(tampered / "weights.pt")
    state = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, tampered / "weights.pt")
    with pytest.raises(ImgsimError, match="weights.pt does not match its recorded sha256"):
        verify_bundle(tampered)
    meta = json.loads((tampered / BUNDLE_JSON).read_text())  # re-record the hash: identity still differs
    meta["files"]["weights.pt"] = file_sha256(tampered / "weights.pt")
    (tampered / BUNDLE_JSON).write_text(json.dumps(meta))
    with pytest.raises(ImgsimError, match="built from a different model"):
        verify_bundle(tampered)


def test_missing_model_uri_fails_clearly_and_logs_no_bundle(pipeline_run):
    with mlflow_store(pipeline_run["work"]):
        with pytest.raises(ImgsimError, match="models:/nope/7 cannot be fetched"):
            run_extract(ExtractConfig(model_uri="models:/nope/7"))
        failed = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                    filter_string="attributes.status = 'FAILED'")
        assert failed and not mlflow.tracking.MlflowClient().list_artifacts(failed[0].info.run_id)
