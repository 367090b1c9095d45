"""The embedding network (a backbone, its pre-logits layer as the embedding, a classifier) and its TrainedModel."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from imgsim import atomic
from imgsim.nn import backbones
from imgsim.errors import ImgsimError
from imgsim.images import Preprocess
from imgsim.modelspec import MODEL_JSON, SMALL, WEIGHTS, ModelArgs, ModelSpec

class EmbeddingNet(nn.Module):
    """Backbone -> linear embedding -> classifier; ``forward`` gives logits, ``embed`` the L2-normalised embedding."""

    def __init__(self, args: ModelArgs, preprocess: Preprocess, pretrained: dict | None = None) -> None:
        super().__init__()
        self.args, self.preprocess = args, preprocess
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, -1, 1, 1))
        in_channels = preprocess.channels if args.backbone == SMALL else 3
        # torchvision backbones take RGB: a grayscale model repeats its one channel.
        self.repeat = in_channels // preprocess.channels
        self.trunk, features = backbones.build_trunk(args.backbone, in_channels, args.widths, args.depths, pretrained,
                                                     args.feature_levels)
        self.embedding = _embedding_layer(features, args.embedding_dim, args.embedding_hidden)
        self.dim, dim = args.dim, args.trained_dim
        self.classifier = nn.Linear(dim, args.num_classes, bias=args.head == "linear") if args.num_classes else None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of a float batch in [0, 1], shape (N, C, H, W)."""
        x = (x - self.mean) / self.std
        return self.trunk(x.repeat(1, self.repeat, 1, 1) if self.repeat > 1 else x)

    def head(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from un-normalised embeddings; ``labels`` (training) apply arcface's margin."""
        if self.classifier is None:
            return emb[:, :0]  # (N, 0): a slice keeps the batch dimension dynamic in an ONNX export
        if self.args.head == "linear":
            return self.classifier(emb)
        cos = F.linear(F.normalize(emb, dim=1), F.normalize(self.classifier.weight, dim=1))
        if self.args.head == "arcface" and labels is not None:
            cos = _angular_margin(cos, labels, self.args.margin)
        return self.args.scale * cos

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits; an embed-only model (no classifier) returns its normalised embedding instead."""
        if self.classifier is None:
            return self.embed(x)
        return self.head(self.embedding(self.forward_features(x)), labels)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings, shape (N, dim)."""
        return self.embed_features(self.forward_features(x))[0]

    def embed_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``embed_and_classify`` of uint8 images (N, C, H, W), scaled to [0, 1] here: what extract, serving and
        the ONNX export (inside its graph) all run."""
        return self.embed_and_classify(images.float() / 255.0)

    def embed_and_classify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised embeddings and logits (N x 0 without a classifier) from one backbone pass."""
        return self.embed_features(self.forward_features(x))

    def embed_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``embed_and_classify`` from pooled backbone features (head mode trains on cached ones). With
        ``keep_features`` the backbone's own pooled last layer, normalised, follows the trained embedding: each part
        scaled so the whole has norm 1 and a dot product weighs the features' cosine by keep_features."""
        emb = self.embedding(features)
        out, keep = F.normalize(emb, dim=1), self.args.keep_features
        if keep:
            own = F.normalize(features[:, -self.args.kept_dim:], dim=1)
            out = torch.cat([math.sqrt(1 - keep) * out, math.sqrt(keep) * own], dim=1)
        return out, self.head(emb)

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        trunk = {id(p) for p in self.trunk.parameters()}
        return [p for p in self.parameters() if id(p) not in trunk]


def _embedding_layer(features: int, dim: int, hidden: int) -> nn.Module:
    """Pooled features -> embedding: linear, or a small MLP (what head mode trains on frozen pretrained features:
    it beat a linear layer's mAP@R on all three colour dev sets, bench/quality.py), or the features as they are."""
    if not dim:
        return nn.Identity()
    if not hidden:
        return nn.Linear(features, dim)
    return nn.Sequential(nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim))


def _angular_margin(cos: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """ArcFace: cos(theta + m) for the true class; past pi - m, fall back to cos - m sin(m) to stay monotonic."""
    target = cos.gather(1, labels[:, None]).clamp(-1 + 1e-6, 1 - 1e-6)
    sin = torch.sqrt(1 - target * target)
    shifted = target * math.cos(margin) - sin * math.sin(margin)
    shifted = torch.where(target > math.cos(math.pi - margin), shifted, target - math.sin(math.pi - margin) * margin)
    return cos.scatter(1, labels[:, None], shifted)


@dataclasses.dataclass
class TrainedModel:
    """Weights plus everything needed to use them: architecture, preprocessing, class names, config."""

    args: ModelArgs
    preprocess: Preprocess
    classes: list[str]
    state_dict: dict[str, torch.Tensor]
    config: dict = dataclasses.field(default_factory=dict)

    def build(self) -> EmbeddingNet:
        """A ready-to-use model in eval mode."""
        model = EmbeddingNet(self.args, self.preprocess)
        model.load_state_dict(self.state_dict)
        return model.eval()

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(self.args, self.preprocess, self.classes, self.config)

    def save(self, out_dir: str | Path) -> Path:
        """Write ``model.json`` and ``weights.pt`` atomically into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(out / WEIGHTS) as tmp:
            torch.save(self.state_dict, tmp)
        atomic.write_text(out / MODEL_JSON, json.dumps(self.spec.meta(), indent=2))
        return out

    def fingerprint(self) -> str:
        """sha256 of the weights' values (names, dtypes, shapes, bytes): equal for the same model however its
        file was written (torch.save of equal tensors differs by the file's layout)."""
        digest = hashlib.sha256()
        for name in sorted(self.state_dict):
            tensor = self.state_dict[name].detach().cpu().contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())
        return digest.hexdigest()

    @classmethod
    def load(cls, in_dir: str | Path) -> "TrainedModel":
        """Load from a bundle folder or an MLflow model folder (files under ``extra_files/``)."""
        folder = Path(in_dir)
        if not (folder / MODEL_JSON).exists() and (folder / "extra_files" / MODEL_JSON).exists():
            folder = folder / "extra_files"
        try:
            spec = ModelSpec.load(folder)
            state = _upgrade(torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True))
            return cls(spec.args, spec.preprocess, spec.classes, state, spec.config)
        except (OSError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ImgsimError(f"no usable imgsim model in {in_dir} ({exc!r}); expected {MODEL_JSON} and {WEIGHTS} "
                              "as written by the train stage") from None


def _upgrade(state: dict) -> dict:
    """Models saved before backbones were pluggable kept the small ResNet's layers at the top level."""
    old = ("stem.", "stages.")
    return {("trunk." + k if k.startswith(old) else k): v for k, v in state.items()}
