"""Train mode ``head``: a frozen pretrained backbone embeds every image once (the plain view plus a few augmented
ones), the features are cached on disk, and only the embedding layer and the classifier train on them: seconds
per epoch on a CPU instead of minutes. The bundle holds the whole network, so extract, export and serving see an
ordinary model."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch.utils.data import Dataset
from tqdm import tqdm

from imgsim import atomic
from imgsim.manifest import Item, Manifest
from imgsim.metrics import retrieval_metrics
from imgsim.nn import augment, distributed
from imgsim.nn.data import ImageFiles, Transformed, label_ids, make_loader
from imgsim.nn.feature_store import item_features, open_store
from imgsim.nn.model import EmbeddingNet
from imgsim.nn.trunk import Trunk
from imgsim.stages.plan import TrainPlan

# Class prototypes start short and learn fast, so they keep pace with the embedding (see _optimizer).
PROTOTYPE_INIT, PROTOTYPE_LR = 0.01, 3.0


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

    def __init__(self, cfg: TrainPlan, manifest: Manifest, model: EmbeddingNet, train_items: list[Item]) -> None:
        root, classes = cfg.data_dir, manifest.classes
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


def _optimizer(plan: TrainPlan, model: EmbeddingNet) -> torch.optim.AdamW:
    """AdamW over the embedding layer and the classifier. Only a prototype's direction counts and AdamW moves each
    weight by about lr a step, so prototypes start short (PROTOTYPE_INIT) and learn at PROTOTYPE_LR x lr: from
    nn.Linear's initialisation they trailed the embedding they shape (docs/benchmarks.md section 6)."""
    rest = model.head_parameters()
    groups = [{"params": rest, "lr": plan.lr}]
    if model.classifier is not None and model.args.head != "linear":
        prototypes = model.classifier.weight
        with torch.no_grad():
            prototypes.normal_(0.0, PROTOTYPE_INIT, generator=torch.Generator().manual_seed(plan.seed))
        groups = [{"params": [p for p in rest if p is not prototypes], "lr": plan.lr},
                  {"params": [prototypes], "lr": plan.lr * PROTOTYPE_LR}]
    return torch.optim.AdamW(groups, lr=plan.lr, weight_decay=plan.head_weight_decay)


class HeadWork:
    """The embedding layer and classifier over the cached features: the :class:`~imgsim.stages.train.Work` of
    ``mode=head``. The backbone runs once, here, before the first epoch."""

    checkpoint_seconds = 30.0  # hundreds of sub-second epochs: a checkpoint each would cost more than they do
    frozen = "trunk."  # the backbone, as its weights built it: checkpoints hold the head only

    def __init__(self, plan: TrainPlan, manifest: Manifest, model: EmbeddingNet) -> None:
        items = plan.train_items(manifest)
        self.plan, self.data = plan, HeadData(plan, manifest, model.to(distributed.device()), items)
        self.model = model.cpu()  # the head trains on the cached features, which are small
        self.optimizer = _optimizer(plan, self.model)
        steps = math.ceil(len(self.data.train.x) / plan.batch_size)
        self.schedule = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=[g["lr"] for g in self.optimizer.param_groups], total_steps=plan.epochs * steps,
            pct_start=0.1)
        self.x, self.y = torch.from_numpy(self.data.train.x), torch.from_numpy(self.data.train.labels)
        print(f"train: the head trains for {plan.epochs} epochs on {len(self.x)} cached feature rows "
              f"({1 + plan.head_views} views of {len(items)} images)")

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        model, x, y = self.model.train(), self.x, self.y
        order = torch.from_numpy(np.random.default_rng(self.plan.seed + epoch).permutation(len(x)))
        total, correct = 0.0, 0
        for rows in order.split(self.plan.batch_size):
            if len(rows) < 2:  # batch norm needs two rows
                continue
            feats = F.dropout(x[rows], self.plan.head_dropout, training=True)
            logits = model.head(model.embedding(feats), y[rows])
            loss = F.cross_entropy(logits, y[rows], label_smoothing=self.plan.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.schedule.step()
            total += loss.item() * len(rows)
            correct += (logits.argmax(1) == y[rows]).sum().item()
        return total / len(x), correct / len(x)

    def evaluate(self) -> dict[str, float]:
        return self.data.evaluate(self.model)
