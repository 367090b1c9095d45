"""Every stage's settings but split's (in imgsim.split): declared once with their help and group, and importable
without torch, so the command line and `imgsim ui` start without loading it."""

from __future__ import annotations

import dataclasses

from imgsim import duplicates
from imgsim.bundle_format import GALLERY_ALIAS, GALLERY_NAME
from imgsim.changes import MAX_CHANGE_FRACTION, MAX_CHANGES
from imgsim.config import setting
from imgsim.effort import RECALL_TARGET
from imgsim.images import DEFAULT_MAX_PIXELS
from imgsim.index import ANNOY, DEFAULT_SEARCH_K, check_backend
from imgsim.modelspec import (AUGMENT_MODES, BACKBONE_RUNTIMES, BACKBONES, FP32, HEADS, INT8, LEVELS, MODES,
                              PRECISIONS, check_levels)

# Settings train and extract share (imgsim.cli.SAME_MEANING): one help each.
FEATURE_STORE_HELP = ("folder of backbone features kept per image (file checksum x backbone): train writes them, "
                      "extract reuses them; auto: $IMGSIM_FEATURE_STORE, else checkpoints/features; empty: keep none")
BACKBONE_RUNTIME_HELP = ("what runs the backbone when embedding: torch (channels-last), onnxruntime (an export "
                         "checked against torch); auto: torch")
