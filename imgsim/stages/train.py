"""Stage 2: train (or fine-tune) the embedding network on a manifest, resumably, on CPU, GPU or with DDP."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from imgsim.errors import ImgsimError
from imgsim.images import Preprocess
from imgsim.manifest import Manifest
from imgsim.metrics import retrieval_metrics
from imgsim.modelspec import ModelArgs, resolve_augment
from imgsim.nn import allocator, augment, checkpoint, distributed, recipe, weights
from imgsim.nn.data import ImageFiles, Transformed, cache_images, label_ids, make_loader
from imgsim.nn.embed import embed_dataset
from imgsim.nn.model import EmbeddingNet, ModelBundle
from imgsim.nn.recipe import input_preprocess
from imgsim.stages import head
from imgsim.stages.settings import TrainConfig


@dataclasses.dataclass
class TrainResult:
    """The best model by the selection metric, and per-epoch history."""

    bundle: ModelBundle
    history: list[dict]


EpochHook = Callable[[int, dict], None]


def prepare_model(cfg: TrainConfig, manifest: Manifest, num_classes: int) -> tuple[EmbeddingNet, Preprocess]:
    """The untrained network: pretrained backbone weights loaded, input preprocessing chosen."""
    root = cfg.data_dir or manifest.root
    pretrained = weights.is_pretrained(cfg.weights)
    trunk = weights.load_backbone_weights(cfg.backbone, cfg.weights)
    preprocess = input_preprocess(manifest.split("train") or manifest.items, root, backbone=cfg.backbone,
                                  pretrained=pretrained, weights=cfg.weights, image_size=cfg.image_size,
                                  channels=cfg.channels, seed=cfg.seed)
    args = ModelArgs(num_classes=num_classes, backbone=cfg.backbone, widths=cfg.widths, depths=cfg.depths,
                     embedding_dim=cfg.embedding_dim, embedding_hidden=max(cfg.embedding_hidden, 0), head=cfg.head,
                     scale=cfg.scale, margin=cfg.margin, feature_levels=cfg.feature_levels,
                     keep_features=cfg.keep_features)
    return EmbeddingNet(args, preprocess, trunk), preprocess


def resolve_schedule(cfg: TrainConfig, manifest: Manifest) -> TrainConfig:
    """Backbone, weights and mode, then batch size, epochs, learning rate and stages for this manifest, where the
    config leaves them auto."""
    items = _limit(manifest.split("train"), cfg.max_train_items, cfg.seed)
    cfg = recipe.route(cfg, manifest.split("train") or manifest.items, cfg.data_dir or manifest.root,
                       labelled=bool(manifest.classes))
    if cfg.mode == "head":  # its own batch, epochs and lr; recipe.schedule fills in the rest
        cfg = head.schedule(cfg, len(items))
    return recipe.schedule(cfg, items)


def embed_only(cfg: TrainConfig, manifest: Manifest) -> ModelBundle:
    """A pretrained backbone used as is (mode none, or no labels to train on): its pooled features are the
    embedding."""
    cfg = resolve_schedule(cfg, manifest)
    cfg = dataclasses.replace(cfg, embedding_dim=0, embedding_hidden=0, keep_features=0.0, mode="none")
    model, preprocess = prepare_model(cfg, manifest, num_classes=0)
    return ModelBundle(model.args, preprocess, [], model.state_dict(), dataclasses.asdict(cfg))


def train_model(cfg: TrainConfig, manifest: Manifest, *, on_epoch: EpochHook | None = None,
                extra_state: dict | None = None,
                epoch_metrics: Callable[[EmbeddingNet], dict] | None = None) -> TrainResult:
    """Train on the manifest's train split, pick the best epoch on eval, checkpoint after every epoch.

    ``epoch_metrics`` adds figures computed from the model after each epoch (e.g. retrieval quality)."""
    cfg = resolve_schedule(cfg, manifest)
    allocator.keep_freed_memory()
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.mode == "none":
        return TrainResult(embed_only(cfg, manifest), [])
    model, preprocess = prepare_model(cfg, manifest, len(manifest.classes))
    if cfg.mode == "head":
        items = _limit(manifest.split("train"), cfg.max_train_items, cfg.seed)
        bundle, history = head.train_head(cfg, manifest, model, items, on_epoch=on_epoch, epoch_metrics=epoch_metrics)
        return TrainResult(bundle, history)
    device = distributed.device()
    data = _TrainData(cfg, manifest, preprocess)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device).to(memory_format=memory_format)
    ddp_model = distributed.wrap(model)
    steps = math.ceil(distributed.shard_size(len(data.train)) / cfg.batch_size)
    optimizer, schedule = _optimizer(cfg, model, cfg.epochs * steps)
    state = {"epoch": 0, "best": -math.inf, "best_state": None, "history": [], "stale": 0, **(extra_state or {})}
    ckpt_path, config = Path(cfg.checkpoint_dir) / checkpoint.FILENAME, dataclasses.asdict(cfg)
    if resumes(cfg):
        state = checkpoint.restore(ckpt_path, config, model, optimizer, schedule)
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        if cfg.patience and state["stale"] >= cfg.patience:
            print(f"train: stopping early after epoch {epoch - 1}: no better {cfg.select_metric} for {cfg.patience} epochs")
            break
        started = time.perf_counter()
        loss, acc = _train_epoch(ddp_model, optimizer, schedule, data, cfg, epoch, device)
        metrics = {"train_loss": loss, "train_accuracy": acc, **data.evaluate(model),
                   "lr": schedule.get_last_lr()[-1], "epoch_seconds": time.perf_counter() - started}
        if epoch_metrics and distributed.is_main():
            metrics |= epoch_metrics(model.eval())
        state["history"].append({"epoch": epoch, **metrics})
        score = epoch if cfg.select_metric == "last" or not data.eval else metrics[f"eval_{cfg.select_metric}"]
        if score > state["best"]:
            state["best"], state["stale"] = score, 0
            state["best_state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            state["stale"] += 1
        state["epoch"] = epoch
        if distributed.is_main():
            # Log before checkpointing: a crash in between re-runs the epoch rather than losing its metrics.
            if on_epoch:
                on_epoch(epoch, metrics)
            checkpoint.save(ckpt_path, config, model, optimizer, schedule, state)
    if state["best_state"] is None:
        raise ImgsimError(f"nothing to train: epochs={cfg.epochs} and the checkpoint already has {state['epoch']}")
    bundle = ModelBundle(model.args, preprocess, list(manifest.classes), state["best_state"], config)
    return TrainResult(bundle, state["history"])


class _TrainData:
    """Loaders for the train split (augmented), and the eval split plus a train sample for model selection."""

    def __init__(self, cfg: TrainConfig, manifest: Manifest, preprocess: Preprocess) -> None:
        self.cfg, root, classes = cfg, cfg.data_dir or manifest.root, manifest.classes
        train_items = _limit(manifest.split("train"), cfg.max_train_items, cfg.seed)
        # Never select on the test split: it is what extract reports. Without eval, the last epoch is kept.
        eval_items = manifest.split("eval")
        if not eval_items:
            print("train: the manifest has no eval split (eval_ratio=0), so the last epoch's model is kept")
        self.mode = resolve_augment(cfg.augment, weights.is_pretrained(cfg.weights))
        load_size = round(preprocess.size * 1.15) if self.mode == "photo" else preprocess.size
        train = ImageFiles(train_items, root, preprocess, labels=label_ids(train_items, classes), size=load_size)
        sample = np.sort(np.random.default_rng(cfg.seed).permutation(len(train_items))[:cfg.select_gallery_items])
        gallery_items = [train_items[i] for i in sample]
        gallery = ImageFiles(gallery_items, root, preprocess, labels=label_ids(gallery_items, classes))
        evals = ImageFiles(eval_items, root, preprocess, labels=label_ids(eval_items, classes))
        use_cache = cfg.cache == "true" or (cfg.cache == "auto" and load_size <= 96)
        cache_dir = Path(cfg.checkpoint_dir) / "cache"
        if use_cache:
            train, gallery, evals = (cache_images(d, cache_dir, workers=cfg.workers, desc=f"train: decoding {name}")
                                     for d, name in ((train, "train"), (gallery, "gallery sample"), (evals, "eval")))
        if self.mode == "photo":
            train = Transformed(train, augment.photo_transform(preprocess.size, cfg.crop_scale, cfg.color_jitter))
        self.train, self.gallery, self.eval = train, gallery, evals

    def loader(self, epoch: int):
        order = distributed.shard(np.random.default_rng(self.cfg.seed + epoch).permutation(len(self.train)))
        return make_loader(self.train, self.cfg.batch_size, order=order.tolist(), workers=self.cfg.workers,
                           seed=self.cfg.seed + epoch)

    def evaluate(self, model: EmbeddingNet) -> dict[str, float]:
        """Eval accuracy and mAP@R of the eval images against the train sample."""
        if not len(self.eval):
            return {}
        queries, logits = embed_dataset(model, self.eval, 256, "", workers=self.cfg.workers)
        gallery, _ = embed_dataset(model, self.gallery, 256, "", workers=self.cfg.workers)
        labels, gallery_labels = self.eval.labels, self.gallery.labels
        out = {"eval_accuracy": float((logits.argmax(1) == labels).mean())}
        return out | {f"eval_{k}": v for k, v in retrieval_metrics(queries, labels, gallery, gallery_labels).items()}


def resumes(cfg: "TrainConfig") -> bool:
    """Whether this run continues a checkpoint: --resume, or --resume-if-present with one there."""
    return cfg.resume or (cfg.resume_if_present and (Path(cfg.checkpoint_dir) / checkpoint.FILENAME).exists())


def read_checkpoint(cfg: TrainConfig) -> dict | None:
    """The last checkpoint's bookkeeping (epoch, extra state such as the MLflow run id), if there is one."""
    return checkpoint.read_state(Path(cfg.checkpoint_dir) / checkpoint.FILENAME)


