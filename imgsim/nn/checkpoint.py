"""Training checkpoints: written atomically every epoch, restored only with the same settings."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from imgsim import atomic
from imgsim.errors import ImgsimError

FILENAME = "last.pt"
# Settings that may change between an interrupted run and its --resume: they change where and how fast, not what
# trains (a restarted pod's node may have other cores, or another feature store mounted).
RESUMABLE_CHANGES = {"resume", "resume_if_present", "run_name", "workers", "threads", "cache", "feature_store"}
# Checkpoints before the train plan held settings with their auto spellings: those are not compared.
LEGACY_AUTO = (0, -1, "auto", "", (), [])
FORMAT = 2


def save(path: Path, config: dict, model, optimizer, schedule, state: dict, *, frozen: str = "") -> None:
    """Write everything needed to continue, the global RNG's state included; weights under ``frozen`` (a prefix:
    a backbone that does not train) are left out. A kill -9 mid-write leaves the previous file intact."""
    def kept(weights: dict) -> dict:
        return {k: v for k, v in weights.items() if not (frozen and k.startswith(frozen))}

    state = {**state, "best_state": kept(state["best_state"]) if state.get("best_state") else None,
             "torch_rng": torch.get_rng_state()}
    payload = {"format": FORMAT, "config": _plain(config), "model": kept(model.state_dict()),
               "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "state": _plain(state)}
    with atomic.atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_state(path: Path) -> dict | None:
    """The bookkeeping part of a checkpoint (epoch, history, MLflow run id), or None if there is none."""
    if not path.exists():
        return None
    return _load(path)["state"]


def restore(path: Path, config: dict, model, optimizer, schedule, *, frozen: str = "") -> dict:
    """Load model, optimizer, schedule and RNG state in place (the weights under ``frozen`` stay as built); refuse a
    checkpoint made with other settings."""
    if not path.exists():
        raise ImgsimError(f"--resume was given but there is no checkpoint at {path}; run without --resume to start afresh")
    payload = _load(path)
    then, legacy = payload["config"], payload.get("format", 1) < FORMAT
    changed = sorted(k for k in config if k not in RESUMABLE_CHANGES and config[k] != then.get(k)
                     and not (legacy and then.get(k) in LEGACY_AUTO))
    if changed:
        why = " (the learning-rate schedule was built for the original epochs)" if "epochs" in changed else ""
        raise ImgsimError(f"cannot resume from {path}: settings {changed} differ from the interrupted run{why}; "
                          "resume with the same settings or use another checkpoint_dir")
    built = {k: v for k, v in model.state_dict().items() if frozen and k.startswith(frozen)}
    model.load_state_dict({**built, **payload["model"]})
    optimizer.load_state_dict(payload["optimizer"])
    schedule.load_state_dict(payload["schedule"])
    state = payload["state"]
    if state.get("best_state") is not None:
        state["best_state"] = {**{k: v.clone() for k, v in built.items()}, **state["best_state"]}
    if "torch_rng" in state:
        torch.set_rng_state(state.pop("torch_rng"))
    return state


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
