"""Config: dataclass defaults < YAML file < command line, with clear errors."""

import dataclasses

import pytest

from imgsim import config
from imgsim.cli import build_parser
from imgsim.errors import ImgsimError
from imgsim.stages.settings import TrainConfig


def test_file_overrides_defaults_and_cli_overrides_file(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("epochs: 3\nwidths: [4, 8]\nlr: 0.05\n")
    ns = build_parser().parse_args(["train", "--config", str(path), "--epochs", "5", "--augment", "false"])
    cfg = config.from_namespace(TrainConfig, ns)
    assert cfg.epochs == 5 and cfg.widths == (4, 8) and cfg.lr == 0.05 and cfg.augment == "none"
    assert TrainConfig(augment="Photo").augment == "photo" and TrainConfig(augment="true").augment is None
    assert cfg.batch_size == TrainConfig().batch_size


def test_comma_separated_tuples_and_flag_booleans():
    ns = build_parser().parse_args(["train", "--widths", "16,32,64", "--resume"])
    cfg = config.from_namespace(TrainConfig, ns)
    assert cfg.widths == (16, 32, 64) and cfg.resume is True


@pytest.mark.parametrize("overrides, message", [
    ({"epoch": 3}, "unknown setting"),
    ({"epochs": "many"}, "epochs must be a whole number"),
    ({"epochs": "2.5"}, "epochs must be a whole number"),
    ({"augment": "perhaps"}, "augment must be one of"),
])
def test_bad_settings_name_the_problem(overrides, message):
    with pytest.raises(ImgsimError, match=message):
        config.resolve(TrainConfig, None, overrides)


def test_auto_is_none_in_the_dataclass_and_spelt_auto_everywhere_else(tmp_path):
    auto = [f.name for f in dataclasses.fields(TrainConfig) if config.is_auto(TrainConfig, f.name)]
    assert {"epochs", "batch_size", "lr", "backbone", "widths", "keep_features", "cache", "workers"} <= set(auto)
    assert all(getattr(TrainConfig(), name) is None for name in auto)
    path = tmp_path / "train.yaml"
    path.write_text("epochs: auto\nbackbone: AUTO\nlr: 0.05\n")
    ns = build_parser().parse_args(["train", "--config", str(path), "--batch-size", "auto", "--cache", "auto",
                                    "--widths", "auto", "--lr", "auto"])  # what `mlflow run -P lr=auto` passes
    cfg = config.from_namespace(TrainConfig, ns)
    assert (cfg.epochs, cfg.backbone, cfg.batch_size, cfg.cache, cfg.widths, cfg.lr) == (None,) * 6
    assert config.to_params(cfg)["epochs"] == "auto" and config.to_params(TrainConfig(epochs=3))["epochs"] == "3"
    text = _help(["train", "--help"])
    assert "(default: auto)" in text and "-1:" not in text and "0: auto" not in text


@pytest.mark.parametrize("overrides, message", [
    ({"epochs": "0"}, "epochs must be at least 1, or auto"),  # 0 means only zero, and zero epochs train nothing
    ({"max_train_items": 0}, "max_train_items must be at least 1, or auto"),
    ({"workers": -1}, "workers must be 0 or more"),
    ({"label_smoothing": -1}, r"label_smoothing must be within \[0, 1\) or auto"),
    ({"widths": ""}, "widths and depths list one number per stage, or are auto"),
    ({"embedding_hidden": -1}, "embedding_hidden must be 0 or more, or auto"),
    ({"crop_scale": 0}, r"crop_scale must be within \(0, 1\] or auto"),
    ({"head_views": -2}, "head_views must be 0 or more"),
])
def test_the_old_auto_spellings_are_refused_by_name(overrides, message):
    with pytest.raises(ImgsimError, match=message):
        config.resolve(TrainConfig, None, overrides)


def test_whole_numbers_from_mlflow_float_parameters():
    assert config.resolve(TrainConfig, None, {"epochs": "12.0", "lr": "1"}).epochs == 12


def test_unreadable_config_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ImgsimError, match="must hold a mapping"):
        config.resolve(TrainConfig, str(tmp_path / "bad.yaml"))


# The server and the page: one mechanism, constructor parameters (or flags) > IMGSIM_* variables > defaults.

def test_server_settings_come_from_parameters_then_environment_then_defaults(monkeypatch):
    from imgsim.serve.settings import ServiceConfig

    monkeypatch.setenv("IMGSIM_MAX_K", "40")
    monkeypatch.setenv("IMGSIM_DEFAULT_K", "7")
    monkeypatch.setenv("IMGSIM_LOAD_BACKOFF_S", "0.5")
    cfg = ServiceConfig.from_sources(default_k=3, gallery_root="", max_batch="8")  # "" is "not given"
    assert (cfg.default_k, cfg.max_k, cfg.max_batch, cfg.load_backoff_s, cfg.gallery_root) == (3, 40, 8, 0.5, "")
    assert ServiceConfig.from_sources().threads == ServiceConfig().threads == 1


@pytest.mark.parametrize("params, message", [
    ({"max_kk": 3}, r"unknown server parameter\(s\) \['max_kk'\]; valid: \[.*'max_k'"),
    ({"max_k": "lots"}, "max_k must be a whole number, got 'lots'"),
    ({"default_k": 9, "max_k": 5}, "need 1 <= default_k <= max_k"),
    ({"runtime": "tensorrt"}, "runtime must be one of onnx, torch"),
    ({"max_batch": 0}, "max_batch must be at least 1"),
])
def test_bad_server_settings_name_the_problem(params, message):
    from imgsim.serve.settings import ServiceConfig

    with pytest.raises(ImgsimError, match=message):
        ServiceConfig.from_sources(**params)


def test_page_settings_flags_win_over_the_environment(monkeypatch):
    from imgsim.serve.page import UiConfig

    monkeypatch.setenv("IMGSIM_UI_MAX_K", "20")
    monkeypatch.setenv("IMGSIM_UI_URL", "http://seldon:8000")
    assert UiConfig.from_env(max_k=None, url="http://127.0.0.1:9") == UiConfig(max_k=20, url="http://127.0.0.1:9")
    monkeypatch.setenv("IMGSIM_UI_MAX_PIXELS", "0")
    with pytest.raises(ImgsimError, match="max_pixels must be at least 1"):
        UiConfig.from_env()


def test_every_page_setting_is_a_flag_with_its_help():
    import dataclasses

    from imgsim.serve.page import UiConfig

    text = build_parser().parse_args(["ui"]) and _help(["ui", "--help"])
    for field in dataclasses.fields(UiConfig):
        assert "--" + field.name.replace("_", "-") in text and config.help_of(field).split()[0] in text


def _help(argv: list[str]) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    return out.getvalue()