SELECT_METRICS = ("map_at_r", "accuracy", "last")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The train stage's settings as given: None is ``auto``, chosen from the data by imgsim.stages.plan."""

    manifest_uri: str = setting("", "the split's manifest: runs:/<split run>/split, or a folder", "data")
    data_dir: str = setting("", "where the manifest's relative paths live, if not where split saw them", "data")
    backbone: str | None = setting(None, "network: auto (efficientnet_lite0 for colour images or no labels, else "
                                   "resnet_small), resnet_small (from scratch), efficientnet_lite0 (ImageNet weights "
                                   "installed), resnet18, resnet50, mobilenet_v3_large, efficientnet_b0, "
                                   "convnext_tiny", "model")
    weights: str | None = setting(None, "backbone weights: auto (DEFAULT for efficientnet_lite0, whose weights are "
                                  "installed; else none), none, a torchvision name (IMAGENET1K_V1, DEFAULT), or a "
                                  "file / s3:// / models:/ URI of a state dict", "model")
    mode: str | None = setting(None, "what trains: auto (head with pretrained weights, else full; none without "
                               "labels), head (frozen backbone: the embedding layer and classifier train on cached "
                               "features), full (every layer), none (the pretrained features as they are)", "model")
    widths: tuple[int, ...] | None = setting(None, "resnet_small's stage widths, comma-separated; auto: 32,64,128 "
                                             "below 32 px, 32,64,128,256 from 32 px", "model")
    depths: tuple[int, ...] | None = setting(None, "resnet_small's blocks per stage, comma-separated; auto: one "
                                             "each", "model")
    embedding_dim: int = setting(128, "size of the embedding (the last hidden layer); 0: none, the backbone's "
                                 "features are the embedding", "model")
    embedding_hidden: int | None = setting(None, "a hidden layer (Linear-BatchNorm-ReLU) of this width before the "
                                           "embedding; auto: 512 in head mode, none otherwise; 0: none", "model")
    feature_levels: str | None = setting(None, "what the backbone's features are: last (its last layer, pooled), "
                                         "stages (that plus each middle stage's output, pooled: efficientnet_lite0 "
                                         "only); auto: stages in head mode on efficientnet_lite0, else last", "model")
    keep_features: float | None = setting(None, "the share of the backbone's own pooled features in the similarity: "
                                          "their normalised copy follows the trained embedding, weighted so cosine "
                                          "similarity is (1 - share) x the trained part's + share x the features'; "
                                          "auto: 0.3 in head mode with an embedding, else 0", "model")
    head: str = setting("cosine", "classifier head on the embedding: cosine, arcface or linear", "model")
    scale: float = setting(16.0, "logit scale of the cosine and arcface heads", "model")
    margin: float = setting(0.2, "arcface's angular margin, in radians", "model")
    image_size: int | None = setting(None, "input side in px; auto: the median image side within [28, 32] from "
                                     "scratch, the weights' own size when pretrained", "data")
    channels: int | None = setting(None, "input channels, 1 or 3; auto: 3 if the images have colour (or the "
                                   "backbone is pretrained), else 1", "data")
    epochs: int | None = setting(None, "passes over the training split; auto: enough for ~2000 optimizer steps, 12 "
                                 "to 100 (12 for Fashion-MNIST); in head mode over the cached features, at least 10",
                                 "optimisation")
    batch_size: int | None = setting(None, "training images per optimizer step; auto: 32 below 10k training "
                                     "images, else 128 (head mode: 256 feature rows)", "optimisation")
    lr: float | None = setting(None, "peak learning rate (SGD + Nesterov, one-cycle schedule); auto: 0.2 x "
                               "batch_size / 128 (head mode: AdamW, 0.002)", "optimisation")
    backbone_lr_scale: float = setting(0.1, "pretrained backbones learn at lr x this; scratch backbones at lr",
                                       "optimisation")
    freeze_epochs: int = setting(0, "keep a pretrained backbone frozen for the first N epochs while the new head "
                                 "settles", "optimisation")
    weight_decay: float = setting(5e-4, "SGD weight decay", "optimisation")
    label_smoothing: float | None = setting(None, "cross-entropy label smoothing; auto: 0.2 in head mode, 0.1 "
                                            "otherwise", "optimisation")
    augment: str | None = setting(None, "training augmentation: auto (photo for pretrained backbones, else shift), "
                                  "none, shift, photo", "augmentation")
    head_views: int = setting(2, "head mode: augmented views of each training image embedded besides the plain "
                              "one (photo crops, flips, jitter)", "augmentation")
    head_dropout: float = setting(0.5, "head mode: dropout on the cached features while training", "optimisation")
    head_weight_decay: float = setting(0.05, "head mode: AdamW weight decay", "optimisation")
    crop_scale: float | None = setting(None, "photo: the smallest share of the image a random crop keeps; 1: no "
                                       "crop (the whole image); auto: 1 for head mode's views, 0.35 when training "
                                       "in full", "augmentation")
    color_jitter: float = setting(0.2, "photo: brightness/contrast/saturation jitter (hue a quarter of it)",
                                  "augmentation")
    select_metric: str | None = setting(None, "which epoch's model is kept: the best by eval mAP@R (against a train "
                                        "sample), by accuracy, or the last; auto: map_at_r, but last in head mode "
                                        "and without an eval split", "selection")
    select_gallery_items: int = setting(2000, "training images the eval queries are ranked against for mAP@R",
                                        "selection")
    patience: int | None = setting(None, "stop after this many epochs without a better select_metric; auto: "
                                   "never stop early", "selection")
    max_train_items: int | None = setting(None, "train on a seeded subset of this many images (quick runs); auto: "
                                          "all", "data")
    cache: bool | None = setting(None, "decoded-image cache on disk (full mode); auto: for images up to 96 px",
                                 "compute")
    workers: int | None = setting(None, "decoding processes; auto: all cores but one, at most 4", "compute")
    # Off by default: with torch 2.14.1's oneDNN on CPU, channels-last backward crashed (SIGSEGV) intermittently.
    channels_last: bool = setting(False, "channels-last memory format (faster on GPUs; crashed intermittently in "
                                  "oneDNN's backward on CPU)", "compute")
    threads: int | None = setting(None, "torch intra-op threads; auto: torch's default", "compute")
    feature_store: str | None = setting(None, FEATURE_STORE_HELP, "compute")
    backbone_runtime: str | None = setting(None, BACKBONE_RUNTIME_HELP, "compute")
    seed: int = setting(42, "random seed (initialisation, order, augmentation)", "data")
    checkpoint_dir: str = setting("checkpoints/train", "folder for the per-epoch checkpoint", "tracking")
    resume: bool = setting(False, "continue from the checkpoint in checkpoint_dir", "tracking")
    # What a cluster Job's restarted pods need, where the first attempt has nothing to resume.
    resume_if_present: bool = setting(False, "resume only if checkpoint_dir holds a checkpoint, else start fresh",
                                      "distributed")
    register_name: str = setting("imgsim", "register the trained model under this name in MLflow", "tracking")
    run_name: str = setting("", "MLflow run name; empty: the stage's name", "tracking")

    def __post_init__(self) -> None:
        # Configs written before the presets said augment: true/false; keep them meaning what they meant.
        if isinstance(self.augment, str):
            augment = self.augment.lower()
            object.__setattr__(self, "augment", {"true": None, "false": "none"}.get(augment, augment))
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        choices = {"select_metric": SELECT_METRICS, "mode": MODES, "backbone": BACKBONES, "feature_levels": LEVELS,
                   "augment": AUGMENT_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) is not None and getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of auto, {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.feature_levels is not None:
            check_levels(self.feature_levels, self.backbone)
        check_runtime(self.backbone_runtime)
        if self.crop_scale is not None and not 0 < self.crop_scale <= 1:
            raise ValueError(f"crop_scale must be within (0, 1] or auto, got {self.crop_scale}")
        for name in ("label_smoothing", "keep_features"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"{name} must be within [0, 1) or auto, got {value}")
        for name in ("embedding_dim", "embedding_hidden", "freeze_epochs", "head_views"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more{', or auto' if name == 'embedding_hidden' else ''}, "
                                 f"got {getattr(self, name)}")
        for name in ("image_size", "epochs", "batch_size", "patience", "max_train_items"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, or auto, got {getattr(self, name)}")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 or 3, or auto, got {self.channels}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be above 0, or auto, got {self.lr}")
        if self.widths == () or self.depths == ():
            raise ValueError("widths and depths list one number per stage, or are auto")
        if self.workers is not None and self.workers < 0 or self.threads is not None and self.threads < 1:
            raise ValueError("workers must be 0 or more, threads 1 or more, or auto")


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """Parameters of the extract stage."""

    model_uri: str = setting("", "the model to embed with: runs:/<train run>/model, models:/imgsim/N, or a "
                             "folder", "model")
    manifest_uri: str = setting("", "the split's manifest; empty: the one the model was trained on", "data")
    data_dir: str = setting("", "where the manifest's relative paths live, if not where split saw them", "data")
    gallery_splits: str = setting("train", "comma-separated splits to index (the gallery)", "data")
    query_split: str = setting("test", "the split whose images query the gallery in the evaluation", "evaluation")
    index: str = setting(ANNOY, "nearest-neighbour index: annoy (memory-mapped forest), faiss-flat (exact: "
                         "every query scans the gallery), faiss-hnsw (graph: faster than annoy at the same recall, "
                         "a file of the same size), faiss-ivf (inverted lists of 8-bit vectors, re-ranked exactly: "
                         "a fifth of the memory); faiss needs faiss-cpu", "index")
    n_trees: int = setting(20, "Annoy trees: more build a larger index with better recall", "index")
    search_k: int = setting(DEFAULT_SEARCH_K, "Annoy nodes inspected per query: more search slower with better "
                            "recall; with recall_target, the least effort tried", "index")
    recall_target: float = setting(RECALL_TARGET, "recall@10 against exact search the index must reach on gallery vectors: "
                                   "its effort (Annoy's search_k, faiss-hnsw's efSearch, faiss-ivf's nprobe) is raised "
                                   "until it does; 0: serve at search_k as given", "index")
    # Not batch_size: `imgsim main` takes every stage's settings as flags, and train's batch_size is the
    # optimizer's, a different thing.
    embed_batch_size: int = setting(512, "images decoded per batch while embedding (memory, not results)",
                                    "compute")
    max_queries: int = setting(0, "evaluate on at most this many query images; 0: the whole query split",
                               "evaluation")
    plot_points: int = setting(2000, "embeddings drawn in the t-SNE picture", "evaluation")
    seed: int = setting(42, "random seed (query sample, plot sample)", "data")
    threads: int | None = setting(None, "torch intra-op threads; auto: torch's default", "compute")
    workers: int | None = setting(None, "decoding processes; auto: all cores but one, at most 4", "compute")
    feature_store: str | None = setting(None, FEATURE_STORE_HELP, "compute")
    backbone_runtime: str | None = setting(None, BACKBONE_RUNTIME_HELP, "compute")
    precision: str = setting(FP32, "the served model's arithmetic, which also embeds the gallery: fp32, or int8 "
                             "(ONNX Runtime's static quantization of the backbone, calibrated on gallery images; "
                             "about twice as fast on a CPU, its results a little off fp32's)", "compute")
    gallery_name: str = setting(GALLERY_NAME, "register the bundle as a version of this gallery; empty: do not",
                                "tracking")
    gallery_alias: str = setting(GALLERY_ALIAS, "point this alias at the new version; empty: leave it alone",
                                 "tracking")
    # Sharded extraction: each of num_shards processes embeds one contiguous shard and logs it under
    # shard_group; then `merge=<shard_group>` builds the one bundle.
    num_shards: int = setting(1, "split the gallery into this many shard runs", "distributed")
    shard: int = setting(-1, "which shard this process embeds; -1: the Indexed Job's JOB_COMPLETION_INDEX",
                         "distributed")
    shard_group: str = setting("", "name that ties the shard runs of one extraction together", "distributed")
    merge: str = setting("", "merge the shard runs of this shard_group into one bundle (instead of embedding)",
                         "distributed")
    wait_s: float = setting(0.0, "with merge: wait up to this many seconds for shards still running",
                            "distributed")


    def __post_init__(self) -> None:
        check_backend(self.index)
        check_runtime(self.backbone_runtime)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision == INT8 and (self.num_shards > 1 or self.merge or self.shard_group):
            raise ValueError("precision=int8 runs in one extract process: each shard would calibrate its own model")


def check_runtime(runtime: str | None) -> None:
    if runtime is not None and runtime not in BACKBONE_RUNTIMES:
        raise ValueError(f"backbone_runtime must be one of auto, {', '.join(BACKBONE_RUNTIMES)}, got {runtime!r}")


@dataclasses.dataclass(frozen=True)
class GalleryChangeConfig:
    """What every gallery change names: the version it starts from and where the next one is registered."""

    bundle: str = setting(f"models:/{GALLERY_NAME}@{GALLERY_ALIAS}", "the gallery version to change: folder, "
                          "runs:/ or models:/", "gallery")
    register_name: str = setting(GALLERY_NAME, "register each new version under this name; empty: do not",
                                 "tracking")
    alias: str = setting(GALLERY_ALIAS, "move this alias to the new version; empty: leave it alone", "tracking")
    full: bool = setting(False, "write the whole gallery with a rebuilt index, not only the changes over its base "
                         f"version (done anyway once changes pass {MAX_CHANGE_FRACTION:.0%} of the base or "
                         f"{MAX_CHANGES:,} images, or when the gallery is given as a local folder)", "gallery")


@dataclasses.dataclass(frozen=True)
class AddConfig(GalleryChangeConfig):
    """Parameters of ``gallery add``."""

    paths: str = setting("", "image files, comma-separated (the CLI also takes them as arguments)", "data")
    folder: str = setting("", "or every image below this folder", "data")
    label: str = setting("", "label of every added image; default: its class folder under root, if that is a "
                         "model class", "data")
    root: str = setting("", "images must lie inside it; paths are stored relative to it; default: the bundle's "
                        "image root", "data")
    model_uri: str = setting("", "refuse unless this is the bundle's model (same weights)", "model")
    hash_distance: int = setting(duplicates.DEFAULT_HASH_DISTANCE, "most differing bits of 64 for a near copy "
                                 "(perceptual hash); -1: exact copies only", "gallery")
    embedding_distance: float = setting(duplicates.DEFAULT_EMBEDDING_DISTANCE, "largest cosine distance for a near "
                                        "copy", "gallery")
    skip_near_duplicates: bool = setting(False, "skip near copies too (exact copies are always skipped)",
                                         "gallery")
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, "refuse images with more pixels (decompression bombs)", "data")
    embed_batch_size: int = setting(256, "images per forward pass while embedding (memory, not results)",
                                    "compute")
    seed: int = setting(42, "random seed (recall sample)", "data")


@dataclasses.dataclass(frozen=True)
class RemoveConfig(GalleryChangeConfig):
    """Parameters of ``gallery remove``."""

    ids: str = setting("", "gallery ids to remove, comma-separated", "data")
    paths: str = setting("", "or gallery paths (as stored: relative to the image root), comma-separated", "data")
    seed: int = setting(42, "random seed (recall sample)", "data")
