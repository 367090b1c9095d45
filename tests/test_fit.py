"""The one training loop (imgsim.stages.train.fit) on a scripted Work: selection, patience, checkpoints, resume;
and head mode, which now has them too."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from imgsim.errors import ImgsimError
from imgsim.manifest import Item, Manifest
from imgsim.stages import head
from imgsim.stages.plan import TrainPlan, plan
from imgsim.stages.settings import TrainConfig
from imgsim.stages.train import fit, read_checkpoint, train_model
from tests.test_head import _quick, colour_manifest  # noqa: F401 - the fixture

SCORES = [0.2, 0.5, 0.4, 0.45, 0.3, 0.1]  # eval mAP@R epoch by epoch: the second epoch is the best


class Scripted:
    """A Work whose evaluation follows SCORES and whose weights record the epoch they were trained in."""

    def __init__(self, checkpoint_seconds: float = 0.0) -> None:
        self.model = torch.nn.Linear(1, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)
        self.checkpoint_seconds, self.frozen, self.epochs = checkpoint_seconds, "", []

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        self.epochs.append(epoch)
        with torch.no_grad():
            self.model.weight.fill_(epoch)
        self.optimizer.step()
        self.schedule.step()
        return 1.0 / epoch, 0.5

    def evaluate(self) -> dict[str, float]:
        return {"eval_map_at_r": SCORES[self.model.weight.item().__int__() - 1]}


def _plan(tmp_path, **given) -> TrainPlan:
    items = [Item(f"{i}.png", "a", "train" if i % 4 else "eval", "0" * 64, 28, 28) for i in range(40)]
    cfg = TrainConfig(**{"epochs": 6, "checkpoint_dir": str(tmp_path / "c"), "select_metric": "map_at_r", **given})
    return plan(cfg, Manifest(str(tmp_path), ["a"], items, [], {}))


def test_fit_keeps_the_best_epoch_and_checkpoints_every_one(tmp_path):
    logged = []
    best, history = fit(_plan(tmp_path), Scripted(), on_epoch=lambda e, m: logged.append(e))
    assert best["weight"].item() == 2 and [h["epoch"] for h in history] == logged == [1, 2, 3, 4, 5, 6]
    assert history[1]["eval_map_at_r"] == 0.5 and {"train_loss", "lr", "epoch_seconds"} <= set(history[0])
    assert read_checkpoint(_plan(tmp_path))["epoch"] == 6


def test_patience_stops_after_that_many_epochs_without_a_better_score(tmp_path, capsys):
    work = Scripted()
    best, history = fit(_plan(tmp_path, patience=2), work)
    assert work.epochs == [1, 2, 3, 4] and best["weight"].item() == 2  # 3 and 4 were no better than 2
    assert "stopping early after epoch 4: no better map_at_r for 2 epochs" in capsys.readouterr().out
    assert read_checkpoint(_plan(tmp_path, patience=2))["epoch"] == 4  # kept though it stopped between checkpoints


def test_a_resumed_run_continues_where_the_checkpoint_ends_with_its_best_so_far(tmp_path):
    def crash(epoch, metrics):
        if epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_plan(tmp_path), Scripted(), on_epoch=crash)  # logged 1 and 2, then died before checkpointing 3
    assert read_checkpoint(_plan(tmp_path))["epoch"] == 2
    work = Scripted()
    best, history = fit(_plan(tmp_path, resume=True), work)
    assert work.epochs == [3, 4, 5, 6] and [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert best["weight"].item() == 2  # the best came from before the crash
    with pytest.raises(ImgsimError, match=r"settings \['lr'\] differ"):
        fit(_plan(tmp_path, resume=True, lr=0.5), Scripted())


def test_slow_checkpoints_are_throttled_but_the_first_and_last_epochs_are_always_kept(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr("imgsim.nn.checkpoint.save", lambda path, config, model, opt, sch, state, **kw:
                        saved.append(state["epoch"]))
    fit(_plan(tmp_path), Scripted(checkpoint_seconds=3600))
    assert saved == [1, 6]  # the first records the run to resume


def test_without_an_eval_split_the_plan_keeps_the_last_epoch(tmp_path):
    items = [Item(f"{i}.png", "a", "train", "0" * 64, 28, 28) for i in range(40)]
    cfg = TrainConfig(epochs=6, checkpoint_dir=str(tmp_path / "c"), select_metric="map_at_r")
    best, _ = fit(plan(cfg, Manifest(str(tmp_path), ["a"], items, [], {})), Scripted())
    assert best["weight"].item() == 6


def test_head_mode_stops_with_patience_and_resumes_exactly_from_its_checkpoint(tmp_path, colour_manifest,  # noqa: F811
                                                                               monkeypatch):
    monkeypatch.setattr(head.HeadWork, "checkpoint_seconds", 0.0)
    quick = _quick(tmp_path, epochs=30, select_metric="accuracy", patience=2)
    result = train_model(quick, colour_manifest)
    assert len(result.history) < 30 and read_checkpoint(plan(quick, colour_manifest))["epoch"] == len(result.history)

    cfg = _quick(tmp_path, epochs=6, checkpoint_dir=str(tmp_path / "whole"))
    whole = train_model(cfg, colour_manifest).bundle

    def crash(epoch, metrics):
        if epoch == 4:
            raise KeyboardInterrupt

    cut = dataclasses.replace(cfg, checkpoint_dir=str(tmp_path / "cut"))
    with pytest.raises(KeyboardInterrupt):
        train_model(cut, colour_manifest, on_epoch=crash)
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert not any(k.startswith("trunk.") for k in saved["model"])  # the frozen backbone is rebuilt, not stored
    resumed = train_model(dataclasses.replace(cut, resume=True), colour_manifest, on_epoch=crash_after(3))
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    # Dropout's random state travels with the checkpoint: the resumed run is the uninterrupted one.
    assert all(torch.equal(whole.state_dict[k], resumed.bundle.state_dict[k]) for k in whole.state_dict)


def crash_after(last: int):
    def check(epoch, metrics):
        assert epoch > last, f"epoch {epoch} ran again after the checkpoint had it"
    return check


def test_a_checkpoint_from_before_the_plan_resumes_where_its_auto_spellings_differ(tmp_path):
    from imgsim.nn import checkpoint

    def crash(epoch, metrics):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_plan(tmp_path), Scripted(), on_epoch=crash)
    path = tmp_path / "c" / checkpoint.FILENAME
    old = torch.load(path, weights_only=True)
    old.pop("format")
    old["config"] |= {"workers": -1, "image_size": 0, "patience": 0, "cache": "auto", "data_dir": ""}
    torch.save(old, path)
    work = Scripted()
    fit(_plan(tmp_path, resume=True), work)
    assert work.epochs == [2, 3, 4, 5, 6]
    old["config"]["lr"] = 9.0  # a setting given then and now differently is still refused
    torch.save(old, path)
    with pytest.raises(ImgsimError, match=r"settings \['lr'\] differ"):
        fit(_plan(tmp_path, resume=True), Scripted())
