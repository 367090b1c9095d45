"""Train mode ``head``: a frozen pretrained backbone embeds every image once (the plain view plus a few augmented
ones), the features are cached on disk, and only the embedding layer and the classifier train on them: seconds
per epoch on a CPU instead of minutes. The bundle holds the whole network, so extract, export and serving see an
ordinary model."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch.utils.data import Dataset
from tqdm import tqdm

from imgsim import atomic
from imgsim.errors import ImgsimError
from imgsim.manifest import Item, Manifest
from imgsim.metrics import retrieval_metrics
from imgsim.nn import augment, distributed
from imgsim.nn.data import ImageFiles, Transformed, label_ids, make_loader
from imgsim.nn.feature_store import item_features, open_store
from imgsim.nn.model import EmbeddingNet, ModelBundle
from imgsim.nn.trunk import Trunk
from imgsim.stages.settings import TrainConfig

HEAD_BATCH, HEAD_LR = 256, 2e-3  # features are small: large batches cost nothing and steady AdamW
HEAD_HIDDEN, HEAD_STEPS = 512, 2000
# The views' crop: none. Queries and the gallery are whole images; on the three colour dev sets, views of the
# whole image (flipped, colour-jittered) raised mAP@R over crops of at least 35 % of it (0.806 -> 0.811 Tux
# Paint, 0.694 -> 0.736 Oxygen, 0.811 -> 0.843 Wesnoth; means of two seeds) at the same P@1.
HEAD_CROP = 1.0
PROTOTYPE_INIT, PROTOTYPE_LR = 0.01, 3.0  # see _optimizer
# The trained embedding learns the collection's classes and forgets what the backbone saw: on Tux Paint its top hit
# fell below the untrained features' own. With the features' normalised copy kept beside it at this share of the
# similarity, P@1 rose on Tux Paint and Oxygen and held on Wesnoth, where mAP@R paid most (docs/benchmarks.md
# section 6). Without a trained embedding (embedding_dim=0) there is nothing to keep it beside.
HEAD_KEEP = 0.3
# Label smoothing: more than full training's 0.1. The head fits the cached training rows' classes quickly, and
# smoothing keeps it from pulling each class to a point: 0.2 raised mAP@R on all three colour dev sets and P@1 on
# Tux Paint and Oxygen (0.3 no further; 0 lost 0.04 mAP@R on Oxygen; docs/benchmarks.md section 6).
HEAD_SMOOTHING = 0.2


@dataclasses.dataclass
class Features:
    """Cached pooled backbone features (rows) with their class ids."""

    x: NDArray[np.float32]
    labels: NDArray[np.int64]


def cached_features(trunk: Trunk, dataset: Dataset, key: str, folder: Path, *, workers: int,
                    desc: str, seed: int = 0) -> NDArray[np.float32]:
    """The trunk's pooled features of ``dataset`` (augmented views), computed once per ``key`` and kept in
    ``folder``."""
    path = folder / f"features-{key}.npy"
    if path.exists():
        return np.load(path)
    rows = [trunk(images.numpy()) for images, _ in tqdm(make_loader(dataset, 64, workers=workers, seed=seed),
                                                          desc=desc, unit="batch", mininterval=1.0)]
    out = np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, out)
    return out


class HeadData:
    """Features of the train split (plain + ``head_views`` augmented views), its gallery sample and eval split."""

    def __init__(self, cfg: TrainConfig, manifest: Manifest, model: EmbeddingNet, train_items: list[Item]) -> None:
        root, classes = cfg.data_dir or manifest.root, manifest.classes
        trunk, pre = Trunk(model, cfg.backbone_runtime, cfg.threads), model.preprocess
        store, folder = open_store(cfg.feature_store, model), Path(cfg.checkpoint_dir) / "cache"
        labels = label_ids(train_items, classes)

        def plain(items: list[Item], name: str) -> NDArray[np.float32]:
            # Kept per image in the feature store, where extract finds them (no image through the backbone twice).
            return item_features(items, root, pre, trunk, store, workers=cfg.workers, desc=f"train: embedding {name}")[0]

        parts = [plain(train_items, "train images")]
        load = ImageFiles(train_items, root, pre, labels=labels, size=round(pre.size * 1.15))
        for view in range(cfg.head_views):
            seed = cfg.seed * 1000 + view
            torch.manual_seed(seed)  # transforms in the main process (workers=0); workers seed from the loader's
            views = Transformed(load, augment.photo_transform(pre.size, cfg.crop_scale, cfg.color_jitter))
            what = f"{store.key}:{load.key()}:{seed}:{cfg.crop_scale}:{cfg.color_jitter}"
            parts.append(cached_features(trunk, views, hashlib.sha256(what.encode()).hexdigest()[:16], folder,
                                         workers=cfg.workers, desc=f"train: embedding view {view + 1}/{cfg.head_views}",
                                         seed=seed))
        self.train = Features(np.concatenate(parts), np.tile(labels, len(parts)))
        sample = np.sort(np.random.default_rng(cfg.seed).permutation(len(train_items))[:cfg.select_gallery_items])
        self.gallery = Features(parts[0][sample], labels[sample])
        eval_items = manifest.split("eval")
        self.eval = Features(plain(eval_items, "eval images") if eval_items else
                             np.zeros((0, parts[0].shape[1]), np.float32), label_ids(eval_items, classes))

    def evaluate(self, model: EmbeddingNet) -> dict[str, float]:
        """Eval accuracy and mAP@R of the eval features against the train sample, through the head only."""
        if not len(self.eval.x):
            return {}
        queries, logits = _embed(model, self.eval.x)
        gallery, _ = _embed(model, self.gallery.x)
        out = {"eval_accuracy": float((logits.argmax(1) == self.eval.labels).mean())}
        metrics = retrieval_metrics(queries, self.eval.labels, gallery, self.gallery.labels)
        return out | {f"eval_{k}": v for k, v in metrics.items()}


def _embed(model: EmbeddingNet, x: NDArray[np.float32]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    model.eval()
    with torch.inference_mode():
        emb, logits = model.embed_features(torch.from_numpy(x))
        return emb.numpy(), logits.numpy()


def _optimizer(cfg: TrainConfig, model: EmbeddingNet) -> torch.optim.AdamW:
    """AdamW over the embedding layer and the classifier, with the class prototypes of a cosine (or arcface)
    classifier started short and fast. Only a prototype's direction counts, and AdamW moves each weight by about
    lr per step, so a prototype turns at about lr / its norm: from nn.Linear's initialisation (norm ~0.6) they
    trailed the embedding they are meant to pull into shape. Starting them at norm ~0.1 (PROTOTYPE_INIT) and at
    PROTOTYPE_LR x lr raised mAP@R on all three colour dev sets (docs/benchmarks.md section 6)."""
    rest = model.head_parameters()
    groups = [{"params": rest, "lr": cfg.lr}]
    if model.classifier is not None and model.args.head != "linear":
        prototypes = model.classifier.weight
        with torch.no_grad():
            prototypes.normal_(0.0, PROTOTYPE_INIT, generator=torch.Generator().manual_seed(cfg.seed))
        groups = [{"params": [p for p in rest if p is not prototypes], "lr": cfg.lr},
                  {"params": [prototypes], "lr": cfg.lr * PROTOTYPE_LR}]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.head_weight_decay)


def schedule(cfg: TrainConfig, n_train: int) -> TrainConfig:
    """Where the config leaves them auto: batch HEAD_BATCH, lr HEAD_LR, views uncropped (HEAD_CROP), the
    features kept at HEAD_KEEP, label smoothing HEAD_SMOOTHING, and epochs
    for HEAD_STEPS AdamW steps over the feature rows (plain + augmented views), at least 10. An epoch of a small
    collection is a few steps: capping epochs instead (60) left 540 steps on the Oxygen icons (mAP@R 0.620
    against 0.630)."""
    batch = cfg.batch_size or HEAD_BATCH
    steps = max(1, math.ceil(n_train * (1 + cfg.head_views) / batch))
    epochs = cfg.epochs or max(10, math.ceil(HEAD_STEPS / steps))
    hidden = HEAD_HIDDEN if cfg.embedding_hidden < 0 else cfg.embedding_hidden
    select = "last" if cfg.select_metric == "auto" else cfg.select_metric
    return dataclasses.replace(cfg, batch_size=batch, epochs=epochs, lr=cfg.lr or HEAD_LR, embedding_hidden=hidden,
                               select_metric=select, crop_scale=cfg.crop_scale or HEAD_CROP,
                               keep_features=(HEAD_KEEP if cfg.embedding_dim else 0.0) if cfg.keep_features < 0 else
                               cfg.keep_features,
                               label_smoothing=HEAD_SMOOTHING if cfg.label_smoothing < 0 else cfg.label_smoothing)


def train_head(cfg: TrainConfig, manifest: Manifest, model: EmbeddingNet, train_items: list[Item], *,
               on_epoch=None, epoch_metrics=None):
    """Train the embedding layer and classifier on cached features; returns (bundle, history)."""
    data = HeadData(cfg, manifest, model.to(distributed.device()), train_items)
    model = model.cpu()  # the head trains on the cached features, which are small
    epochs, batch = cfg.epochs, cfg.batch_size
    optimizer = _optimizer(cfg, model)
    steps = math.ceil(len(data.train.x) / batch)
    lrs = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                              total_steps=epochs * steps, pct_start=0.1)
    x, y = torch.from_numpy(data.train.x), torch.from_numpy(data.train.labels)
    best, best_state, history = -math.inf, None, []
    for epoch in range(1, epochs + 1):
        started, model = time.perf_counter(), model.train()
        order = torch.from_numpy(np.random.default_rng(cfg.seed + epoch).permutation(len(x)))
        total, correct = 0.0, 0
        for rows in order.split(batch):
            if len(rows) < 2:  # batch norm needs two rows
                continue
            feats = F.dropout(x[rows], cfg.head_dropout, training=True)
            logits = model.head(model.embedding(feats), y[rows])
            loss = F.cross_entropy(logits, y[rows], label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lrs.step()
            total += loss.item() * len(rows)
            correct += (logits.argmax(1) == y[rows]).sum().item()
        metrics = {"train_loss": total / len(x), "train_accuracy": correct / len(x), **data.evaluate(model),
                   "lr": lrs.get_last_lr()[-1], "epoch_seconds": time.perf_counter() - started}
        if epoch_metrics:
            metrics |= epoch_metrics(model.eval())
        history.append({"epoch": epoch, **metrics})
        score = epoch if cfg.select_metric == "last" or not len(data.eval.x) else metrics[f"eval_{cfg.select_metric}"]
        if score > best:
            best, best_state = score, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if on_epoch:
            on_epoch(epoch, metrics)
    print(f"train: head trained for {epochs} epochs on {len(x)} cached feature rows "
          f"({1 + cfg.head_views} views of {len(train_items)} images)")
    config = dataclasses.asdict(cfg)
    if best_state is None:
        raise ImgsimError(f"nothing to train: epochs={cfg.epochs}")
    return ModelBundle(model.args, model.preprocess, list(manifest.classes), best_state, config), history
