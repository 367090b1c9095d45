"""The MLproject: its defaults match the stage dataclasses, and `mlflow run` really runs an entry point."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from imgsim import config
from imgsim.extract import ExtractConfig
from imgsim.manifest import Manifest
from imgsim.split import SplitConfig
from imgsim.train import TrainConfig
from imgsim import tracking
from tests.conftest import make_image_folder, mlflow_store

REPO = Path(__file__).resolve().parents[1]
PROJECT = yaml.safe_load((REPO / "MLproject").read_text())


@pytest.mark.parametrize("entry, cls", [("split", SplitConfig), ("train", TrainConfig), ("extract", ExtractConfig)])
def test_entry_point_defaults_equal_the_dataclass_defaults(entry, cls):
    params = PROJECT["entry_points"][entry]["parameters"]
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for name, spec in params.items():
        if name == "config" or "default" not in spec:
            continue
        expected = config.resolve(cls, None, {name: str(spec["default"])})
        assert getattr(expected, name) == defaults[name], f"{entry}.{name}: MLproject {spec['default']!r}"
        assert f"{{{name}}}" in PROJECT["entry_points"][entry]["command"]


def test_main_defaults_match_the_stages():
    params = PROJECT["entry_points"]["main"]["parameters"]
    assert params["epochs"]["default"] == TrainConfig().epochs
    assert params["data_dir"]["default"] == SplitConfig().data_dir
    assert params["n_trees"]["default"] == ExtractConfig().n_trees


def _mlflow_run(entry: str, *params: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_EXPERIMENT_ID", None)  # set in-process by mlflow.set_experiment; --experiment-name decides
    args = [a for p in params for a in ("-P", p)]
    return subprocess.run([str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", entry,
                           "--env-manager", "local", "--experiment-name", "imgsim", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def _newest_run(stage: str):
    tracking.setup()
    return mlflow.search_runs(search_all_experiments=True, output_format="list", order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.`imgsim.stage` = '{stage}'")[0]


@pytest.mark.slow
def test_mlflow_run_split_train_extract_entry_points(tmp_path):
    root = tmp_path / "images"
    make_image_folder(root)
    with mlflow_store(tmp_path):
        subprocess.run([sys.executable, "-m", "imgsim.cli", "setup-tracking"], check=True)
        out = _mlflow_run("split", f"data_dir={root}", "seed=7")
        assert out.returncode == 0, out.stderr[-3000:]
        split = _newest_run("split")
        assert split.data.params["seed"] == "7"
        manifest = Manifest.load(tracking.download(f"runs:/{split.info.run_id}/split", "manifest"))
        assert manifest.params["seed"] == 7 and len(manifest.rejected) == 6

        out = _mlflow_run("train", f"manifest_uri=runs:/{split.info.run_id}/split", "epochs=1", "widths=8,16",
                          "depths=1,1", "embedding_dim=16", f"checkpoint_dir={tmp_path / 'ckpt'}",
                          "register_name=mlproject-model")
        assert out.returncode == 0, out.stderr[-3000:]
        assert _newest_run("train").data.params["epochs"] == "1"

        out = _mlflow_run("extract", "model_uri=models:/mlproject-model/1", "n_trees=5")
        assert out.returncode == 0, out.stderr[-3000:]
        extract = _newest_run("extract")
        assert extract.data.tags["imgsim.manifest_uri"] == f"runs:/{split.info.run_id}/split"
        assert 0 <= extract.data.metrics["precision_at_10"] <= 1
