"""Stage 2: train the embedding network on a manifest. One loop, :func:`fit`, owns epochs, model selection,
patience, checkpoints, resuming and which process logs; full training (imgsim.stages.full) and head mode
(imgsim.stages.head) differ only in the :class:`Work` they hand it: its batches, step and evaluation."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, Protocol

import torch

from imgsim.errors import ImgsimError
from imgsim.images import Preprocess
from imgsim.manifest import Manifest
from imgsim.modelspec import ModelArgs
from imgsim.nn import allocator, checkpoint, distributed, weights
from imgsim.nn.model import EmbeddingNet, TrainedModel
from imgsim.nn.recipe import input_preprocess
from imgsim.stages import full, head
from imgsim.stages.plan import TrainPlan
from imgsim.stages.plan import plan as planned
from imgsim.stages.settings import TrainConfig

EpochHook = Callable[[int, dict], None]


@dataclasses.dataclass
class TrainResult:
    """The best model by the selection metric, and per-epoch history."""

    bundle: TrainedModel
    history: list[dict]


class Work(Protocol):
    """What one way of training hands :func:`fit`: the model it trains, its optimizer and schedule (checkpointed
    with it), an epoch of steps and an evaluation."""

    model: EmbeddingNet
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    checkpoint_seconds: float  # the least time between two checkpoints (the first and last epochs are always kept)
    frozen: str  # the prefix of the weights that do not train: left out of checkpoints

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        """One pass; the mean loss and accuracy over it."""

    def evaluate(self) -> dict[str, float]:
        """eval_* figures of the model as it is now; empty without an eval split."""


def prepare_model(plan: TrainPlan, manifest: Manifest, num_classes: int) -> tuple[EmbeddingNet, Preprocess]:
    """The untrained network: pretrained backbone weights loaded, input preprocessing computed."""
    trunk = weights.load_backbone_weights(plan.backbone, plan.weights)
    preprocess = input_preprocess(manifest.split("train") or manifest.items, plan.data_dir, backbone=plan.backbone,
                                  pretrained=plan.pretrained, weights=plan.weights, image_size=plan.image_size,
                                  channels=plan.channels, seed=plan.seed)
    args = ModelArgs(num_classes=num_classes, backbone=plan.backbone, widths=plan.widths, depths=plan.depths,
                     embedding_dim=plan.embedding_dim, embedding_hidden=plan.embedding_hidden, head=plan.head,
                     scale=plan.scale, margin=plan.margin, feature_levels=plan.feature_levels,
                     keep_features=plan.keep_features)
    return EmbeddingNet(args, preprocess, trunk), preprocess


def embed_only(plan: TrainPlan, manifest: Manifest) -> TrainedModel:
    """A pretrained backbone used as is (mode none): its pooled features are the embedding."""
    model, preprocess = prepare_model(plan, manifest, num_classes=0)
    return TrainedModel(model.args, preprocess, [], model.state_dict(), dataclasses.asdict(plan))


def train_model(settings: TrainPlan | TrainConfig, manifest: Manifest, *, on_epoch: EpochHook | None = None,
                extra_state: dict | None = None,
                epoch_metrics: Callable[[EmbeddingNet], dict] | None = None) -> TrainResult:
    """Train as the plan says (settings as given are planned first: imgsim.stages.plan) and keep the best epoch's
    model. ``epoch_metrics`` adds figures computed from the model after each epoch (e.g. retrieval quality)."""
    plan = settings if isinstance(settings, TrainPlan) else planned(settings, manifest)
    allocator.keep_freed_memory()
    torch.manual_seed(plan.seed)
    if plan.threads:
        torch.set_num_threads(plan.threads)
    if plan.mode == "none":
        return TrainResult(embed_only(plan, manifest), [])
    model, preprocess = prepare_model(plan, manifest, len(manifest.classes))
    work = (head.HeadWork if plan.mode == "head" else full.FullWork)(plan, manifest, model)
    best_state, history = fit(plan, work, on_epoch=on_epoch, extra_state=extra_state, epoch_metrics=epoch_metrics)
    bundle = TrainedModel(model.args, preprocess, list(manifest.classes), best_state, dataclasses.asdict(plan))
    return TrainResult(bundle, history)


def fit(plan: TrainPlan, work: Work, *, on_epoch: EpochHook | None = None, extra_state: dict | None = None,
        epoch_metrics: Callable[[EmbeddingNet], dict] | None = None) -> tuple[dict, list[dict]]:
    """Epochs of ``work`` from the checkpoint (when resuming) to ``plan.epochs`` or patience's end; the best
    epoch's weights by ``plan.select_metric``, and every epoch's metrics. Only the main process logs and
    checkpoints."""
    state = {"epoch": 0, "best": -math.inf, "best_state": None, "history": [], "stale": 0, **(extra_state or {})}
    path, config = checkpoint_path(plan), dataclasses.asdict(plan)
    if resumes(plan):
        state = checkpoint.restore(path, config, work.model, work.optimizer, work.schedule, frozen=work.frozen)
    saved, saved_at = state["epoch"], -math.inf  # the first epoch is kept: it records the MLflow run to resume
    for epoch in range(state["epoch"] + 1, plan.epochs + 1):
        if plan.patience and state["stale"] >= plan.patience:
            print(f"train: stopping early after epoch {epoch - 1}: no better {plan.select_metric} for "
                  f"{plan.patience} epochs")
            break
        started = time.perf_counter()
        loss, accuracy = work.train_epoch(epoch)
        metrics = {"train_loss": loss, "train_accuracy": accuracy, **work.evaluate(),
                   "lr": work.schedule.get_last_lr()[-1], "epoch_seconds": time.perf_counter() - started}
        if epoch_metrics and distributed.is_main():
            metrics |= epoch_metrics(work.model.eval())
        state["history"].append({"epoch": epoch, **metrics})
        score = epoch if plan.select_metric == "last" else metrics[f"eval_{plan.select_metric}"]
        if score > state["best"]:
            state["best"], state["stale"] = score, 0
            state["best_state"] = {k: v.detach().cpu().clone() for k, v in work.model.state_dict().items()}
        else:
            state["stale"] += 1
        state["epoch"] = epoch
        if distributed.is_main():
            # Log before checkpointing: a crash in between re-runs the epoch rather than losing its metrics.
            if on_epoch:
                on_epoch(epoch, metrics)
            if epoch == plan.epochs or time.monotonic() - saved_at >= work.checkpoint_seconds:
                checkpoint.save(path, config, work.model, work.optimizer, work.schedule, state, frozen=work.frozen)
                saved, saved_at = epoch, time.monotonic()
    if distributed.is_main() and saved != state["epoch"]:  # stopped early between two checkpoints
        checkpoint.save(path, config, work.model, work.optimizer, work.schedule, state, frozen=work.frozen)
    if state["best_state"] is None:
        raise ImgsimError(f"nothing to train: epochs={plan.epochs} and the checkpoint already has {state['epoch']}")
    return state["best_state"], state["history"]


def checkpoint_path(plan: TrainPlan) -> Path:
    return Path(plan.checkpoint_dir) / checkpoint.FILENAME


def resumes(plan: TrainPlan) -> bool:
    """Whether this run continues a checkpoint: --resume, or --resume-if-present with one there."""
    return plan.resume or (plan.resume_if_present and checkpoint_path(plan).exists())


def read_checkpoint(plan: TrainPlan) -> dict | None:
    """The last checkpoint's bookkeeping (epoch, extra state such as the MLflow run id), if there is one."""
    return checkpoint.read_state(checkpoint_path(plan))
