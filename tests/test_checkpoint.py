"""Checkpoints load tensors and plain values only: one that carries a pickled object is refused, unrun."""

from pathlib import Path

import numpy as np
import pytest
import torch

from imgsim.errors import ImgsimError
from imgsim.nn import checkpoint


class _Planted:
    """What an attacker with write access to the checkpoint volume would plant: unpickling runs touch()."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _parts():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
    return model, optimizer, schedule


def test_a_checkpoint_round_trips_with_numpy_metrics(tmp_path):
    model, optimizer, schedule = _parts()
    state = {"epoch": 2, "best": np.float64(0.5), "history": [{"epoch": 1, "map_at_r": np.float32(0.25)}],
             "best_state": model.state_dict(), "stale": 0}
    config = {"widths": (8, 16), "lr": 0.1}
    checkpoint.save(tmp_path / "last.pt", config, model, optimizer, schedule, state)
    assert checkpoint.read_state(tmp_path / "last.pt")["history"] == [{"epoch": 1, "map_at_r": 0.25}]
    assert checkpoint.restore(tmp_path / "last.pt", config, *_parts())["best"] == 0.5


def test_a_checkpoint_with_a_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"config": {}, "state": {"epoch": 1, "note": _Planted(marker)}}, tmp_path / "last.pt")
    with pytest.raises(ImgsimError, match=r"refusing the checkpoint .*last\.pt: it holds more than tensors"):
        checkpoint.read_state(tmp_path / "last.pt")
    with pytest.raises(ImgsimError, match="refusing the checkpoint"):
        checkpoint.restore(tmp_path / "last.pt", {}, *_parts())
    assert not marker.exists()
