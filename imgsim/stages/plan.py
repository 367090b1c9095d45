"""Where every auto setting of the train stage is resolved: ``plan(cfg, manifest)`` turns the settings as given
(``TrainConfig``, None for auto) into a ``TrainPlan`` with no auto left, once per run; the stages read only it."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from imgsim import modelspec
from imgsim.errors import ImgsimError
from imgsim.manifest import Item, Manifest
from imgsim.modelspec import IN_WHEEL, PRETRAINED_DEFAULT, SMALL, STAGE_CHANNELS
from imgsim.nn.backbones import pretrained_preprocess
from imgsim.nn.data import default_workers
from imgsim.nn.feature_store import store_folder
from imgsim.nn.recipe import auto_size, is_colour
from imgsim.nn.weights import is_pretrained
from imgsim.stages.settings import TrainConfig

# The figures behind these are in docs/benchmarks.md, "Where the defaults come from".
MIN_STEPS, MAX_AUTO_EPOCHS, SMALL_SET = 2000, 100, 10_000  # full training: epochs for about MIN_STEPS steps
PHOTO_CROP, SMOOTHING = 0.35, 0.1  # full training's random crops and label smoothing
# resnet_small's stages: three at Fashion-MNIST's 28 px, a fourth from 32 px on, ending at the same 4 x 4 maps.
THREE_STAGES, FOUR_STAGES = ((32, 64, 128), (1, 1, 1)), ((32, 64, 128, 256), (1, 1, 1, 1))
# Head mode trains on small cached features: large batches, AdamW, about HEAD_STEPS steps whatever the epochs.
HEAD_BATCH, HEAD_LR, HEAD_HIDDEN, HEAD_STEPS = 256, 2e-3, 512, 2000
HEAD_CROP = 1.0  # views of the whole image: queries and the gallery are whole images
HEAD_KEEP = 0.3  # the backbone's own features kept beside the trained embedding, which forgets what they saw
HEAD_SMOOTHING = 0.2  # keeps the head from pulling each class to a point on rows it fits in seconds
DECODED_CACHE_SIDE = 96  # images decoded once to disk up to this side: larger ones cost more disk than decoding


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """TrainConfig's settings with every auto one chosen for this manifest (same names; None only where it says)."""

    manifest_uri: str
    data_dir: str  # where the manifest's relative paths live
    backbone: str
    weights: str
    mode: str  # head, full or none
    widths: tuple[int, ...]
    depths: tuple[int, ...]
    embedding_dim: int
    embedding_hidden: int
    feature_levels: str
    keep_features: float
    head: str
    scale: float
    margin: float
    image_size: int
    channels: int
    epochs: int
    batch_size: int
    lr: float
    backbone_lr_scale: float
    freeze_epochs: int
    weight_decay: float
    label_smoothing: float
    augment: str  # none, shift or photo
    head_views: int
    head_dropout: float
    head_weight_decay: float
    crop_scale: float
    color_jitter: float
    select_metric: str  # map_at_r, accuracy or last
    select_gallery_items: int
    patience: int | None  # None: never stops early
    max_train_items: int  # how many of the train split's images train
    cache: bool
    workers: int
    channels_last: bool
    threads: int | None  # None: torch's own default, left to torch
    feature_store: str  # empty: keep none
    backbone_runtime: str
    seed: int
    checkpoint_dir: str
    resume: bool
    resume_if_present: bool
    register_name: str
    run_name: str

    def __post_init__(self) -> None:
        unset = [f.name for f in dataclasses.fields(self)
                 if getattr(self, f.name) is None and f.name not in ("patience", "threads")]
        if unset:
            raise ImgsimError(f"a train plan leaves {unset} unresolved; this is a bug in imgsim")

    @property
    def pretrained(self) -> bool:
        return is_pretrained(self.weights)

    def train_items(self, manifest: Manifest) -> list[Item]:
        """The train split's images that train: a seeded subset of max_train_items."""
        return _limit(manifest.split("train"), self.max_train_items, self.seed)