def _optimizer(cfg: TrainConfig, model: EmbeddingNet, total_steps: int):
    """SGD + Nesterov with a one-cycle schedule; a pretrained backbone learns at ``backbone_lr_scale`` x lr."""
    scale = cfg.backbone_lr_scale if weights.is_pretrained(cfg.weights) else 1.0
    lrs = [cfg.lr * scale, cfg.lr]
    groups = [{"params": model.backbone_parameters()}, {"params": model.head_parameters()}]
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lrs, total_steps=max(total_steps, 1), pct_start=0.2)
    return optimizer, schedule


def _train_epoch(model, optimizer, schedule, data: _TrainData, cfg: TrainConfig, epoch: int, device) -> tuple[float, float]:
    model.train()
    frozen = epoch <= cfg.freeze_epochs and weights.is_pretrained(cfg.weights)
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(data.loader(epoch), desc=f"train: epoch {epoch}/{cfg.epochs}", unit="batch",
               disable=not distributed.is_main(), mininterval=1.0)
    for step, (images, labels) in enumerate(bar):
        images, labels = _to_float(images, device), torch.as_tensor(labels).to(device)
        if data.mode == "shift":
            images = augment.shift_flip(images, epoch * 100003 + step)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if frozen:  # lr 0 rather than requires_grad: DDP needs the same trainable set every step
            optimizer.param_groups[0]["lr"] = 0.0
        logits = model(images, labels)
        loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
    return total_loss / max(seen, 1), correct / max(seen, 1)


def _to_float(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    return batch.to(device, non_blocking=True).float() / 255.0


def _limit(items, n: int, seed: int):
    if not n or n >= len(items):
        return items
    keep = np.sort(np.random.default_rng(seed).permutation(len(items))[:n])
    return [items[i] for i in keep]
