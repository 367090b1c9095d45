"""A lightweight ResNet whose pre-logits layer is the embedding, and its ModelBundle artifact."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from imgsim import atomic
from imgsim.errors import ImgsimError
from imgsim.images import Preprocess

MODEL_JSON, WEIGHTS = "model.json", "weights.pt"


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """Constructor arguments, saved beside the weights so the model rebuilds without the trainer."""

    num_classes: int
    widths: tuple[int, ...] = (32, 64, 128)
    depths: tuple[int, ...] = (1, 1, 1)
    embedding_dim: int = 128
    head: str = "cosine"  # "cosine": logits = scale * cos(embedding, class weight); "linear": plain
    scale: float = 16.0

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.depths) or not self.widths:
            raise ImgsimError(f"widths {self.widths} and depths {self.depths} must be non-empty and of equal length")
        if min(self.widths) < 1 or min(self.depths) < 1 or self.embedding_dim < 2:
            raise ImgsimError(f"widths {self.widths} and depths {self.depths} must be >= 1 and "
                              f"embedding_dim >= 2 (got {self.embedding_dim})")
        if self.num_classes < 2:
            raise ImgsimError(f"a classifier needs at least 2 classes, got {self.num_classes}; add class folders")
        if self.head not in ("cosine", "linear"):
            raise ImgsimError(f"head must be 'cosine' or 'linear', got {self.head!r}")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or projected) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x), inplace=True)


class EmbeddingResNet(nn.Module):
    """ResNet trunk -> linear embedding -> classifier; ``forward`` gives logits, ``embed`` the L2-normalised embedding."""

    def __init__(self, args: ModelArgs, preprocess: Preprocess) -> None:
        super().__init__()
        self.args = args
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, -1, 1, 1))
        w0 = args.widths[0]
        self.stem = nn.Sequential(nn.Conv2d(preprocess.channels, w0, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(w0), nn.ReLU(inplace=True))
        blocks, c_in = [], w0
        for i, (width, depth) in enumerate(zip(args.widths, args.depths)):
            for j in range(depth):
                blocks.append(BasicBlock(c_in, width, 2 if i > 0 and j == 0 else 1))
                c_in = width
        self.stages = nn.Sequential(*blocks)
        self.embedding = nn.Linear(c_in, args.embedding_dim)
        self.classifier = nn.Linear(args.embedding_dim, args.num_classes, bias=args.head == "linear")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled trunk features of a float batch in [0, 1], shape (N, C, H, W)."""
        x = (x - self.mean) / self.std
        return torch.flatten(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1)

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        """Logits from un-normalised embeddings."""
        if self.args.head == "cosine":
            return self.args.scale * F.linear(F.normalize(emb, dim=1), F.normalize(self.classifier.weight, dim=1))
        return self.classifier(emb)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(self.forward_features(x)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings, shape (N, embedding_dim)."""
        return F.normalize(self.embedding(self.forward_features(x)), dim=1)

    def embed_and_classify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised embeddings and logits from one trunk pass."""
        emb = self.embedding(self.forward_features(x))
        return F.normalize(emb, dim=1), self.head(emb)


@dataclasses.dataclass
class ModelBundle:
    """Weights plus everything needed to use them: architecture, preprocessing, class names, config."""

    args: ModelArgs
    preprocess: Preprocess
    classes: list[str]
    state_dict: dict[str, torch.Tensor]
    config: dict = dataclasses.field(default_factory=dict)

    def build(self) -> EmbeddingResNet:
        """A ready-to-use model in eval mode."""
        model = EmbeddingResNet(self.args, self.preprocess)
        model.load_state_dict(self.state_dict)
        return model.eval()

    def meta(self) -> dict:
        return {"args": dataclasses.asdict(self.args), "preprocess": dataclasses.asdict(self.preprocess),
                "classes": self.classes, "config": self.config}

    def save(self, out_dir: str | Path) -> Path:
        """Write ``model.json`` and ``weights.pt`` atomically into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(out / WEIGHTS) as tmp:
            torch.save(self.state_dict, tmp)
        atomic.write_text(out / MODEL_JSON, json.dumps(self.meta(), indent=2))
        return out

    @classmethod
    def load(cls, in_dir: str | Path) -> "ModelBundle":
        """Load from a bundle folder or an MLflow model folder (files under ``extra_files/``)."""
        folder = Path(in_dir)
        if not (folder / MODEL_JSON).exists() and (folder / "extra_files" / MODEL_JSON).exists():
            folder = folder / "extra_files"
        try:
            meta = json.loads((folder / MODEL_JSON).read_text())
            args = ModelArgs(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["args"].items()})
            state = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
            return cls(args, Preprocess.from_dict(meta["preprocess"]), list(meta["classes"]), state, meta.get("config", {}))
        except (OSError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ImgsimError(f"no usable imgsim model in {in_dir} ({exc!r}); expected {MODEL_JSON} and {WEIGHTS} "
                              "as written by the train stage") from None


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
