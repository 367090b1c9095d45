"""Training as users run it: interrupted with kill -9 and resumed, and as 2 DDP processes with gloo."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from imgsim.manifest import Manifest
from imgsim.nn.checkpoint import FILENAME as CHECKPOINT
from imgsim.nn.model import TrainedModel
from imgsim.runs import tracking
from imgsim.split import SplitConfig, split_dataset
from tests.conftest import make_image_folder, mlflow_store

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SMALL = ["--widths", "8,16", "--depths", "1,1", "--embedding-dim", "16", "--image-size", "32", "--batch-size", "4"]


@pytest.fixture
def manifest_dir(tmp_path) -> Path:
    root = tmp_path / "images"
    make_image_folder(root, per_class=20)
    return split_dataset(SplitConfig(data_dir=str(root))).save(tmp_path / "split")


def _train_cmd(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "pipelines" / "train.py"), *SMALL, *args]


def test_kill_9_mid_epoch_leaves_a_usable_checkpoint_and_resume_finishes(tmp_path, manifest_dir):
    ckpt = tmp_path / "ckpt"
    args = ["--manifest-uri", str(manifest_dir), "--epochs", "40", "--checkpoint-dir", str(ckpt), "--register-name", ""]
    with mlflow_store(tmp_path):
        env = os.environ.copy()
        proc = subprocess.Popen(_train_cmd(*args), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while not (ckpt / CHECKPOINT).exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.3)  # well inside a later epoch
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = torch.load(ckpt / CHECKPOINT, weights_only=False)["state"]
        assert 1 <= state["epoch"] < 40, "the kill should land before training ends"
        resumed = subprocess.run(_train_cmd(*args, "--resume"), cwd=tmp_path, env=env, capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        run = mlflow.tracking.MlflowClient().get_run(state["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        steps = {m.step for m in mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "train_loss")}
        assert steps == set(range(1, 41))
        changed = subprocess.run(_train_cmd(*args, "--resume", "--lr", "0.5"), cwd=tmp_path, env=env,
                                 capture_output=True, text=True)
        assert changed.returncode == 2 and "settings ['lr'] differ" in changed.stderr


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, manifest_dir):
    with mlflow_store(tmp_path):
        out = subprocess.run(_train_cmd("--manifest-uri", str(manifest_dir), "--checkpoint-dir", str(tmp_path / "none"),
                                        "--resume"), cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2 and "no checkpoint" in out.stderr and "Traceback" not in out.stderr


def test_torchrun_two_processes_on_cpu_with_gloo(tmp_path, manifest_dir):
    with mlflow_store(tmp_path):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *_train_cmd("--manifest-uri", str(manifest_dir), "--epochs", "2", "--checkpoint-dir",
                           str(tmp_path / "ckpt"), "--register-name", "ddp-model")[1:]]
        out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        tracking.setup()
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
        assert len(runs) == 1 and runs[0].data.params["world_size"] == "2"
        bundle = TrainedModel.load(tracking.download("models:/ddp-model/1", "model", tmp_path / "model"))
    model = bundle.build()
    x = torch.rand(4, 1, 32, 32)
    assert torch.isfinite(model(x)).all() and model.embed(x).shape == (4, 16)
    assert bundle.classes == Manifest.load(manifest_dir).classes


def _node(tmp_path, port: int, name: str, args: list[str]) -> subprocess.Popen:
    """One 'pod' of the chart's multi-node Indexed Job: torchrun with c10d rendezvous, one process per node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "ddp-test",
           "--max-restarts", "0", "-m", "imgsim.cli", "train", *SMALL, *args, "--resume-if-present"]
    log = open(tmp_path / f"{name}.log", "ab")
    return subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=os.environ | {"PYTHONPATH": str(REPO)})


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_two_node_ddp_survives_a_dead_rank_by_resuming(tmp_path, manifest_dir):
    from support.servers import free_port

    ckpt = tmp_path / "ckpt"
    args = ["--manifest-uri", str(manifest_dir), "--epochs", "30", "--checkpoint-dir", str(ckpt), "--register-name", ""]
    with mlflow_store(tmp_path):
        subprocess.run([sys.executable, "-m", "imgsim.cli", "setup-tracking"], cwd=tmp_path, check=True,
                       capture_output=True)
        port = free_port()
        nodes = [_node(tmp_path, port, f"node{i}", args) for i in range(2)]
        deadline = time.monotonic() + 300
        while not (ckpt / CHECKPOINT).exists() and time.monotonic() < deadline and nodes[0].poll() is None:
            time.sleep(0.05)
        for pid in [nodes[1].pid, *_descendants(nodes[1].pid)]:  # the pod of one rank dies mid-training: its
            os.kill(pid, signal.SIGKILL)                         # agent and the worker it started in a new session
        nodes[1].wait()
        assert nodes[0].wait(timeout=180) != 0  # the other fails, promptly, rather than hanging in a collective
        state = torch.load(ckpt / CHECKPOINT, weights_only=False)["state"]
        assert 1 <= state["epoch"] < 30, "the kill should land before training ends"
        # The Job's retry: the same command on both nodes continues from the checkpoint, in the same MLflow run.
        port = free_port()
        nodes = [_node(tmp_path, port, f"retry{i}", args) for i in range(2)]
        codes = [node.wait(timeout=600) for node in nodes]
        assert codes == [0, 0], (tmp_path / "retry0.log").read_text()[-3000:]
        run = mlflow.tracking.MlflowClient().get_run(state["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
        steps = {m.step for m in mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "train_loss")}
        assert steps == set(range(1, 31))
