"""The streaming data path: per-item decoding in DataLoader workers, the on-disk cache, framing and the recipe."""

import dataclasses
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from imgsim.errors import ImgsimError
from imgsim.images import Preprocess, decode_image
from imgsim.manifest import Item, Manifest
from imgsim.nn import recipe
from imgsim.nn.data import ImageArray, ImageFiles, cache_images, channel_stats, load_items, make_loader
from imgsim.split import SplitConfig, split_dataset
from imgsim.stages.plan import plan
from imgsim.stages.settings import TrainConfig

PRE = Preprocess(size=24, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.fixture
def manifest(image_folder):
    root, _ = image_folder
    return split_dataset(SplitConfig(data_dir=str(root)))


def test_items_decode_as_the_preprocessing_says(manifest):
    dataset = ImageFiles(manifest.items, manifest.root, PRE)
    for i in (0, 5, len(dataset) - 1):
        with open(os.path.join(manifest.root, manifest.items[i].path), "rb") as f:
            expected = PRE.to_array(decode_image(f.read()))
        image, label = dataset[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 24, 24) and label == -1
        assert np.array_equal(image.numpy(), expected)


def test_worker_processes_give_the_same_batches_as_the_main_process(manifest):
    dataset = ImageFiles(manifest.items, manifest.root, PRE)
    order = list(np.random.default_rng(0).permutation(len(dataset)))
    main = [b[0] for b in make_loader(dataset, 7, order=order, workers=0)]
    workers = [b[0] for b in make_loader(dataset, 7, order=order, workers=2)]
    assert len(main) == len(workers) == -(-len(dataset) // 7)
    assert all(torch.equal(a, b) for a, b in zip(main, workers))
    assert np.array_equal(torch.cat(main).numpy(), load_items([manifest.items[i] for i in order], manifest.root, PRE))


def test_a_file_changed_since_split_is_a_clear_error(manifest):
    item = manifest.items[0]
    with open(os.path.join(manifest.root, item.path), "ab") as f:
        f.write(b"changed")
    with pytest.raises(ImgsimError, match="changed since split.*Run split again"):
        ImageFiles(manifest.items, manifest.root, PRE)[0]


def test_the_cache_is_a_memory_mapped_copy_reused_until_the_preprocessing_changes(manifest, tmp_path):
    dataset = ImageFiles(manifest.items, manifest.root, PRE)
    cached = cache_images(dataset, tmp_path, workers=1)
    assert isinstance(cached.images, np.memmap)
    assert np.array_equal(np.asarray(cached.images), load_items(manifest.items, manifest.root, PRE))
    (path,) = tmp_path.glob("images-*.npy")
    stamp = path.stat().st_mtime_ns
    cache_images(ImageFiles(manifest.items, manifest.root, PRE), tmp_path)
    assert path.stat().st_mtime_ns == stamp  # reused, not decoded again
    cache_images(ImageFiles(manifest.items, manifest.root, Preprocess(size=16, channels=1)), tmp_path)
    assert len(list(tmp_path.glob("images-*.npy"))) == 2
    batch_images, batch_labels = next(iter(make_loader(cached, 5, order=[4, 0, 2])))
    assert torch.equal(batch_images, torch.from_numpy(np.asarray(cached.images)[[4, 0, 2]]))


def test_channel_stats_from_a_sample_match_numpy(manifest):
    images = load_items(manifest.items, manifest.root, PRE)
    mean, std = channel_stats(ImageArray(images, np.zeros(len(images), np.int64)))
    scaled = images.astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1) / 255
    assert np.allclose(mean, scaled.mean(axis=1), atol=1e-4) and np.allclose(std, scaled.std(axis=1), atol=1e-4)


def test_resize_then_centre_crop_keeps_the_middle():
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    img.paste((0, 0, 255), (50, 0, 150, 100))  # a blue middle half, red sides
    framed = Preprocess(size=32, channels=3, mean=(0.5,) * 3, std=(0.2,) * 3, resize=36).to_array(img)
    assert framed.shape == (3, 32, 32) and framed[2].mean() > 200 and framed[0].mean() < 60
    squashed = Preprocess(size=32, channels=3, mean=(0.5,) * 3, std=(0.2,) * 3).to_array(img)
    assert squashed[0].mean() > 100  # without resize the red sides stay in


def test_jpeg_draft_decoding_matches_a_full_decode_after_resizing():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(np.kron(rng.integers(0, 255, (30, 40, 3)), np.ones((40, 40, 1))).astype(np.uint8))
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=95)
    full = decode_image(buf.getvalue())
    draft = decode_image(buf.getvalue(), draft=64)
    assert draft.size[1] >= 64 and draft.size[0] < full.size[0]
    a, b = (PRE.to_array(x).astype(int) for x in (full, draft))
    assert np.abs(a - b).mean() < 6


def test_the_plan_scales_with_the_collection(manifest, tmp_path):
    def planned(n, side, **given):
        items = [Item(f"{i}.png", "a", "train" if i % 10 else "eval", "0" * 64, side, side) for i in range(n)]
        return plan(TrainConfig(**given), Manifest(str(tmp_path), ["a"], items, [], {}))

    fashion = planned(73_889, 28)  # 66,500 training images, grayscale (the files are absent: no colour found)
    assert (fashion.backbone, fashion.mode, fashion.channels, fashion.image_size) == ("resnet_small", "full", 1, 28)
    assert (fashion.batch_size, fashion.epochs, fashion.lr) == (128, 12, 0.2)
    assert (fashion.widths, fashion.depths) == ((32, 64, 128), (1, 1, 1))  # the tuned Fashion-MNIST network
    assert fashion.cache and fashion.augment == "shift" and fashion.select_metric == "map_at_r"
    small = planned(556, 300)
    assert (small.batch_size, small.epochs, small.lr) == (32, 100, 0.05)  # 2000 steps, capped at 100 epochs
    assert planned(3334, 300).epochs == 22
    assert (small.widths, small.depths, small.image_size) == ((32, 64, 128, 256), (1, 1, 1, 1), 32)
    given = planned(556, 300, epochs=3, batch_size=8, lr=0.01, widths=(8, 16), depths=(2, 2), max_train_items=100)
    assert (given.epochs, given.batch_size, given.lr, given.widths, given.depths) == (3, 8, 0.01, (8, 16), (2, 2))
    assert given.max_train_items == 100 and small.max_train_items == 500
    assert None not in (getattr(small, f.name) for f in dataclasses.fields(small) if f.name not in ("patience",
                                                                                                      "threads"))
    assert recipe.auto_size(manifest.items) == 32 and not recipe.is_colour(manifest.items, manifest.root)
