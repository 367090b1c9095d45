"""Reference embeddings that a trained model has to beat: raw pixels and an untrained network."""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray

from imgsim.images import Preprocess
from imgsim.modelspec import ModelArgs
from imgsim.nn.model import EmbeddingNet


def pixel_embeddings(images: NDArray[np.uint8]) -> NDArray[np.float32]:
    """Flattened, mean-centred, L2-normalised pixels: cosine similarity on raw pixels."""
    flat = images.reshape(len(images), -1).astype(np.float32)
    flat -= flat.mean(axis=1, keepdims=True)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-6)


def untrained_model(args: ModelArgs, preprocess: Preprocess, seed: int = 0) -> EmbeddingNet:
    """The same architecture with random weights (batch-norm in eval mode)."""
    torch.manual_seed(seed)
    return EmbeddingNet(args, preprocess).eval()
