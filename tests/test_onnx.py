"""The ONNX export in the bundle: every backbone, parity with torch, bad files refused, serving without torch."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import requests
import torch

from imgsim.bundle import ServingBundle
from imgsim.bundle_format import BundleError
from imgsim.images import Preprocess
from imgsim.modelspec import BACKBONES, SMALL, ModelArgs
from imgsim.nn.model import EmbeddingNet, TrainedModel
from imgsim.modelspec import PARITY
from imgsim.nn.onnx_export import export_onnx
from imgsim.serve.runtime import OnnxModel
from support.servers import start_server
from tests.bundles import pipeline_bundle, rerecord_checksums


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_exports_to_onnx_that_matches_torch(backbone, tmp_path):
    torch.manual_seed(0)
    small = backbone == SMALL
    pre = Preprocess(size=28, channels=1) if small else Preprocess(size=64, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    args = ModelArgs(num_classes=0 if backbone == "resnet18" else 4, backbone=backbone,
                     embedding_dim=0 if backbone == "resnet18" else 16, widths=(8, 16), depths=(1, 1))
    model = TrainedModel(args, pre, [] if backbone == "resnet18" else list("abcd"), EmbeddingNet(args, pre).state_dict())
    inputs = np.random.default_rng(0).integers(0, 256, (5, pre.channels, pre.size, pre.size), dtype=np.uint8)
    parity = export_onnx(model, tmp_path / "model.onnx", inputs)
    assert parity <= PARITY
    onnx_model = OnnxModel(tmp_path / "model.onnx", pre)
    for batch in (1, 5):  # the batch dimension is dynamic
        embedding, logits = onnx_model(inputs[:batch])
        assert embedding.shape == (batch, args.dim) and logits.shape == (batch, args.num_classes)
        assert np.allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)


@pytest.fixture
def good_bundle(pipeline_run, tmp_path) -> Path:
    return pipeline_bundle(pipeline_run, tmp_path / "good")


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bad"))


@pytest.mark.slow
def test_a_bundle_without_its_onnx_file_is_refused(good_bundle, tmp_path):
    bad = _copy(good_bundle, tmp_path)
    (bad / "model.onnx").unlink()
    with pytest.raises(BundleError, match="model.onnx is missing"):
        ServingBundle.load(bad)


def _with_edited_graph(bundle: Path, tmp_path: Path, edit) -> Path:
    """A copy of ``bundle`` whose model.onnx ``edit`` changed, with checksums re-recorded to match."""
    bad = _copy(bundle, tmp_path)
    graph = onnx.load(bad / "model.onnx")
    edit(graph)
    onnx.save(graph, bad / "model.onnx")
    rerecord_checksums(bad)
    return bad


@pytest.mark.slow
def test_an_onnx_file_with_an_opset_onnxruntime_lacks_is_refused(good_bundle, tmp_path):
    def future_opset(graph):
        graph.opset_import[0].version = 99

    with pytest.raises(BundleError, match="model.onnx cannot be run by onnxruntime"):
        ServingBundle.load(_with_edited_graph(good_bundle, tmp_path, future_opset))


@pytest.mark.slow
def test_an_onnx_file_with_the_wrong_inputs_is_refused(good_bundle, tmp_path):
    def rename_input(graph):
        graph.graph.input[0].name = "pixels"
        for node in graph.graph.node:
            node.input[:] = ["pixels" if name == "images" else name for name in node.input]

    with pytest.raises(BundleError, match="export it again"):
        ServingBundle.load(_with_edited_graph(good_bundle, tmp_path, rename_input))


@pytest.mark.slow
def test_extract_records_the_onnx_parity_and_both_runtimes_answer_alike(good_bundle):
    onnx_bundle, torch_bundle = ServingBundle.load(good_bundle), ServingBundle.load(good_bundle, runtime="torch")
    assert onnx_bundle.onnx_parity is not None and onnx_bundle.onnx_parity <= PARITY
    inputs = onnx_bundle.probes.inputs
    assert np.abs(onnx_bundle.engine(inputs)[0] - torch_bundle.engine(inputs)[0]).max() <= PARITY
    assert np.abs(onnx_bundle.engine(inputs)[1] - torch_bundle.engine(inputs)[1]).max() <= 1e-3


@pytest.mark.slow
def test_the_real_server_answers_without_torch_installed(good_bundle, pipeline_run, tmp_path):
    # A `torch` package that cannot be imported, first on the path: what the serving image (no torch) sees.
    fake = tmp_path / "no-torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch is not installed in this image')\n")
    repo = Path(__file__).resolve().parents[1]
    srv = start_server({"IMGSIM_MODEL_URI": str(good_bundle), "PYTHONPATH": f"{fake.parent}:{repo}"},
                       tmp_path / "server.log")
    try:
        item = ServingBundle.load(good_bundle).index.items[0]
        image = (pipeline_run["root"] / item.path).read_bytes()
        answer = requests.post(f"{srv.rest}/api/v1.0/predictions", files={"binData": ("q.png", image)}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["jsonData"]["results"][0]["neighbours"][0]["id"] == item.id
        log = srv.log.read_text(errors="replace")
        assert "torch is not installed" not in log and "model on ONNX Runtime" in log
    finally:
        srv.stop()
    torch_srv = start_server({"IMGSIM_MODEL_URI": str(good_bundle), "IMGSIM_RUNTIME": "torch",
                              "PYTHONPATH": f"{fake.parent}:{repo}"}, tmp_path / "torch.log", wait_ready=False)
    try:  # asking for the torch runtime where there is none says so, and stays not ready
        status = requests.get(f"{torch_srv.rest}/health/status", timeout=10)
        assert status.status_code == 503 and "use runtime 'onnx'" in status.json()["status"]["info"]
    finally:
        torch_srv.stop()


def test_the_engine_runs_a_batch_one_pass_of_run_chunk_images_at_a_time(good_bundle, monkeypatch):
    """ONNX Runtime's arena keeps the largest pass for good: a 32-image request must not fix a server's memory at
    32 images' activations. The answer is the same as one pass's."""
    from imgsim.bundle import ServingBundle
    from imgsim.serve import runtime

    engine = ServingBundle.load(good_bundle).engine
    images = np.random.default_rng(1).integers(0, 256, (9, *engine.session.get_inputs()[0].shape[1:]), dtype=np.uint8)
    passes, run = [], engine.session.run
    monkeypatch.setattr(engine, "session", type("Spy", (), {"run": lambda self, out, feeds: (
        passes.append(len(feeds[runtime.INPUT])) or run(out, feeds))})())
    embedding, logits = engine(images)
    assert passes and max(passes) <= runtime.RUN_CHUNK and sum(passes) == len(images)
    monkeypatch.setattr(runtime, "RUN_CHUNK", len(images))
    whole, whole_logits = engine(images)
    assert passes[-1] == len(images) and np.abs(whole - embedding).max() <= 1e-5
    assert embedding.shape == (9, whole.shape[1]) and logits.shape == whole_logits.shape
