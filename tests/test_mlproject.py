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


@pytest.mark.slow
def test_mlflow_run_split_entry_point(tmp_path):
    root = tmp_path / "images"
    make_image_folder(root)
    with mlflow_store(tmp_path):
        env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        subprocess.run([sys.executable, "-m", "imgsim.cli", "setup-tracking"], check=True, env=env)
        out = subprocess.run([str(Path(sys.executable).parent / "mlflow"), "run", str(REPO), "-e", "split",
                              "--env-manager", "local", "--experiment-name", "imgsim", "-P", f"data_dir={root}",
                              "-P", "seed=7"], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        tracking.setup()
        run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
        assert run.data.params["seed"] == "7" and run.data.tags["imgsim.stage"] == "split"
        manifest = Manifest.load(tracking.download(f"runs:/{run.info.run_id}/split", "manifest"))
    assert manifest.params["seed"] == 7 and len(manifest.rejected) == 6
