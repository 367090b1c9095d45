"""No image through the backbone twice: extract reuses the features head-mode training kept, per image, and its
vectors equal a fresh embedding; images train never saw, and every image of another backbone, are embedded."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from imgsim.errors import ImgsimError
from imgsim.nn.data import ImageFiles
from imgsim.nn.embed import embed_dataset
from imgsim.nn.feature_store import FeatureStore, head_outputs, item_features, open_store
from imgsim.nn.model import EmbeddingNet
from imgsim.nn.trunk import Trunk
from imgsim.split import SplitConfig, split_dataset
from imgsim.stages.extract import embed_part
from imgsim.stages.settings import ExtractConfig, TrainConfig
from imgsim.stages.train import train_model
from tests.conftest import colour_folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A head-mode model at 64 px, its manifest and the feature store its training filled."""
    work = tmp_path_factory.mktemp("reuse")
    manifest = split_dataset(SplitConfig(data_dir=str(colour_folder(work / "images")), test_ratio=0.2,
                                         eval_ratio=0.2))
    cfg = TrainConfig(image_size=64, epochs=3, head_views=1, checkpoint_dir=str(work / "c"),
                      feature_store=str(work / "f"))
    return train_model(cfg, manifest).bundle, manifest, work / "f"


def _train_store(store, tmp_path):
    """A copy of the store as training left it (a test's extract adds the images it embeds)."""
    shutil.copytree(store, tmp_path / "store")
    return tmp_path / "store"


def _fresh(bundle, items, root):
    """The embeddings extract computed before features were kept: the whole torch model on decoded images."""
    return embed_dataset(bundle.build(), ImageFiles(items, root, bundle.preprocess), 16, "", workers=0)


def test_extract_reuses_train_features_and_its_vectors_equal_a_fresh_embedding(trained, tmp_path, monkeypatch):
    bundle, manifest, store = trained
    cfg = ExtractConfig(feature_store=str(_train_store(store, tmp_path)), workers=0)
    part = embed_part(cfg, bundle, manifest, 0, 1)
    gallery_items, query_items = manifest.split("train"), manifest.split("test")
    assert part.embedded == 0 and len(part.gallery) == len(gallery_items)  # every gallery image was train's
    fresh, _ = _fresh(bundle, gallery_items, manifest.root)
    assert np.abs(part.gallery - fresh).max() <= 1e-5
    fresh_queries, fresh_logits = _fresh(bundle, query_items, manifest.root)
    assert np.abs(part.queries - fresh_queries).max() <= 1e-5 and np.abs(part.logits - fresh_logits).max() <= 1e-4
    # The perceptual hashes are those of the images, as if embedded now.
    again = embed_part(dataclasses.replace(cfg, feature_store=""), bundle, manifest, 0, 1)
    assert again.embedded == len(gallery_items) and again.hashes == part.hashes
    assert np.abs(again.gallery - part.gallery).max() <= 1e-5

    # Once the queries are kept too, a second extract runs no backbone at all.
    with monkeypatch.context() as patch:
        patch.setattr(EmbeddingNet, "forward_features", lambda self, x: pytest.fail("the backbone ran"))
        kept = embed_part(cfg, bundle, manifest, 0, 1)
    assert kept.embedded == 0 and np.array_equal(kept.queries, part.queries)


def test_images_train_never_saw_and_other_backbones_go_through_the_backbone(trained, tmp_path):
    bundle, manifest, store = trained
    wider = ExtractConfig(feature_store=str(_train_store(store, tmp_path)), workers=0,
                          gallery_splits="train,eval,test")
    # Train kept its train and eval images: only the test images go through the backbone.
    part = embed_part(wider, bundle, manifest, 0, 1)
    assert part.embedded == len(manifest.split("test")) > 0 and len(part.gallery) == len(manifest.items)
    fresh, _ = _fresh(bundle, [it for it in manifest.items if it.split in ("train", "eval", "test")], manifest.root)
    assert np.abs(part.gallery - fresh).max() <= 1e-5
    # An empty store: every image.
    empty = embed_part(dataclasses.replace(wider, feature_store=str(tmp_path / "empty")), bundle, manifest, 0, 1)
    assert empty.embedded == len(manifest.items)
    # Another backbone (here: other weights in the trunk) has its own key: nothing of this one's is reused.
    model, other = bundle.build(), bundle.build()
    next(other.trunk.parameters()).data.add_(0.01)
    assert open_store(store, other).key != open_store(store, model).key
    assert not open_store(store, other).find([it.sha256 for it in manifest.items])[0].any()
    assert open_store(store, model).find([it.sha256 for it in manifest.split("train")])[0].all()


def test_onnx_runtime_and_torch_give_the_same_features_and_a_damaged_part_is_a_miss(trained, tmp_path):
    bundle, manifest, _ = trained
    model, items = bundle.build(), manifest.items[:12]
    images = np.stack([ImageFiles(items, manifest.root, bundle.preprocess).read(i) for i in range(len(items))])
    onnx, torch_ = Trunk(model, "onnxruntime")(images), Trunk(model, "torch")(images)
    assert np.abs(onnx - torch_).max() <= 1e-5 * max(1.0, float(np.abs(torch_).max()))
    assert np.abs(head_outputs(model, onnx)[0] - head_outputs(model, torch_)[0]).max() <= 1e-5

    folder = tmp_path / "store"
    store = open_store(folder, model)
    features, hashes, embedded = item_features(items, manifest.root, bundle.preprocess, Trunk(model), store,
                                               workers=0, desc="")
    assert embedded == len(items)
    (part,) = folder.glob("*.npy")
    (ids,) = folder.glob("*.ids.npz")
    for damaged, cut in ((part, 100), (ids, 50)):  # cut short: a crashed copy, a full disk
        whole = damaged.read_bytes()
        damaged.write_bytes(whole[:cut])
        again, again_hashes, embedded = item_features(items, manifest.root, bundle.preprocess, Trunk(model),
                                                      FeatureStore(folder, store.key), workers=0, desc="")
        assert embedded == len(items) and again_hashes == hashes and np.abs(again - features).max() <= 1e-5
        damaged.write_bytes(whole)
    assert len(FeatureStore(folder, store.key)) == len(items)


def test_a_kept_image_changed_since_split_is_refused_and_a_store_that_cannot_be_written_is_only_a_warning(
        trained, tmp_path, capsys):
    bundle, manifest, store = trained
    model, items = bundle.build(), manifest.split("train")
    copied = tmp_path / "images"
    shutil.copytree(manifest.root, copied)
    (copied / items[3].path).write_bytes((copied / items[4].path).read_bytes())
    with pytest.raises(ImgsimError, match="changed since split") as refused:
        item_features(items, copied, bundle.preprocess, Trunk(model), open_store(store, model), workers=0, desc="")
    assert items[3].path in str(refused.value)

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the store's folder should be")
    features, _, embedded = item_features(items[:4], manifest.root, bundle.preprocess, Trunk(model),
                                          open_store(blocked, model), workers=0, desc="")
    assert embedded == 4 and features.shape[0] == 4
    assert "could not keep 4 images' features" in capsys.readouterr().out
