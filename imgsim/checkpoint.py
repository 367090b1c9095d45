"""Training checkpoints: written atomically every epoch, restored only with the same settings."""

from __future__ import annotations

from pathlib import Path

import torch

from imgsim import atomic
from imgsim.errors import ImgsimError

FILENAME = "last.pt"
# Settings that may change between an interrupted run and its --resume.
RESUMABLE_CHANGES = {"resume", "resume_if_present", "run_name"}


def save(path: Path, config: dict, model, optimizer, schedule, state: dict) -> None:
    """Write everything needed to continue; a kill -9 mid-write leaves the previous file intact."""
    payload = {"config": config, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "schedule": schedule.state_dict(), "state": state}
    with atomic.atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_state(path: Path) -> dict | None:
    """The bookkeeping part of a checkpoint (epoch, history, MLflow run id), or None if there is none."""
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)["state"]


def restore(path: Path, config: dict, model, optimizer, schedule) -> dict:
    """Load model, optimizer and schedule state in place; refuse a checkpoint made with other settings."""
    if not path.exists():
        raise ImgsimError(f"--resume was given but there is no checkpoint at {path}; run without --resume to start afresh")
    payload = torch.load(path, map_location="cpu", weights_only=False)
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