def plan(cfg: TrainConfig, manifest: Manifest) -> TrainPlan:
    """Every auto setting of ``cfg`` chosen from the manifest and the machine: the route (backbone, weights, mode,
    feature levels), the input (size, channels), the schedule (batch, epochs, lr) and the rest."""
    root, train = cfg.data_dir or manifest.root, manifest.split("train")
    split = train or manifest.items  # what the route and the input size look at
    labelled = bool(manifest.classes)
    colour = _Once(lambda: is_colour(split, root, seed=cfg.seed))
    backbone = cfg.backbone or (PRETRAINED_DEFAULT if cfg.channels == 3 or (cfg.channels is None and colour())
                                or not labelled else SMALL)
    weights = cfg.weights or ("DEFAULT" if backbone in IN_WHEEL else "none")
    pretrained = is_pretrained(weights)
    mode = cfg.mode or ("none" if not labelled else "head" if pretrained else "full")
    _check_route(mode, pretrained, labelled)
    levels = cfg.feature_levels or ("stages" if mode == "head" and backbone in STAGE_CHANNELS else "last")
    modelspec.check_levels(levels, backbone)
    channels = cfg.channels or (3 if pretrained or colour() else 1)
    image_size = cfg.image_size or (pretrained_preprocess(backbone, weights)["size"] if pretrained else auto_size(split))
    stages = FOUR_STAGES if image_size >= 32 else THREE_STAGES
    n_train = min(len(train), cfg.max_train_items or len(train))
    head = mode == "head"
    batch = cfg.batch_size or (HEAD_BATCH if head else 32 if n_train < SMALL_SET else 128)
    if head:  # epochs over the feature rows (plain + views) for HEAD_STEPS AdamW steps
        steps = max(1, math.ceil(n_train * (1 + cfg.head_views) / batch))
        epochs = cfg.epochs or max(10, math.ceil(HEAD_STEPS / steps))
    else:
        steps = max(1, math.ceil(n_train / batch))
        epochs = cfg.epochs or min(MAX_AUTO_EPOCHS, max(12, math.ceil(MIN_STEPS / steps)))
    augment = cfg.augment or ("photo" if pretrained else "shift")
    load_side = round(image_size * 1.15) if augment == "photo" else image_size
    embedding_dim = 0 if mode == "none" else cfg.embedding_dim
    keep = 0.0 if mode == "none" else (HEAD_KEEP if head and embedding_dim else 0.0) if cfg.keep_features is None \
        else cfg.keep_features
    resolved = {
        "data_dir": str(root), "backbone": backbone, "weights": weights, "mode": mode,
        "widths": cfg.widths or stages[0], "depths": cfg.depths or stages[1], "embedding_dim": embedding_dim,
        "embedding_hidden": 0 if not embedding_dim else cfg.embedding_hidden if cfg.embedding_hidden is not None
        else HEAD_HIDDEN if head else 0,
        "feature_levels": levels, "keep_features": keep, "image_size": image_size, "channels": channels,
        "epochs": epochs, "batch_size": batch,
        "lr": cfg.lr or (HEAD_LR if head else 0.2 * batch / 128),  # linear scaling from Fashion-MNIST's tuned lr
        "label_smoothing": cfg.label_smoothing if cfg.label_smoothing is not None else
        HEAD_SMOOTHING if head else SMOOTHING,
        "augment": augment,
        "crop_scale": cfg.crop_scale if cfg.crop_scale is not None else HEAD_CROP if head else PHOTO_CROP,
        # Without an eval split there is nothing to select on; head mode's many cheap epochs anneal to the best.
        "select_metric": "last" if not manifest.split("eval") else cfg.select_metric or ("last" if head else
                                                                                           "map_at_r"),
        "max_train_items": n_train, "cache": cfg.cache if cfg.cache is not None else load_side <= DECODED_CACHE_SIDE,
        "workers": default_workers() if cfg.workers is None else cfg.workers,
        "feature_store": str(store_folder(cfg.feature_store)), "backbone_runtime": cfg.backbone_runtime or "torch",
    }
    return TrainPlan(**{**dataclasses.asdict(cfg), **resolved})


def _check_route(mode: str, pretrained: bool, labelled: bool) -> None:
    if mode in ("head", "none") and not pretrained:
        what = "there are no class folders, so there is nothing to train on" if not labelled else \
            f"mode={mode} keeps the backbone as it is"
        raise ImgsimError(f"{what}: give a pretrained backbone (e.g. backbone={PRETRAINED_DEFAULT} "
                          "weights=DEFAULT, which is installed, or backbone=resnet18 weights=IMAGENET1K_V1, or a "
                          "weights file)" + (", or sort the images into one folder per class" if not labelled else
                                             ", or mode=full to train every layer"))
    if mode in ("head", "full") and not labelled:
        raise ImgsimError(f"mode={mode} trains on class labels, but the images have no class folders: use mode=none "
                          "(or auto) to embed them with the pretrained backbone as is, or sort them into one folder "
                          "per class")


class _Once:
    """A value computed at most once, and only if asked for (sampling images for colour costs reads)."""

    def __init__(self, compute) -> None:
        self.compute, self.done, self.value = compute, False, None

    def __call__(self):
        if not self.done:
            self.value, self.done = self.compute(), True
        return self.value


def _limit(items: Sequence[Item], n: int, seed: int) -> list[Item]:
    if n >= len(items):
        return list(items)
    keep = np.sort(np.random.default_rng(seed).permutation(len(items))[:n])
    return [items[i] for i in keep]
