"""What the model sees: framing and normalisation for the backbone, and the data facts the train plan chooses from."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Sequence

import numpy as np

from imgsim.errors import ImgsimError
from imgsim.images import Preprocess, decode_image
from imgsim.manifest import Item
from imgsim.nn import backbones
from imgsim.nn.data import ImageFiles, channel_stats

# Scratch training at 28-32 px: it beat larger sizes at a fraction of the cost (docs/benchmarks.md, "Where the defaults come from").
MIN_AUTO_SIZE, MAX_AUTO_SIZE = 28, 32


def input_preprocess(items: Sequence[Item], root: str | Path, *, backbone: str, pretrained: bool, weights: str,
                     image_size: int, channels: int, seed: int = 0) -> Preprocess:
    """The Preprocess stored with the model: the weights' framing and statistics when pretrained, else the
    training images' own channel statistics."""
    if pretrained:
        spec = backbones.pretrained_preprocess(backbone, weights)
        resize = round(spec["resize"] * image_size / spec["size"])
        mean, std = spec["mean"], spec["std"]
        if channels == 1:  # grayscale through an RGB backbone: the channel is repeated, so use the mean statistics
            mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
        return Preprocess(size=image_size, channels=channels, mean=tuple(mean), std=tuple(std), resize=resize)
    base = Preprocess(size=image_size, channels=channels, mean=(0.5,) * channels, std=(0.25,) * channels)
    mean, std = channel_stats(ImageFiles(items, root, base), seed=seed)
    return Preprocess(size=image_size, channels=channels, mean=mean, std=std)


def auto_size(items: Sequence[Item]) -> int:
    """The median shorter side of the images, within [MIN_AUTO_SIZE, MAX_AUTO_SIZE] (28-32 px)."""
    if not items:
        return MIN_AUTO_SIZE
    median = statistics.median(min(i.width, i.height) for i in items)
    return int(min(max(median, MIN_AUTO_SIZE), MAX_AUTO_SIZE))


def is_colour(items: Sequence[Item], root: str | Path, *, sample: int = 64, seed: int = 0) -> bool:
    """True if a sample of the images has real colour (not just RGB files holding gray pixels)."""
    pick = np.random.default_rng(seed).permutation(len(items))[:sample]
    for i in pick:
        try:
            img = decode_image((Path(root) / items[i].path).read_bytes(), draft=32)
        except (OSError, ImgsimError):
            continue
        if img.mode == "RGB":
            arr = np.asarray(img.resize((32, 32)), dtype=np.int16)
            if np.abs(arr - arr.mean(axis=2, keepdims=True)).mean() > 2.0:
                return True
    return False
