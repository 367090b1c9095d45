"""Stage 3: embed the gallery, build the Annoy index and evaluate retrieval on the test split."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from imgsim.data import label_ids, load_items
from imgsim.errors import ImgsimError
from imgsim.index import DEFAULT_SEARCH_K, GalleryItem, IndexBundle
from imgsim.manifest import SPLITS, Manifest
from imgsim.metrics import exact_topk, recall_at_k, retrieval_metrics
from imgsim.model import EmbeddingResNet, ModelBundle


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """Parameters of the extract stage."""

    model_uri: str = ""
    manifest_uri: str = ""  # default: the manifest the model was trained on
    data_dir: str = ""
    gallery_splits: str = "train"  # comma-separated splits to index
    query_split: str = "test"
    n_trees: int = 20
    search_k: int = DEFAULT_SEARCH_K
    batch_size: int = 512
    max_queries: int = 0  # 0 = the whole query split
    plot_points: int = 2000
    seed: int = 42
    threads: int = 0


@dataclasses.dataclass
class ExtractResult:
    """The built index, evaluation metrics, and the query embeddings used for plots."""

    index: IndexBundle
    metrics: dict[str, float]
    queries: NDArray[np.float32]
    query_items: list


def extract(cfg: ExtractConfig, bundle: ModelBundle, manifest: Manifest) -> ExtractResult:
    """Embed gallery and queries, build the index, and measure classification and retrieval quality."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if list(manifest.classes) != list(bundle.classes):
        raise ImgsimError(f"the model was trained on classes {bundle.classes} but the manifest has "
                          f"{manifest.classes}; use the manifest the model was trained on")
    splits = [s.strip() for s in cfg.gallery_splits.split(",") if s.strip()]
    if not splits or set(splits) - set(SPLITS):
        raise ImgsimError(f"gallery_splits={cfg.gallery_splits!r} must name splits from {SPLITS}")
    model, root = bundle.build(), cfg.data_dir or manifest.root
    gallery_items = [item for item in manifest.items if item.split in splits]
    query_items = manifest.split(cfg.query_split)[: cfg.max_queries or None]
    gallery_x = load_items(gallery_items, root, bundle.preprocess, desc="extract: loading gallery")
    started = time.perf_counter()
    gallery = extract_embeddings(model, gallery_x, cfg.batch_size, desc="extract: embedding gallery")
    embed_seconds = time.perf_counter() - started
    items = [GalleryItem(i, it.path, it.label, it.split, it.sha256) for i, it in enumerate(gallery_items)]
    started = time.perf_counter()
    index = IndexBundle.build(gallery, items, n_trees=cfg.n_trees, seed=cfg.seed)
    metrics = {"gallery_size": float(len(items)), "embed_images_per_second": len(items) / max(embed_seconds, 1e-9),
               "index_build_seconds": time.perf_counter() - started}
    queries = np.zeros((0, gallery.shape[1]), dtype=np.float32)
    if query_items:
        query_x = load_items(query_items, root, bundle.preprocess, desc="extract: loading queries")
        queries, logits = embed_batches(model, query_x, cfg.batch_size, "extract: embedding queries")
        metrics |= evaluate(queries, logits, label_ids(query_items, bundle.classes), gallery,
                            label_ids(gallery_items, bundle.classes), index, cfg.search_k)
    return ExtractResult(index, metrics, queries, query_items)


def extract_embeddings(model: EmbeddingResNet, images: NDArray[np.uint8], batch_size: int = 512,
                       desc: str = "embedding") -> NDArray[np.float32]:
    """L2-normalised float32 embeddings (N x D) of uint8 images, in batches, with a progress bar."""
    return embed_batches(model, images, batch_size, desc)[0]


def embed_batches(model: EmbeddingResNet, images: NDArray[np.uint8], batch_size: int,
                  desc: str) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Normalised embeddings and logits of uint8 images, in batches, with a progress bar."""
    embeddings, logits = [], []
    with torch.inference_mode():
        for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", mininterval=1.0):
            batch = torch.from_numpy(images[start:start + batch_size]).float().div_(255.0)
            emb, logit = model.embed_and_classify(batch)
            embeddings.append(emb.numpy())
            logits.append(logit.numpy())
    dim = model.args.embedding_dim
    if not embeddings:
        return np.zeros((0, dim), np.float32), np.zeros((0, model.args.num_classes), np.float32)
    return np.concatenate(embeddings), np.concatenate(logits)


def evaluate(queries, logits, query_labels, gallery, gallery_labels, index: IndexBundle,
             search_k: int = -1, k: int = 10) -> dict[str, float]:
    """Accuracy, Precision@1/@10, mAP@R (exact search) and the Annoy index's recall@k against exact search."""
    metrics = {"accuracy": float((logits.argmax(1) == query_labels).mean())}
    metrics |= retrieval_metrics(queries, query_labels, gallery, gallery_labels)
    exact = exact_topk(queries, gallery, k)
    approx = [index.search(q, k, search_k)[0] for q in queries]
    metrics[f"index_recall_at_{k}"] = recall_at_k(approx, exact, k)
    return metrics
