"""Stage 2: train the embedding ResNet on a manifest, resumably, on CPU, GPU or several processes (DDP)."""

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

from imgsim import checkpoint, distributed
from imgsim.data import channel_stats, label_ids, load_items
from imgsim.errors import ImgsimError
from imgsim.images import Preprocess
from imgsim.manifest import Manifest
from imgsim.model import EmbeddingResNet, ModelArgs, ModelBundle


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the train stage."""

    manifest_uri: str = ""
    data_dir: str = ""  # where the manifest's relative paths live, if not where split saw them
    epochs: int = 12
    batch_size: int = 128
    lr: float = 0.2
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    widths: tuple[int, ...] = (32, 64, 128)
    depths: tuple[int, ...] = (1, 1, 1)
    embedding_dim: int = 128
    head: str = "cosine"
    scale: float = 16.0
    image_size: int = 28
    channels: int = 1
    augment: bool = True
    # Off by default: with torch 2.14.1's oneDNN on CPU, channels-last backward crashed (SIGSEGV)
    # intermittently on small feature maps. bench/ measures whether it is worth it where it works.
    channels_last: bool = False
    max_train_items: int = 0  # 0 = all; a smaller number trains on a stratified-by-order prefix for quick runs
    seed: int = 42
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    checkpoint_dir: str = "checkpoints/train"
    resume: bool = False
    register_name: str = "imgsim"
    run_name: str = ""


@dataclasses.dataclass
class TrainResult:
    """The best model by eval accuracy, and per-epoch history."""

    bundle: ModelBundle
    history: list[dict]


EpochHook = Callable[[int, dict], None]


def train_model(cfg: TrainConfig, manifest: Manifest, *, on_epoch: EpochHook | None = None,
                extra_state: dict | None = None,
                epoch_metrics: Callable[[EmbeddingResNet], dict] | None = None) -> TrainResult:
    """Train on the manifest's train split, pick the best epoch on eval, checkpoint after every epoch.

    ``epoch_metrics`` adds figures computed from the model after each epoch (e.g. retrieval quality).
    """
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = distributed.device()
    root = cfg.data_dir or manifest.root
    train_items = _limit(manifest.split("train"), cfg.max_train_items, cfg.seed)
    eval_items = manifest.split("eval") or manifest.split("test")
    base = Preprocess(size=cfg.image_size, channels=cfg.channels,
                      mean=(0.5,) * cfg.channels, std=(0.25,) * cfg.channels)
    x_train = load_items(train_items, root, base, desc="train: loading train split")
    x_eval = load_items(eval_items, root, base, desc="train: loading eval split")
    mean, std = channel_stats(x_train)
    preprocess = dataclasses.replace(base, mean=mean, std=std)
    y_train, y_eval = label_ids(train_items, manifest.classes), label_ids(eval_items, manifest.classes)
    args = ModelArgs(num_classes=len(manifest.classes), widths=cfg.widths, depths=cfg.depths,
                     embedding_dim=cfg.embedding_dim, head=cfg.head, scale=cfg.scale)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = EmbeddingResNet(args, preprocess).to(device).to(memory_format=memory_format)
    ddp_model = distributed.wrap(model)
    steps = math.ceil(distributed.shard_size(len(x_train)) / cfg.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True,
                                weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps,
                                                   pct_start=0.2)
    state = {"epoch": 0, "best_acc": -1.0, "best_state": None, "history": [], **(extra_state or {})}
    ckpt_path, config = Path(cfg.checkpoint_dir) / checkpoint.FILENAME, dataclasses.asdict(cfg)
    if cfg.resume:
        state = checkpoint.restore(ckpt_path, config, model, optimizer, schedule)
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        started = time.perf_counter()
        loss, acc = _train_epoch(ddp_model, optimizer, schedule, x_train, y_train, cfg, epoch, device)
        eval_acc = evaluate_accuracy(model, x_eval, y_eval, device)
        metrics = {"train_loss": loss, "train_accuracy": acc, "eval_accuracy": eval_acc,
                   "lr": schedule.get_last_lr()[0], "epoch_seconds": time.perf_counter() - started}
        if epoch_metrics and distributed.is_main():
            metrics |= epoch_metrics(model.eval())
        state["history"].append({"epoch": epoch, **metrics})
        if eval_acc > state["best_acc"]:
            state["best_acc"] = eval_acc
            state["best_state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        state["epoch"] = epoch
        if distributed.is_main():
            # Log before checkpointing: a crash in between re-runs the epoch rather than losing its metrics.
            if on_epoch:
                on_epoch(epoch, metrics)
            checkpoint.save(ckpt_path, config, model, optimizer, schedule, state)
    if state["best_state"] is None:
        raise ImgsimError(f"nothing to train: epochs={cfg.epochs} and the checkpoint already has {state['epoch']}")
    bundle = ModelBundle(args, preprocess, list(manifest.classes), state["best_state"], config)
    return TrainResult(bundle, state["history"])


def read_checkpoint(cfg: TrainConfig) -> dict | None:
    """The last checkpoint's bookkeeping (epoch, extra state such as the MLflow run id), if there is one."""
    return checkpoint.read_state(Path(cfg.checkpoint_dir) / checkpoint.FILENAME)


def evaluate_accuracy(model: EmbeddingResNet, x: np.ndarray, y: np.ndarray, device: torch.device,
                      batch_size: int = 512) -> float:
    """Top-1 classification accuracy of ``model`` on uint8 images."""
    if len(x) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            batch = _to_float(torch.from_numpy(x[start:start + batch_size]), device)
            correct += (model(batch).argmax(1).cpu().numpy() == y[start:start + batch_size]).sum()
    model.train(was_training)
    return float(correct) / len(x)


def _train_epoch(model, optimizer, schedule, x, y, cfg: TrainConfig, epoch: int, device) -> tuple[float, float]:
    model.train()
    order = distributed.shard(np.random.default_rng(cfg.seed + epoch).permutation(len(x)))
    total_loss, correct, seen = 0.0, 0, 0
    batches = range(0, len(order), cfg.batch_size)
    bar = tqdm(batches, desc=f"train: epoch {epoch}/{cfg.epochs}", unit="batch",
               disable=not distributed.is_main(), mininterval=1.0)
    for start in bar:
        idx = order[start:start + cfg.batch_size]
        images = _to_float(torch.from_numpy(x[idx]), device)
        if cfg.augment:
            images = augment(images, epoch * 100003 + start)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.from_numpy(y[idx]).to(device)
        logits = model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        total_loss += loss.item() * len(idx)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(idx)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
    return total_loss / max(seen, 1), correct / max(seen, 1)


def augment(images: torch.Tensor, seed: int, pad: int = 2) -> torch.Tensor:
    """Random horizontal flips and up-to-``pad``-pixel shifts, per image, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    n, _, h, w = images.shape
    flip = torch.rand(n, generator=gen) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(3), images)
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2, n), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def _to_float(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    return batch.to(device, non_blocking=True).float() / 255.0


def _limit(items, n: int, seed: int):
    if not n or n >= len(items):
        return items
    keep = np.sort(np.random.default_rng(seed).permutation(len(items))[:n])
    return [items[i] for i in keep]
