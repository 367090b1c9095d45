"""Stage 3: embed the gallery (streamed), build the Annoy index and evaluate retrieval on the test split."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from imgsim.bundle_format import Probes
from imgsim.errors import ImgsimError
from imgsim.index import GalleryIndex, GalleryItem
from imgsim.manifest import SPLITS, Manifest
from imgsim.effort import tune
from imgsim.metrics import index_recall, retrieval_metrics
from imgsim.nn.data import ImageFiles, label_ids
from imgsim.modelspec import INT8
from imgsim.nn.embed import embed_array
from imgsim.nn.feature_store import FeatureStore, head_outputs, item_features, open_store
from imgsim.nn.model import EmbeddingNet, TrainedModel
from imgsim.nn.quantize import Int8Model, calibration_rows, int8_model
from imgsim.nn.trunk import Trunk
from imgsim.stages.bundle_writer import build_probes
from imgsim.stages.settings import ExtractConfig


@dataclasses.dataclass
class ExtractResult:
    """The built index with its probe set, evaluation metrics, and the query embeddings used for plots."""

    index: GalleryIndex
    probes: Probes
    metrics: dict[str, float]
    queries: NDArray[np.float32]
    query_items: list
    search_k: int = -1  # the effort the index serves with (Annoy's; faiss keeps its own in the file)
    int8: Int8Model | None = None  # the model served and embedded with, where precision=int8


@dataclasses.dataclass
class Part:
    """One shard's embeddings: the gallery and query items in ``[start, stop)`` of each list (all of them when
    unsharded), with their perceptual hashes. Saved by a shard process, concatenated by the merge."""

    shard: int
    num_shards: int
    gallery_range: tuple[int, int]
    query_range: tuple[int, int]
    gallery: NDArray[np.float32]
    hashes: list[str]
    queries: NDArray[np.float32]
    logits: NDArray[np.float32]
    embed_seconds: float = 0.0
    embedded: int = -1  # gallery images that went through the backbone (the rest reused kept features)

    def save(self, path: Path) -> Path:
        from imgsim import atomic

        with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, shard=self.shard, num_shards=self.num_shards, gallery_range=self.gallery_range,
                     query_range=self.query_range, gallery=self.gallery, hashes=np.asarray(self.hashes, dtype="U16"),
                     queries=self.queries, logits=self.logits, embed_seconds=self.embed_seconds,
                     embedded=self.embedded)
        return path

    @classmethod
    def load(cls, path: Path) -> "Part":
        with np.load(path, allow_pickle=False) as d:
            return cls(int(d["shard"]), int(d["num_shards"]), tuple(int(x) for x in d["gallery_range"]),
                       tuple(int(x) for x in d["query_range"]), d["gallery"].astype(np.float32),
                       [str(h) for h in d["hashes"]], d["queries"].astype(np.float32), d["logits"].astype(np.float32),
                       float(d["embed_seconds"]), int(d["embedded"]) if "embedded" in d else -1)


def shard_range(n: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Shard ``shard``'s contiguous slice of ``n`` items: sizes differ by at most one, the order is kept."""
    bounds = np.linspace(0, n, num_shards + 1).round().astype(int)
    return int(bounds[shard]), int(bounds[shard + 1])


def extract(cfg: ExtractConfig, bundle: TrainedModel, manifest: Manifest) -> ExtractResult:
    """Embed gallery and queries, build the index, and measure classification and retrieval quality.

    Without labels (an unlabelled folder, or an embed-only model) label metrics are skipped; the index's
    recall against exact search is always measured."""
    model = bundle.build()  # once: the embedding and the probes use the same network
    int8 = quantized(cfg, bundle, manifest) if cfg.precision == INT8 else None
    return assemble(cfg, bundle, manifest, [embed_part(cfg, bundle, manifest, 0, 1, model, int8)], model, int8)


def quantized(cfg: ExtractConfig, bundle: TrainedModel, manifest: Manifest) -> Int8Model:
    """The int8 serving model, calibrated on a seeded sample of the gallery."""
    gallery_items, _ = _items(cfg, bundle, manifest)
    files = ImageFiles(gallery_items, cfg.data_dir or manifest.root, bundle.preprocess)
    rows = calibration_rows(len(gallery_items), cfg.seed)
    print(f"extract: quantizing the model to int8, calibrated on {len(rows)} gallery images")
    return int8_model(bundle, np.stack([files.read(int(r)) for r in rows]), cfg.threads or torch.get_num_threads())


