"""Own images end to end: an unlabelled folder with a pretrained backbone, and fine-tuning one with a frozen start."""

import json
import subprocess
import sys

import numpy as np
import pytest
import requests
import torch
import torchvision

from imgsim.errors import ImgsimError
from imgsim.manifest import Manifest
from imgsim.nn.model import TrainedModel
from imgsim.runs import tracking
from imgsim.runs.export import export_bundle
from imgsim.runs.main import run_main
from imgsim.serve.search import Searcher
from imgsim.split import SplitConfig, split_dataset
from imgsim.stages.settings import ExtractConfig, TrainConfig
from support.servers import start_server
from tests.conftest import _picture, make_image_folder, mlflow_store

pytestmark = pytest.mark.slow
SMALL_PRETRAINED = {"backbone": "resnet18", "image_size": 32, "batch_size": 8}


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A state dict saved from a randomly initialised torchvision model: the path a downloaded one takes."""
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def _unlabelled_folder(root):
    (root / "2024" / "summer").mkdir(parents=True)
    for i in range(8):
        _picture(("circle", "square", "stripes")[i % 3], i).convert("RGB").save(root / f"photo{i}.jpg")
        _picture(("circle", "square")[i % 2], 50 + i).save(root / "2024" / "summer" / f"more{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_an_unlabelled_folder_is_split_as_one_gallery(tmp_path):
    root = _unlabelled_folder(tmp_path / "photos")
    manifest = split_dataset(SplitConfig(data_dir=str(root), labels="none"))
    assert manifest.classes == [] and {i.split for i in manifest.items} == {"train"} and len(manifest.items) == 16
    assert {i.label for i in manifest.items} == {""} and [r.path for r in manifest.rejected] == ["notes.txt"]
    flat = split_dataset(SplitConfig(data_dir=str(root / "2024" / "summer")))  # no subfolders: unlabelled by itself
    assert flat.classes == [] and len(flat.items) == 8
    assert Manifest.load(manifest.save(tmp_path / "split")).classes == []


def test_unlabelled_embed_only_pipeline_search_and_server(tmp_path, weights_file):
    root = _unlabelled_folder(tmp_path / "photos")
    with mlflow_store(tmp_path):
        with pytest.raises(ImgsimError, match="nothing to train on: give a pretrained backbone"):
            run_main(SplitConfig(data_dir=str(root), labels="none"),
                     TrainConfig(backbone="resnet_small", checkpoint_dir=str(tmp_path / "c")), ExtractConfig(n_trees=3))
        result = run_main(SplitConfig(data_dir=str(root), labels="none"),
                          TrainConfig(weights=str(weights_file), checkpoint_dir=str(tmp_path / "c"), **SMALL_PRETRAINED),
                          ExtractConfig(n_trees=3, plot_points=16))
        metrics = result["metrics"]
        assert metrics["gallery_size"] == 16 and 0 < metrics["index_recall_at_10"] <= 1
        assert not {"accuracy", "precision_at_1", "map_at_r"} & set(metrics)
        bundle = export_bundle(result["bundle_uri"], tmp_path / "bundle")
    model = TrainedModel.load(bundle)
    assert model.classes == [] and model.args.num_classes == 0 and model.args.embedding_dim == 0
    assert model.preprocess.mean == (0.485, 0.456, 0.406) and model.preprocess.resize == round(256 * 32 / 224)
    searcher = Searcher(bundle)
    query = (root / "photo3.jpg").read_bytes()
    answer = searcher.search_bytes([query], 4)[0]
    assert answer.predicted_label is None and answer.neighbours[0].path == "photo3.jpg"

    cli = subprocess.run([sys.executable, "-m", "imgsim.cli", "search", str(root / "photo3.jpg"), "--bundle",
                          str(bundle), "-k", "3"], capture_output=True, text=True)
    assert cli.returncode == 0 and "no classes" in cli.stdout and "photo3.jpg" in cli.stdout

    server = start_server({"IMGSIM_MODEL_URI": str(bundle)}, tmp_path / "server.log")
    try:
        reply = requests.post(f"{server.rest}/api/v1.0/predictions", files={"binData": (root / "photo3.jpg").read_bytes()},
                              data={"meta": json.dumps({"tags": {"k": 3}})}, timeout=30)
        assert reply.status_code == 200, reply.text
        found = reply.json()["jsonData"]["results"][0]
        assert found["predicted"] is None and [n["id"] for n in found["neighbours"]] == \
            [n.id for n in searcher.search_bytes([query], 3)[0].neighbours]
    finally:
        server.stop()


def test_fine_tuning_keeps_a_frozen_backbone_and_stores_its_preprocessing(tmp_path, weights_file):
    root = tmp_path / "images"
    make_image_folder(root)
    original = torch.load(weights_file, weights_only=True)
    with mlflow_store(tmp_path):
        result = run_main(SplitConfig(data_dir=str(root), test_ratio=0.25, eval_ratio=0.1),
                          TrainConfig(weights=str(weights_file), mode="full", epochs=1, freeze_epochs=1, head="arcface",
                                      checkpoint_dir=str(tmp_path / "c"), register_name="", **SMALL_PRETRAINED),
                          ExtractConfig(n_trees=3, plot_points=16))
        with tracking.fetched(result["model_uri"], "model") as folder:
            model = TrainedModel.load(folder)
    state = model.state_dict
    assert model.args.backbone == "resnet18" and model.config["augment"] == "photo"
    assert torch.equal(state["trunk.conv1.weight"], original["conv1.weight"])  # frozen for the one epoch
    assert torch.equal(state["trunk.layer4.1.conv2.weight"], original["layer4.1.conv2.weight"])
    assert model.preprocess.channels == 3 and model.preprocess.std == (0.229, 0.224, 0.225)
    assert 0 <= result["metrics"]["precision_at_1"] <= 1 and "best_eval_map_at_r" in result["metrics"]
    with torch.no_grad():  # the fine-tuned model classifies into the three classes
        logits = model.build()(torch.rand(4, 3, 32, 32))
    assert logits.shape == (4, 3) and np.isfinite(logits.numpy()).all()
