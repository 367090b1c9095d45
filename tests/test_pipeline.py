"""split -> train -> extract end to end through the real MLflow store, and what it leaves behind."""

import json
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from imgsim.bundle import ServingBundle
from imgsim.bundle_format import BUNDLE_JSON, BundleError
from imgsim.errors import ImgsimError
from imgsim.manifest import Manifest
from imgsim.modelspec import file_sha256
from imgsim.nn.model import TrainedModel
from imgsim.runs import tracking
from imgsim.runs.export import export_bundle, resolve_bundle
from imgsim.runs.extract import run_extract
from imgsim.serve.search import Searcher
from imgsim.stages.settings import ExtractConfig
from support.store import mlflow_store
from tests.bundles import other_model_bundle, pipeline_bundle, rerecord_checksums

pytestmark = pytest.mark.slow


def test_split_artifact_reports_every_rejected_file(pipeline_run, tmp_path):
    with mlflow_store(pipeline_run["work"]):
        manifest = Manifest.load(tracking.download(f"runs:/{pipeline_run['result']['split']}/split", "manifest", tmp_path))
    reasons = {r.path: r.reason for r in manifest.rejected}
    assert set(reasons) == set(pipeline_run["bad"])
    assert all(expected in reasons[path] for path, expected in pipeline_run["bad"].items())


def test_runs_log_metrics_params_plots_and_a_registered_model(pipeline_run, tmp_path):
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
        bundle = TrainedModel.load(tracking.download(result["model_uri"], "model", tmp_path / "registered"))
        assert bundle.classes == ["circle", "square", "stripes"] and bundle.preprocess.size == 32
        assert bundle.config["manifest_uri"] == f"runs:/{result['split']}/split"
        by_run = TrainedModel.load(tracking.download(f"runs:/{result['train']}/model", "model", tmp_path / "run"))
        assert by_run.classes == bundle.classes


def test_bundle_ids_map_to_the_right_files_and_find_themselves(pipeline_run, tmp_path):
    root = pipeline_run["root"]
    with mlflow_store(pipeline_run["work"]):
        folder, _ = resolve_bundle(pipeline_run["result"]["bundle_uri"], tmp_path)
    bundle = ServingBundle.load(folder)
    index = bundle.index
    assert bundle.source.name == "imgsim" and bundle.source.version == "1"
    searcher = Searcher(folder)
    for item in index.items[:: max(1, len(index.items) // 8)]:
        data = (root / item.path).read_bytes()
        assert file_sha256(root / item.path) == item.sha256
        result = searcher.search_bytes([data], k=3)[0]
        assert result.neighbours[0].id == item.id or result.neighbours[0].score == pytest.approx(1.0, abs=1e-5)
        embedding, _ = searcher.embed_inputs(searcher.preprocess.decode(data)[None])
        assert np.allclose(embedding[0], index.embeddings[item.id], atol=1e-5)


def test_models_uri_resolves_to_the_index_built_from_it(pipeline_run, tmp_path):
    with mlflow_store(pipeline_run["work"]):
        out = export_bundle("models:/imgsim/1", tmp_path / "bundle")
    assert ServingBundle.load(out).source.run_id == pipeline_run["result"]["train"]


def test_export_and_extract_leave_no_downloads_behind(pipeline_run, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where mkdtemp puts the MLflow downloads
    with mlflow_store(pipeline_run["work"]):
        out = export_bundle(pipeline_run["result"]["bundle_uri"], tmp_path / "bundle")
        run_extract(ExtractConfig(model_uri=pipeline_run["result"]["model_uri"], n_trees=2, plot_points=50))
    assert ServingBundle.load(out) and not [p.name for p in scratch.iterdir() if p.name.startswith("imgsim-")]


def test_a_bundle_whose_parts_do_not_match_is_refused(pipeline_run, tmp_path):
    good = pipeline_bundle(pipeline_run, tmp_path / "good")
    tampered = tmp_path / "tampered"
    shutil.copytree(good, tampered)
    state = torch.load(tampered / "weights.pt")
    state = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, tampered / "weights.pt")
    with pytest.raises(BundleError, match="weights.pt does not match its recorded sha256"):
        ServingBundle.load(tampered)
    rerecord_checksums(tampered)  # as someone would who "fixes" the checksums: the probes still disagree
    with pytest.raises(BundleError, match="weights.pt is not the model that built this index"):
        ServingBundle.load(tampered, runtime="torch")
    ServingBundle.load(tampered, runtime="onnx")  # ONNX Runtime serves model.onnx, which still fits the index


@pytest.mark.parametrize("taken", [("model.json", "weights.pt", "model.onnx"),  # A's model, B's index and probes
                                   ("model.json", "weights.pt", "model.onnx", "probes.npz")])  # A's model, probes
def test_model_a_with_the_index_of_model_b_is_refused_naming_the_part(pipeline_run, tmp_path, taken):
    good = pipeline_bundle(pipeline_run, tmp_path / "a")
    other = other_model_bundle(good, tmp_path / "b")
    mixed = Path(shutil.copytree(other, tmp_path / "mixed"))
    for name in taken:
        shutil.copy(good / name, mixed / name)
    rerecord_checksums(mixed)
    for runtime, model_file in (("onnx", "model.onnx"), ("torch", "weights.pt")):
        with pytest.raises(BundleError) as err:
            ServingBundle.load(mixed, runtime=runtime)
        if "probes.npz" in taken:  # the probes agree with the model, so the index's vectors are what differ
            assert "embeddings.npy holds other vectors" in str(err.value)
            assert "index.ann holds other vectors" in str(err.value)
        else:
            assert f"{model_file} is not the model that built this index" in str(err.value)
    ServingBundle.load(other)  # while B alone is consistent


def test_the_bundle_records_search_k_and_recall_and_the_server_uses_them(pipeline_run, tmp_path):
    with mlflow_store(pipeline_run["work"]):
        folder = export_bundle(pipeline_run["result"]["bundle_uri"], tmp_path / "bundle")
        metrics = mlflow.get_run(pipeline_run["result"]["extract"]).data.metrics
    meta = json.loads((folder / BUNDLE_JSON).read_text())
    # The effort extract chose for recall_target (the least it tried, search_k, on a gallery this small).
    effort = int(metrics["index_search_effort"])
    assert metrics["index_recall_tuned_at_10"] >= ExtractConfig().recall_target and effort >= ExtractConfig().search_k
    assert meta["index"]["search_k"] == effort and meta["index"]["recall_at_10"] == metrics["index_recall_at_10"]
    assert meta["probes"]["count"] == len(ServingBundle.load(folder).probes.ids) > 0
    assert Searcher(folder).search_k == effort and Searcher(folder, search_k=7).search_k == 7


def test_missing_model_uri_fails_clearly_and_logs_no_bundle(pipeline_run):
    with mlflow_store(pipeline_run["work"]):
        with pytest.raises(ImgsimError, match="models:/nope/7 cannot be fetched"):
            run_extract(ExtractConfig(model_uri="models:/nope/7"))
        failed = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                    filter_string="attributes.status = 'FAILED'")
        assert failed and not mlflow.tracking.MlflowClient().list_artifacts(failed[0].info.run_id)
