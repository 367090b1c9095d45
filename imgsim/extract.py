"""Stage 3: embed the gallery (streamed), build the Annoy index and evaluate retrieval on the test split."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from numpy.typing import NDArray
from imgsim import dedup
from imgsim.bundle import Probes, build_probes
from imgsim.data import ImageFiles, label_ids
from imgsim.embed import embed_dataset
from imgsim.errors import ImgsimError
from imgsim.index import DEFAULT_SEARCH_K, GalleryItem, IndexBundle
from imgsim.manifest import SPLITS, Manifest
from imgsim.metrics import index_recall, retrieval_metrics
from imgsim.model import ModelBundle


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
    workers: int = -1  # decoding processes; -1: all cores but one, at most 4
    gallery_name: str = "imgsim-gallery"  # register the bundle as a version of this gallery ("" = do not)
    gallery_alias: str = "serving"  # and point this alias at it ("" = leave the alias alone)


@dataclasses.dataclass
class ExtractResult:
    """The built index with its probe set, evaluation metrics, and the query embeddings used for plots."""

    index: IndexBundle
    probes: Probes
    metrics: dict[str, float]
    queries: NDArray[np.float32]
    query_items: list


def extract(cfg: ExtractConfig, bundle: ModelBundle, manifest: Manifest) -> ExtractResult:
    """Embed gallery and queries, build the index, and measure classification and retrieval quality.

    Without labels (an unlabelled folder, or an embed-only model) label metrics are skipped; the index's
    recall against exact search is always measured."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if bundle.classes and list(manifest.classes) != list(bundle.classes):
        raise ImgsimError(f"the model was trained on classes {bundle.classes} but the manifest has "
                          f"{manifest.classes}; use the manifest the model was trained on")
    splits = [s.strip() for s in cfg.gallery_splits.split(",") if s.strip()]
    if not splits or set(splits) - set(SPLITS):
        raise ImgsimError(f"gallery_splits={cfg.gallery_splits!r} must name splits from {SPLITS}")
    model, root = bundle.build(), cfg.data_dir or manifest.root
    gallery_items = [item for item in manifest.items if item.split in splits]
    query_items = manifest.split(cfg.query_split)[: cfg.max_queries or None] if manifest.classes else []
    started = time.perf_counter()
    hashes: list[str] = []
    gallery, _ = embed_dataset(model, ImageFiles(gallery_items, root, bundle.preprocess), cfg.batch_size,
                               "extract: embedding gallery", workers=cfg.workers,
                               on_batch=lambda inputs: hashes.extend(dedup.to_hex(dedup.phash_inputs(inputs))))
    embed_seconds = time.perf_counter() - started
    items = [GalleryItem(i, it.path, it.label, it.split, it.sha256, h)
             for i, (it, h) in enumerate(zip(gallery_items, hashes, strict=True))]
    started = time.perf_counter()
    index = IndexBundle.build(gallery, items, n_trees=cfg.n_trees, seed=cfg.seed)
    probes = build_probes(model, index, ImageFiles(gallery_items, root, bundle.preprocess).read, gallery, cfg.seed)
    metrics = {"gallery_size": float(len(items)), "embed_images_per_second": len(items) / max(embed_seconds, 1e-9),
               "index_build_seconds": time.perf_counter() - started}
    queries = np.zeros((0, gallery.shape[1]), dtype=np.float32)
    if query_items:
        queries, logits = embed_dataset(model, ImageFiles(query_items, root, bundle.preprocess), cfg.batch_size,
                                        "extract: embedding queries", workers=cfg.workers)
        metrics |= evaluate(queries, logits, label_ids(query_items, manifest.classes), gallery,
                            label_ids(gallery_items, manifest.classes), index, cfg.search_k)
    else:  # no labelled queries: the index is still checked against exact search, on a sample of the gallery
        sample = gallery[np.random.default_rng(cfg.seed).permutation(len(gallery))[:1000]]
        metrics |= index_recall(sample, gallery, index, cfg.search_k)
    return ExtractResult(index, probes, metrics, queries, query_items)


def evaluate(queries, logits, query_labels, gallery, gallery_labels, index: IndexBundle,
             search_k: int = -1, k: int = 10) -> dict[str, float]:
    """Accuracy, Precision@1/@10, mAP@R (exact search) and the Annoy index's recall@k against exact search."""
    metrics = {"accuracy": float((logits.argmax(1) == query_labels).mean())} if logits.shape[1] else {}
    metrics |= retrieval_metrics(queries, query_labels, gallery, gallery_labels)
    return metrics | index_recall(queries, gallery, index, search_k, k)
