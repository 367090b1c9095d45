"""What the model sees: input size, channels, framing and normalisation, chosen from the data and the backbone."""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Sequence

import numpy as np

from imgsim import modelspec
from imgsim.errors import ImgsimError
from imgsim.images import Preprocess, decode_image
from imgsim.manifest import Item
from imgsim.nn import backbones
from imgsim.nn.data import ImageFiles, channel_stats
from imgsim.nn.weights import is_pretrained

# Scratch training: images are trained at 28-32 px. On both colour dev sets 32 px beat 48 and 64 px at the same
# epochs (bench/sweep.py: P@1 0.61 vs 0.54/0.56 and 0.59 vs 0.57/0.55) while costing 2-4x less per image.
MIN_AUTO_SIZE, MAX_AUTO_SIZE = 28, 32
# Small collections need more passes and smaller batches to get enough optimizer steps: mAP@R rose with steps
# on both colour dev sets (bench/sweep.py epochs20 < base < epochs80; Oxygen 0.57 -> 0.63 from 1000 to 2000
# steps), within 15 minutes on 2 cores. Fashion-MNIST's tuned 12 x 128 at lr 0.2 is what this gives for 60k.
MIN_STEPS, MAX_AUTO_EPOCHS, SMALL_SET = 2000, 100, 10_000
# Fine-tuning with photo augmentation: random crops of at least this share of the image (head mode's views take
# the whole image: imgsim.stages.head.HEAD_CROP).
PHOTO_CROP = 0.35
# Label smoothing when training in full (Fashion-MNIST's setting; head mode has its own, imgsim.stages.head).
SMOOTHING = 0.1


# resnet_small's stages: three for Fashion-MNIST's 28 px (tuned there), a fourth from 32 px on, which ends at
# the same 4 x 4 maps and raised mAP@R on both colour dev sets (0.45 -> 0.54 and 0.45 -> 0.57, bench/quality.py).
THREE_STAGES, FOUR_STAGES = ((32, 64, 128), (1, 1, 1)), ((32, 64, 128, 256), (1, 1, 1, 1))


def route(cfg, items: Sequence[Item], root: str | Path, *, labelled: bool):
    """``cfg`` with backbone, weights, mode and feature levels chosen where it says ``auto``: colour images or an
    unlabelled folder take the installed ImageNet backbone, grayscale images the small ResNet from scratch;
    pretrained weights train the head on frozen features (of every stage, on efficientnet_lite0), scratch networks
    train in full, and without labels nothing trains."""
    backbone, weights, mode = cfg.backbone, cfg.weights, cfg.mode
    if backbone == modelspec.AUTO:
        colour = cfg.channels == 3 or (not cfg.channels and is_colour(items, root, seed=cfg.seed))
        backbone = modelspec.PRETRAINED_DEFAULT if colour or not labelled else modelspec.SMALL
    if weights.lower() == modelspec.AUTO:
        weights = "DEFAULT" if backbone in modelspec.IN_WHEEL else "none"
    pretrained = is_pretrained(weights)
    if mode == modelspec.AUTO:
        mode = "none" if not labelled else "head" if pretrained else "full"
    if mode in ("head", "none") and not pretrained:
        what = "there are no class folders, so there is nothing to train on" if not labelled else \
            f"mode={mode} keeps the backbone as it is"
        raise ImgsimError(f"{what}: give a pretrained backbone (e.g. backbone={modelspec.PRETRAINED_DEFAULT} "
                          "weights=DEFAULT, which is installed, or backbone=resnet18 weights=IMAGENET1K_V1, or a "
                          "weights file)" + (", or sort the images into one folder per class" if not labelled else
                                             ", or mode=full to train every layer"))
    if mode in ("head", "full") and not labelled:
        raise ImgsimError(f"mode={mode} trains on class labels, but the images have no class folders: use mode=none "
                          "(or auto) to embed them with the pretrained backbone as is, or sort them into one folder "
                          "per class")
    levels = cfg.feature_levels
    if levels == modelspec.AUTO:
        levels = "stages" if mode == "head" and backbone in modelspec.STAGE_CHANNELS else "last"
    modelspec.check_levels(levels, backbone)
    return dataclasses.replace(cfg, backbone=backbone, weights=weights, mode=mode, feature_levels=levels)


def schedule(cfg, items: Sequence[Item]):
    """``cfg`` with what it leaves at 0 / empty (auto) chosen from the training items: batch size, epochs and
    lr from their number, resnet_small's stages from the input size, the photo crop, label smoothing, and no kept
    features (head mode has set its own by now: imgsim.stages.head.schedule)."""
    n_train = len(items)
    batch = cfg.batch_size or (32 if n_train < SMALL_SET else 128)
    steps_per_epoch = max(1, math.ceil(n_train / batch))
    epochs = cfg.epochs or min(MAX_AUTO_EPOCHS, max(12, math.ceil(MIN_STEPS / steps_per_epoch)))
    lr = cfg.lr or 0.2 * batch / 128  # linear scaling from the Fashion-MNIST setting (lr 0.05 won at batch 32)
    widths, depths = cfg.widths, cfg.depths
    if not widths or not depths:
        auto = FOUR_STAGES if (cfg.image_size or auto_size(items)) >= 32 else THREE_STAGES
        widths, depths = widths or auto[0], depths or auto[1]
    select = "map_at_r" if cfg.select_metric == "auto" else cfg.select_metric
    return dataclasses.replace(cfg, batch_size=batch, epochs=epochs, lr=lr, widths=widths, depths=depths,
                               select_metric=select, crop_scale=cfg.crop_scale or PHOTO_CROP,
                               label_smoothing=SMOOTHING if cfg.label_smoothing < 0 else cfg.label_smoothing,
                               keep_features=max(cfg.keep_features, 0.0))


def input_preprocess(items: Sequence[Item], root: str | Path, *, backbone: str, pretrained: bool, weights: str,
                     image_size: int = 0, channels: int = 0, seed: int = 0) -> Preprocess:
    """The Preprocess stored with the model: explicit settings win, 0 means "choose from the data"."""
    channels = channels or (3 if pretrained or is_colour(items, root, seed=seed) else 1)
    if pretrained:
        spec = backbones.pretrained_preprocess(backbone, weights)
        size = image_size or spec["size"]
        resize = round(spec["resize"] * size / spec["size"])
        mean, std = spec["mean"], spec["std"]
        if channels == 1:  # grayscale through an RGB backbone: the channel is repeated, so use the mean statistics
            mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
        return Preprocess(size=size, channels=channels, mean=tuple(mean), std=tuple(std), resize=resize)
    size = image_size or auto_size(items)
    base = Preprocess(size=size, channels=channels, mean=(0.5,) * channels, std=(0.25,) * channels)
    mean, std = channel_stats(ImageFiles(items, root, base), seed=seed)
    return Preprocess(size=size, channels=channels, mean=mean, std=std)


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
