"""Integration on a real Fashion-MNIST subset: the trained embedding must beat raw pixels at Precision@10."""


import numpy as np
import pytest

from bench.baselines import pixel_embeddings
from imgsim.fashion_mnist import DEBIAN_DIR, prepare, read_idx
from imgsim.metrics import retrieval_metrics
from imgsim.nn.data import label_ids, load_items
from imgsim.split import SplitConfig, split_dataset
from imgsim.stages.extract import extract
from imgsim.stages.settings import ExtractConfig, TrainConfig
from imgsim.stages.train import train_model

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (DEBIAN_DIR / "train-labels-idx1-ubyte.gz").exists(),
    reason=f"Fashion-MNIST is not in {DEBIAN_DIR}: run scripts/setup.sh (apt-get install dataset-fashion-mnist)")]


def test_idx_reader_matches_the_published_shapes():
    assert read_idx(DEBIAN_DIR / "train-images-idx3-ubyte.gz").shape == (60000, 28, 28)
    labels = read_idx(DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and np.bincount(labels).tolist() == [1000] * 10


def test_trained_embedding_beats_raw_pixels(tmp_path):
    root = prepare(tmp_path / "fm", per_class=250)  # 5,000 real images, 10 classes
    manifest = split_dataset(SplitConfig(data_dir=str(root), test_ratio=0.2, eval_ratio=0.05))
    assert not manifest.rejected and len(manifest.classes) == 10
    cfg = TrainConfig(epochs=8, checkpoint_dir=str(tmp_path / "ckpt"))
    bundle = train_model(cfg, manifest).bundle
    result = extract(ExtractConfig(n_trees=20), bundle, manifest)
    gallery_items, query_items = manifest.split("train"), manifest.split("test")
    pixels = bundle.preprocess
    raw = retrieval_metrics(pixel_embeddings(load_items(query_items, root, pixels)),
                            label_ids(query_items, manifest.classes),
                            pixel_embeddings(load_items(gallery_items, root, pixels)),
                            label_ids(gallery_items, manifest.classes))
    print(f"trained: {result.metrics}\nraw pixels: {raw}")
    assert result.metrics["precision_at_10"] > raw["precision_at_10"] + 0.02
    assert result.metrics["map_at_r"] > raw["map_at_r"]
    assert result.metrics["index_recall_at_10"] > 0.95
