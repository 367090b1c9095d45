"""Config: dataclass defaults < YAML file < command line, with clear errors."""

import pytest

from imgsim import config
from imgsim.cli import build_parser
from imgsim.errors import ImgsimError
from imgsim.train import TrainConfig


def test_file_overrides_defaults_and_cli_overrides_file(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("epochs: 3\nwidths: [4, 8]\nlr: 0.05\n")
    ns = build_parser().parse_args(["train", "--config", str(path), "--epochs", "5", "--augment", "false"])
    cfg = config.from_namespace(TrainConfig, ns)
    assert cfg.epochs == 5 and cfg.widths == (4, 8) and cfg.lr == 0.05 and cfg.augment == "none"
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


def test_whole_numbers_from_mlflow_float_parameters():
    assert config.resolve(TrainConfig, None, {"epochs": "12.0", "lr": "1"}).epochs == 12


def test_unreadable_config_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ImgsimError, match="must hold a mapping"):
        config.resolve(TrainConfig, str(tmp_path / "bad.yaml"))
