"""The MLproject: its defaults match the stage dataclasses, and `mlflow run` really runs an entry point."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from imgsim.manifest import Manifest
from imgsim.runs import tracking
from imgsim.split import SplitConfig
from imgsim.stages.settings import ExtractConfig, TrainConfig
from tests.conftest import make_image_folder, mlflow_store, photo

REPO = Path(__file__).resolve().parents[1]
PROJECT = yaml.safe_load((REPO / "MLproject").read_text())


OPTIONAL = {"config"}  # declared with an empty default that means "none"


@pytest.mark.parametrize("entry", ["split", "train", "extract", "main", "gallery_add", "gallery_remove"])
def test_no_declared_parameter_has_a_default_that_would_mask_the_config_file(entry):
    # MLflow substitutes every declared parameter, so a declared default always reaches the command line.
    params = PROJECT["entry_points"][entry]["parameters"]
    assert {name for name, spec in params.items() if "default" in spec} <= OPTIONAL
    for name in params:
        assert f"{{{name}}}" in PROJECT["entry_points"][entry]["command"]


@pytest.mark.parametrize("stage, cls", [("split", SplitConfig), ("train", TrainConfig), ("extract", ExtractConfig)])
def test_every_setting_is_accepted_as_mlflow_passes_undeclared_parameters(stage, cls):
    from imgsim.cli import build_parser
    fields = [f for f in dataclasses.fields(cls) if "_" in f.name and f.type != "bool"]
    argv = [stage] + [a for f in fields for a in (f"--{f.name}", str(f.default) if f.default != () else "1")]
    ns = build_parser().parse_args(argv)
    assert all(getattr(ns, f.name) is not None for f in fields)


def test_main_routes_file_sections_flat_keys_and_flags(tmp_path):
    from imgsim.cli import build_parser, main_configs
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\ntrain: {epochs: 20, backbone: resnet18}\nextract: {n_trees: 100}\n")
    cfgs = main_configs(build_parser().parse_args(["main", "--config", str(path), "--n_trees", "7"]))
    assert cfgs["train"].epochs == 20 and cfgs["train"].backbone == "resnet18"
    assert cfgs["extract"].n_trees == 7  # the flag the user passed beats the file
    assert cfgs["split"].seed == cfgs["train"].seed == cfgs["extract"].seed == 3
    assert cfgs["split"].data_dir == SplitConfig().data_dir  # nothing given: the stage default
    path.write_text("trian: {epochs: 2}\n")
    with pytest.raises(Exception, match="unknown key"):
        main_configs(build_parser().parse_args(["main", "--config", str(path)]))


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
        settings = tmp_path / "split.yaml"
        settings.write_text("seed: 5\ntest_ratio: 0.3\n")
        out = _mlflow_run("split", f"data_dir={root}", "seed=7", f"config={settings}")
        assert out.returncode == 0, out.stderr[-3000:]
        split = _newest_run("split")
        assert split.data.params["seed"] == "7"  # passed with -P: beats the file
        assert split.data.params["test_ratio"] == "0.3"  # only in the file: the file beats the default
        manifest = Manifest.load(tracking.download(f"runs:/{split.info.run_id}/split", "manifest", tmp_path / "split"))
        assert manifest.params["seed"] == 7 and manifest.params["test_ratio"] == 0.3 and len(manifest.rejected) == 6

        out = _mlflow_run("train", f"manifest_uri=runs:/{split.info.run_id}/split", "epochs=1", "widths=8,16",
                          "depths=1,1", "embedding_dim=16", f"checkpoint_dir={tmp_path / 'ckpt'}",
                          "register_name=mlproject-model")
        assert out.returncode == 0, out.stderr[-3000:]
        assert _newest_run("train").data.params["epochs"] == "1"

        settings.write_text("n_trees: 3\nsearch_k: 77\n")
        out = _mlflow_run("extract", "model_uri=models:/mlproject-model/1", "n_trees=5", f"config={settings}")
        assert out.returncode == 0, out.stderr[-3000:]
        extract = _newest_run("extract")
        assert extract.data.params["n_trees"] == "5" and extract.data.params["search_k"] == "77"
        assert extract.data.tags["imgsim.manifest_uri"] == f"runs:/{split.info.run_id}/split"
        assert 0 <= extract.data.metrics["precision_at_10"] <= 1
        assert extract.data.tags["imgsim.gallery_version"] == "1"  # extract starts the living gallery

        photo(3).save(root / "circle" / "added.png")
        out = _mlflow_run("gallery_add", f"paths={root / 'circle' / 'added.png'}")
        assert out.returncode == 0, out.stderr[-3000:]
        added = _newest_run("gallery_add")
        assert added.data.metrics["added_images"] == 1 and added.data.tags["imgsim.parent_version"] == "1"
        out = _mlflow_run("gallery_remove", "ids=0")
        assert out.returncode == 0, out.stderr[-3000:]
        assert _newest_run("gallery_remove").data.tags["imgsim.parent_version"] == "2"
        serving = mlflow.tracking.MlflowClient().get_model_version_by_alias("imgsim-gallery", "serving")
        assert str(serving.version) == "3"


@pytest.mark.slow
def test_mlflow_run_main_applies_the_readme_config_file(tmp_path):
    root = tmp_path / "images"
    make_image_folder(root)
    settings = tmp_path / "my-config.yaml"  # the README's example, made small enough for a test
    settings.write_text("train: {image_size: 24, channels: 3, widths: [8, 16], depths: [1, 1], embedding_dim: 16,"
                        " epochs: 2, batch_size: 16, head: arcface}\nextract: {n_trees: 7}\n")
    with mlflow_store(tmp_path):
        subprocess.run([sys.executable, "-m", "imgsim.cli", "setup-tracking"], check=True)
        out = _mlflow_run("main", f"data_dir={root}", f"config={settings}", f"checkpoint_dir={tmp_path / 'ckpt'}",
                          "register_name=", "batch_size=8")
        assert out.returncode == 0, out.stderr[-3000:]
        train, extract = _newest_run("train").data, _newest_run("extract").data
        assert train.params["epochs"] == "2" and train.params["head"] == "arcface"
        assert train.params["image_size"] == "24" and train.params["channels"] == "3"
        assert train.params["batch_size"] == "8"  # -P beats the file
        assert extract.params["n_trees"] == "7"
        assert len([k for k in train.metrics if k == "eval_map_at_r"]) == 1