def _items(cfg: ExtractConfig, bundle: TrainedModel, manifest: Manifest) -> tuple[list, list]:
    """The gallery and query items of ``manifest``, in the order every shard and the merge agree on."""
    if bundle.classes and list(manifest.classes) != list(bundle.classes):
        raise ImgsimError(f"the model was trained on classes {bundle.classes} but the manifest has "
                          f"{manifest.classes}; use the manifest the model was trained on")
    splits = [s.strip() for s in cfg.gallery_splits.split(",") if s.strip()]
    if not splits or set(splits) - set(SPLITS):
        raise ImgsimError(f"gallery_splits={cfg.gallery_splits!r} must name splits from {SPLITS}")
    gallery_items = [item for item in manifest.items if item.split in splits]
    query_items = manifest.split(cfg.query_split)[: cfg.max_queries or None] if manifest.classes else []
    return gallery_items, query_items


def embed_part(cfg: ExtractConfig, bundle: TrainedModel, manifest: Manifest, shard: int, num_shards: int,
               model: EmbeddingNet | None = None, int8: Int8Model | None = None) -> Part:
    """Embed shard ``shard`` of ``num_shards``: its slice of the gallery and of the queries (with ``int8``, by
    that model alone)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    gallery_items, query_items = _items(cfg, bundle, manifest)
    model, root = bundle.build() if model is None else model, cfg.data_dir or manifest.root
    g0, g1 = shard_range(len(gallery_items), shard, num_shards)
    q0, q1 = shard_range(len(query_items), shard, num_shards)
    label = f" (shard {shard + 1}/{num_shards})" if num_shards > 1 else ""
    started = time.perf_counter()
    if int8 is None:
        # Features train kept (keyed by file checksum and backbone) skip the backbone; only the head runs on them.
        trunk, store = Trunk(model, cfg.backbone_runtime, cfg.threads), open_store(cfg.feature_store, model)
        finish = lambda features: head_outputs(model, features)  # noqa: E731
    else:  # the int8 model embeds every image: kept features are the float32 backbone's
        trunk, store = int8.outputs, FeatureStore(None, INT8)
        finish = lambda both: (both[:, :model.dim], both[:, model.dim:])  # noqa: E731
    # New features are kept only for a backbone train kept some of (a frozen one): a fine-tuned model's are never
    # asked for again.
    keep = len(store) > 0
    features, hashes, embedded = item_features(gallery_items[g0:g1], root, bundle.preprocess, trunk, store,
                                               batch=cfg.embed_batch_size, workers=cfg.workers,
                                               desc=f"extract: embedding gallery{label}", keep_new=keep)
    gallery, _ = finish(features)
    embed_seconds = time.perf_counter() - started
    queries = np.zeros((0, model.dim), dtype=np.float32)
    logits = np.zeros((0, model.args.num_classes), dtype=np.float32)
    if q1 > q0:
        features, _, _ = item_features(query_items[q0:q1], root, bundle.preprocess, trunk, store,
                                       batch=cfg.embed_batch_size, workers=cfg.workers,
                                       desc=f"extract: embedding queries{label}", keep_new=keep)
        queries, logits = finish(features)
    if int8 is None:
        print(f"extract: {g1 - g0 - embedded} of {g1 - g0} gallery images reused train's backbone features{label}")
    return Part(shard, num_shards, (g0, g1), (q0, q1), gallery, hashes, queries, logits, embed_seconds,
                embedded)


def assemble(cfg: ExtractConfig, bundle: TrainedModel, manifest: Manifest, parts: list[Part],
             model: EmbeddingNet | None = None, int8: Int8Model | None = None) -> ExtractResult:
    """Join the parts (every shard exactly once, in order), build the index and probes, and evaluate."""
    gallery_items, query_items = _items(cfg, bundle, manifest)
    check_parts(parts, len(gallery_items), len(query_items))
    gallery = np.concatenate([p.gallery for p in parts])
    hashes = [h for p in parts for h in p.hashes]
    model, root = bundle.build() if model is None else model, cfg.data_dir or manifest.root
    items = [GalleryItem(i, it.path, it.label, it.split, it.sha256, h)
             for i, (it, h) in enumerate(zip(gallery_items, hashes, strict=True))]
    started = time.perf_counter()
    index = GalleryIndex.build(gallery, items, n_trees=cfg.n_trees, seed=cfg.seed, backend=cfg.index)
    search_k, effort_metrics = cfg.search_k, {}
    if cfg.recall_target > 0:
        tuning = time.perf_counter()
        effort = tune(index, gallery, cfg.recall_target, cfg.search_k, cfg.seed)
        search_k, effort_metrics = effort.search_k, {"index_search_effort": float(effort.value),
                                                     "index_recall_tuned_at_10": effort.recall,
                                                     "index_tune_seconds": time.perf_counter() - tuning}
        if not effort.reached:
            print(f"extract: the {cfg.index} index reaches recall@10 {effort.recall:.3f} at its largest effort "
                  f"({effort.value}), short of recall_target {cfg.recall_target}: more n_trees, or index=faiss-hnsw "
                  "or faiss-flat")
    probes = build_probes(model, index, ImageFiles(gallery_items, root, bundle.preprocess).read, gallery, cfg.seed,
                          int8.engine if int8 else None)
    embed_seconds = sum(p.embed_seconds for p in parts)  # summed over shards: images per second of one process
    metrics = {"gallery_size": float(len(items)), "embed_images_per_second": len(items) / max(embed_seconds, 1e-9),
               **({"gallery_images_through_backbone": float(sum(p.embedded for p in parts))}
                  if all(p.embedded >= 0 for p in parts) else {}),
               "index_build_seconds": time.perf_counter() - started, **effort_metrics}
    if int8 is not None:  # how far int8 moved the served embeddings from the float32 model's
        cosine = (embed_array(model, probes.inputs)[0] * probes.embeddings).sum(axis=1)
        metrics |= {"int8_probe_cosine_mean": float(cosine.mean()), "int8_probe_cosine_min": float(cosine.min())}
    queries = np.concatenate([p.queries for p in parts])
    if query_items:
        logits = np.concatenate([p.logits for p in parts])
        metrics |= evaluate(queries, logits, label_ids(query_items, manifest.classes), gallery,
                            label_ids(gallery_items, manifest.classes), index, search_k)
    else:  # no labelled queries: the index is still checked against exact search, on a sample of the gallery
        sample = gallery[np.random.default_rng(cfg.seed).permutation(len(gallery))[:1000]]
        metrics |= index_recall(sample, gallery, index, search_k)
    return ExtractResult(index, probes, metrics, queries, query_items, search_k, int8)


def check_parts(parts: list[Part], n_gallery: int, n_queries: int) -> None:
    """Every shard of one split of this manifest, exactly once: else a clear error, before anything is built."""
    counts = {p.num_shards for p in parts}
    if len(counts) != 1:
        raise ImgsimError(f"the shards disagree on how many there are ({sorted(counts)}): they come from different "
                          "sharded runs; run every shard of one group with the same --num-shards")
    n = counts.pop()
    seen = sorted(p.shard for p in parts)
    missing, repeated = sorted(set(range(n)) - set(seen)), sorted({s for s in seen if seen.count(s) > 1})
    if missing or repeated:
        raise ImgsimError(f"shards of {n}: " + "; ".join(filter(None, [
            f"missing {missing}" if missing else "", f"present more than once {repeated}" if repeated else ""])) +
            ". Run the missing shards (or start a new group for repeated ones); no bundle was written.")
    parts.sort(key=lambda p: p.shard)
    for p in parts:
        want_g, want_q = shard_range(n_gallery, p.shard, n), shard_range(n_queries, p.shard, n)
        if p.gallery_range != want_g or p.query_range != want_q or len(p.gallery) != want_g[1] - want_g[0] \
                or len(p.queries) != want_q[1] - want_q[0]:
            raise ImgsimError(f"shard {p.shard} covers gallery items {p.gallery_range} and queries {p.query_range}, "
                              f"but this manifest's shard {p.shard} of {n} is {want_g} and {want_q}: it was embedded "
                              "from another manifest or gallery_splits; no bundle was written")


def evaluate(queries, logits, query_labels, gallery, gallery_labels, index: GalleryIndex,
             search_k: int = -1, k: int = 10) -> dict[str, float]:
    """Accuracy, Precision@1/@10, mAP@R (exact search) and the Annoy index's recall@k against exact search."""
    metrics = {"accuracy": float((logits.argmax(1) == query_labels).mean())} if logits.shape[1] else {}
    metrics |= retrieval_metrics(queries, query_labels, gallery, gallery_labels)
    return metrics | index_recall(queries, gallery, index, search_k, k, query_labels, gallery_labels)
