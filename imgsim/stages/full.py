"""Full training: every layer learns from augmented, decoded images (SGD + Nesterov, one-cycle), on CPU, GPU or
with DDP. The :class:`~imgsim.stages.train.Work` that :func:`imgsim.stages.train.fit` runs for ``mode=full``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from imgsim.images import Preprocess
from imgsim.manifest import Manifest
from imgsim.metrics import retrieval_metrics
from imgsim.nn import augment, distributed
from imgsim.nn.data import ImageFiles, Transformed, cache_images, label_ids, make_loader
from imgsim.nn.embed import embed_dataset
from imgsim.nn.model import EmbeddingNet
from imgsim.stages.plan import TrainPlan


class FullWork:
    """The network, its DDP wrapper, the optimizer over every layer, and the image loaders."""

    checkpoint_seconds = 0.0  # an epoch over images takes minutes: keep every one
    frozen = ""  # every layer trains

    def __init__(self, plan: TrainPlan, manifest: Manifest, model: EmbeddingNet) -> None:
        self.plan, self.device = plan, distributed.device()
        self.data = _TrainData(plan, manifest, model.preprocess)
        memory_format = torch.channels_last if plan.channels_last else torch.contiguous_format
        self.model = model.to(self.device).to(memory_format=memory_format)
        self.ddp = distributed.wrap(self.model)
        steps = math.ceil(distributed.shard_size(len(self.data.train)) / plan.batch_size)
        self.optimizer, self.schedule = _optimizer(plan, self.model, plan.epochs * steps)

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        plan, model = self.plan, self.ddp
        model.train()
        frozen = epoch <= plan.freeze_epochs and plan.pretrained
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(self.data.loader(epoch), desc=f"train: epoch {epoch}/{plan.epochs}", unit="batch",
                   disable=not distributed.is_main(), mininterval=1.0)
        for step, (images, labels) in enumerate(bar):
            images = images.to(self.device, non_blocking=True).float() / 255.0
            labels = torch.as_tensor(labels).to(self.device)
            if plan.augment == "shift":
                images = augment.shift_flip(images, epoch * 100003 + step)
            if plan.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if frozen:  # lr 0 rather than requires_grad: DDP needs the same trainable set every step
                self.optimizer.param_groups[0]["lr"] = 0.0
            logits = model(images, labels)
            loss = F.cross_entropy(logits, labels, label_smoothing=plan.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.schedule.step()
            total_loss += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
        return total_loss / max(seen, 1), correct / max(seen, 1)

    def evaluate(self) -> dict[str, float]:
        return self.data.evaluate(self.model)


class _TrainData:
    """Loaders for the train split (augmented), and the eval split plus a train sample for model selection."""

    def __init__(self, plan: TrainPlan, manifest: Manifest, preprocess: Preprocess) -> None:
        self.plan, root, classes = plan, plan.data_dir, manifest.classes
        train_items = plan.train_items(manifest)
        # Never select on the test split: it is what extract reports. Without eval, the last epoch is kept.
        eval_items = manifest.split("eval")
        if not eval_items:
            print("train: the manifest has no eval split (eval_ratio=0), so the last epoch's model is kept")
        load_size = round(preprocess.size * 1.15) if plan.augment == "photo" else preprocess.size
        train = ImageFiles(train_items, root, preprocess, labels=label_ids(train_items, classes), size=load_size)
        sample = np.sort(np.random.default_rng(plan.seed).permutation(len(train_items))[:plan.select_gallery_items])
        gallery_items = [train_items[i] for i in sample]
        gallery = ImageFiles(gallery_items, root, preprocess, labels=label_ids(gallery_items, classes))
        evals = ImageFiles(eval_items, root, preprocess, labels=label_ids(eval_items, classes))
        if plan.cache:
            cache_dir = Path(plan.checkpoint_dir) / "cache"
            train, gallery, evals = (cache_images(d, cache_dir, workers=plan.workers, desc=f"train: decoding {name}")
                                     for d, name in ((train, "train"), (gallery, "gallery sample"), (evals, "eval")))
        if plan.augment == "photo":
            train = Transformed(train, augment.photo_transform(preprocess.size, plan.crop_scale, plan.color_jitter))
        self.train, self.gallery, self.eval = train, gallery, evals

    def loader(self, epoch: int):
        order = distributed.shard(np.random.default_rng(self.plan.seed + epoch).permutation(len(self.train)))
        return make_loader(self.train, self.plan.batch_size, order=order.tolist(), workers=self.plan.workers,
                           seed=self.plan.seed + epoch)

    def evaluate(self, model: EmbeddingNet) -> dict[str, float]:
        """Eval accuracy and mAP@R of the eval images against the train sample."""
        if not len(self.eval):
            return {}
        queries, logits = embed_dataset(model, self.eval, 256, "", workers=self.plan.workers)
        gallery, _ = embed_dataset(model, self.gallery, 256, "", workers=self.plan.workers)
        labels, gallery_labels = self.eval.labels, self.gallery.labels
        out = {"eval_accuracy": float((logits.argmax(1) == labels).mean())}
        return out | {f"eval_{k}": v for k, v in retrieval_metrics(queries, labels, gallery, gallery_labels).items()}


def _optimizer(plan: TrainPlan, model: EmbeddingNet, total_steps: int):
    """SGD + Nesterov with a one-cycle schedule; a pretrained backbone learns at ``backbone_lr_scale`` x lr."""
    lrs = [plan.lr * (plan.backbone_lr_scale if plan.pretrained else 1.0), plan.lr]
    groups = [{"params": model.backbone_parameters()}, {"params": model.head_parameters()}]
    optimizer = torch.optim.SGD(groups, lr=plan.lr, momentum=0.9, nesterov=True, weight_decay=plan.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lrs, total_steps=max(total_steps, 1), pct_start=0.2)
    return optimizer, schedule
