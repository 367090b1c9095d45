"""Training checkpoints: written atomically every epoch, restored only with the same settings."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from imgsim import atomic
from imgsim.errors import ImgsimError

FILENAME = "last.pt"
# Settings that may change between an interrupted run and its --resume (workers: a restarted pod's node may differ).
RESUMABLE_CHANGES = {"resume", "resume_if_present", "run_name", "workers", "threads"}


def save(path: Path, config: dict, model, optimizer, schedule, state: dict) -> None:
    """Write everything needed to continue; a kill -9 mid-write leaves the previous file intact."""
    payload = {"config": _plain(config), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "schedule": schedule.state_dict(), "state": _plain(state)}
    with atomic.atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_state(path: Path) -> dict | None:
    """The bookkeeping part of a checkpoint (epoch, history, MLflow run id), or None if there is none."""
    if not path.exists():
        return None
    return _load(path)["state"]


def restore(path: Path, config: dict, model, optimizer, schedule) -> dict:
    """Load model, optimizer and schedule state in place; refuse a checkpoint made with other settings."""
    if not path.exists():
        raise ImgsimError(f"--resume was given but there is no checkpoint at {path}; run without --resume to start afresh")
    payload = _load(path)
    then = payload["config"]
    changed = sorted(k for k in config if k not in RESUMABLE_CHANGES and config[k] != then.get(k))
    if changed:
        why = " (the learning-rate schedule was built for the original epochs)" if "epochs" in changed else ""
        raise ImgsimError(f"cannot resume from {path}: settings {changed} differ from the interrupted run{why}; "
                          "resume with the same settings or use another checkpoint_dir")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    schedule.load_state_dict(payload["schedule"])
    return payload["state"]


def _load(path: Path) -> dict:
    """Tensors and plain Python values only: checkpoints live on shared volumes, and unpickling an arbitrary
    object would run whatever code whoever could write there put in it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ImgsimError(f"refusing the checkpoint {path}: it holds more than tensors and plain values "
                          f"({str(exc).splitlines()[0][:200]}); delete it or use another checkpoint_dir") from None


def _plain(value):
    """numpy scalars (a metric's float64) as Python numbers, so the checkpoint loads with weights_only."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value.item() if isinstance(value, np.generic) else value
