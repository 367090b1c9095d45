"""Embed images with a model, streamed through a DataLoader: shared by train (model selection), extract and bench."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils.data import Dataset
from tqdm import tqdm

from imgsim.nn import allocator
from imgsim.nn.data import ImageArray, make_loader
from imgsim.nn.model import EmbeddingNet


def embed_dataset(model: EmbeddingNet, dataset: Dataset, batch_size: int = 512, desc: str = "embedding", *,
                  workers: int | None = None, on_batch: Callable[[NDArray[np.uint8]], None] | None = None
                  ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Normalised embeddings and logits of a dataset, streamed through a DataLoader (workers decode) into
    preallocated arrays: memory holds the outputs and a few batches, never the images. ``on_batch`` sees each
    batch of model inputs, in order (extract hashes them for duplicate detection)."""
    allocator.keep_freed_memory()
    n, classes = len(dataset), model.args.num_classes
    embeddings = np.empty((n, model.dim), dtype=np.float32)
    logits = np.empty((n, classes), dtype=np.float32)
    start = 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for images, _ in tqdm(make_loader(dataset, batch_size, workers=workers), desc=desc, unit="batch",
                              mininterval=1.0, disable=not desc):
            if on_batch is not None:
                on_batch(images.numpy())
            emb, logit = model.embed_images(images.to(device, non_blocking=True))
            end = start + len(emb)
            embeddings[start:end], logits[start:end] = emb.cpu().numpy(), logit.cpu().numpy()
            start = end
    model.train(was_training)
    return embeddings, logits


def embed_array(model: EmbeddingNet, images: NDArray[np.uint8]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Normalised embeddings and logits of one small uint8 batch, in one call: the serving path."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        emb, logits = model.embed_images(torch.from_numpy(np.ascontiguousarray(images)).to(device))
    return emb.cpu().numpy(), logits.cpu().numpy()


def embed_batches(model: EmbeddingNet, images: NDArray[np.uint8], batch_size: int,
                  desc: str) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Normalised embeddings and logits of already decoded uint8 images."""
    return embed_dataset(model, ImageArray(images, np.zeros(len(images), np.int64)), batch_size, desc)
