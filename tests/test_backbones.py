"""torchvision backbones and their weights: files, wrappers, torchvision's cache, imgsim models, and clear errors."""

from urllib.error import URLError

import pytest
import torch
import torchvision

from imgsim import modelspec
from imgsim.errors import ImgsimError
from imgsim.images import Preprocess
from imgsim.modelspec import ModelArgs
from imgsim.nn import backbones, weights
from imgsim.nn.model import EmbeddingNet, TrainedModel

RGB = Preprocess(size=64, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.mark.parametrize("name", list(modelspec.TORCHVISION))
def test_every_torchvision_backbone_embeds_and_classifies(name):
    model = EmbeddingNet(ModelArgs(num_classes=4, backbone=name, embedding_dim=32), RGB).eval()
    x = torch.rand(2, 3, 64, 64)
    emb, logits = model.embed_and_classify(x)
    assert emb.shape == (2, 32) and logits.shape == (2, 4) and torch.isfinite(logits).all()
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    with torch.no_grad():  # the embedding is the layer before the classifier, on the backbone's pooled features
        assert model.forward_features(x).shape == (2, modelspec.TORCHVISION[name])


def test_grayscale_images_go_through_an_rgb_backbone():
    gray = Preprocess(size=32, channels=1, mean=(0.45,), std=(0.23,))
    model = EmbeddingNet(ModelArgs(num_classes=2, backbone="resnet18", embedding_dim=8), gray).eval()
    assert model.embed(torch.rand(3, 1, 32, 32)).shape == (3, 8)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """Weights saved from a randomly initialised torchvision model: the same format torchvision downloads."""
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.manual_seed(3)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, path)
    return path, state


def test_a_weights_file_loads_into_the_backbone(resnet18_file):
    path, state = resnet18_file
    trunk = weights.load_backbone_weights("resnet18", str(path))
    assert "fc.weight" not in trunk and torch.equal(trunk["conv1.weight"], state["conv1.weight"])
    model = EmbeddingNet(ModelArgs(num_classes=3, backbone="resnet18"), RGB, trunk)
    assert torch.equal(model.trunk.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_a_wrapped_state_dict_and_a_folder_holding_one_file(resnet18_file, tmp_path):
    path, state = resnet18_file
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pt")
    assert torch.equal(weights.load_backbone_weights("resnet18", str(tmp_path / "wrapped.pt"))["conv1.weight"],
                       state["conv1.weight"])
    (tmp_path / "folder").mkdir()
    torch.save(state, tmp_path / "folder" / "w.pth")
    assert "layer1.0.conv1.weight" in weights.load_backbone_weights("resnet18", str(tmp_path / "folder"))


def test_torchvision_weights_names_load_through_torchvisions_cache(resnet18_file, tmp_path, monkeypatch):
    # Pre-filling $TORCH_HOME is what an air-gapped user can do; torchvision then loads without downloading.
    path, state = resnet18_file
    member = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / member.url.rsplit("/", 1)[1]).write_bytes(path.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    trunk = weights.load_backbone_weights("resnet18", "IMAGENET1K_V1")
    assert torch.equal(trunk["conv1.weight"], state["conv1.weight"])
    spec = backbones.pretrained_preprocess("resnet18", "IMAGENET1K_V1")
    assert spec == {"size": 224, "resize": 256, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def test_a_failed_download_says_how_to_supply_weights_offline(monkeypatch, tmp_path):
    # No internet here: the one stand-in is the network itself.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(URLError("no route to host")))
    with pytest.raises(ImgsimError, match="Without internet.*weights=<that file"):
        weights.load_backbone_weights("resnet18", "IMAGENET1K_V1")


@pytest.mark.parametrize("spec, message", [
    ("IMAGENET9K_V9", "resnet18 has no torchvision weights 'IMAGENET9K_V9'"),
    ("mobilenet", "do not fit backbone resnet18: .*missing keys"),
    ("text", "is not a torch state dict"),
    ("missing", "does not exist"),
])
def test_wrong_weights_name_the_file_and_the_model(spec, message, tmp_path):
    files = {"mobilenet": tmp_path / "mobilenet.pt", "text": tmp_path / "notes.pt", "missing": tmp_path / "nope.pt"}
    torch.save(torchvision.models.mobilenet_v3_large().state_dict(), files["mobilenet"])
    files["text"].write_text("not weights")
    source = str(files.get(spec, spec))
    with pytest.raises(ImgsimError, match=message) as caught:
        weights.load_backbone_weights("resnet18", source)
    if spec in files and spec != "missing":
        assert source in str(caught.value)


def test_scratch_backbone_takes_no_weights_and_unknown_backbones_are_named():
    with pytest.raises(ImgsimError, match="resnet_small has no pretrained weights"):
        weights.load_backbone_weights("resnet_small", "IMAGENET1K_V1")
    with pytest.raises(ImgsimError, match="unknown backbone 'vgg11'"):
        ModelArgs(num_classes=2, backbone="vgg11")


def test_an_imgsim_model_lends_its_backbone(tmp_path):
    args = ModelArgs(num_classes=2, backbone="resnet18", embedding_dim=8)
    model = EmbeddingNet(args, RGB)
    TrainedModel(args, RGB, ["a", "b"], model.state_dict()).save(tmp_path / "model")
    trunk = weights.load_backbone_weights("resnet18", str(tmp_path / "model"))
    assert torch.equal(trunk["conv1.weight"], model.trunk.conv1.weight)
    with pytest.raises(ImgsimError, match="backbone resnet18, not mobilenet_v3_large"):
        weights.load_backbone_weights("mobilenet_v3_large", str(tmp_path / "model"))
