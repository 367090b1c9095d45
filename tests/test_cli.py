"""The command line: help for every flag from the settings' own declarations, the commands the demo chains
(export --result, pick-image, wait-ready, report), their one-line errors, and a quiet terminal."""

from __future__ import annotations

import argparse
import dataclasses
import http.server
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from imgsim import config
from imgsim.cli import SAME_MEANING, STAGES, build_parser, main, main_configs, shared_settings
from imgsim.manifest import Manifest
from imgsim.result import MainResult
from imgsim.stages.settings import AddConfig, RemoveConfig
from support.servers import free_port
from support.store import mlflow_store

SETTINGS = [cls for _, cls in STAGES] + [AddConfig, RemoveConfig]


def _parsers(parser: argparse.ArgumentParser, name: str = "imgsim"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child_name, child in action.choices.items():
                yield from _parsers(child, f"{name} {child_name}")


def test_every_flag_of_every_command_has_help():
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, parser in _parsers(build_parser())
               for a in parser._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and a.help != argparse.SUPPRESS
               and not (a.help or "").strip()]
    assert not missing, missing


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda c: c.__name__)
def test_every_setting_is_declared_with_its_help_and_group(cls):
    for field in dataclasses.fields(cls):
        assert config.help_of(field), f"{cls.__name__}.{field.name} has no help"
        assert config.group_of(field) in config.GROUPS, f"{cls.__name__}.{field.name}: {config.group_of(field)!r}"


def test_help_shows_each_setting_once_in_its_stage_and_group(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["main", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for title in ("split: data:", "train: model:", "train: optimisation:", "train: augmentation:",
                  "extract: index:", "extract: distributed:"):
        assert title in text
    assert "--batch_size" not in text  # the underscore spelling (for mlflow run -P) is accepted, not listed
    assert "training images per optimizer step" in text and "images decoded per batch while embedding" in text
    assert "random seed of the split [sets it for split, train, extract]" in text


def test_no_main_flag_means_two_different_things():
    assert set(shared_settings()) <= SAME_MEANING, shared_settings()
    cfgs = main_configs(build_parser().parse_args(["main", "--batch-size", "8", "--embed-batch-size", "64",
                                                   "--seed", "3"]))
    assert cfgs["train"].batch_size == 8 and cfgs["extract"].embed_batch_size == 64
    assert cfgs["split"].seed == cfgs["train"].seed == cfgs["extract"].seed == 3


def test_verbose_after_any_command():
    assert build_parser().parse_args(["gallery", "add", "a.png", "--verbose"]).verbose is True
    assert build_parser().parse_args(["report", "r.json"]).verbose is False


def test_result_file_round_trip_and_report(tmp_path):
    result = MainResult("m1", "s1", "t1", "e1", "models:/imgsim/1", "runs:/e1/bundle",
                        {"map_at_r": 0.75, "accuracy": 0.9, "gallery_size": 100.0, "zeta": 1.5})
    path = result.save(tmp_path / "result.json")
    assert MainResult.load(path) == result and result.manifest_uri == "runs:/s1/split"
    lines = result.report().splitlines()
    assert lines[1].split() == ["main", "m1"] and "bundle" in lines[6]
    metrics = [line.split()[0] for line in lines[lines.index("") + 2:]]
    assert metrics == ["accuracy", "map_at_r", "gallery_size", "zeta"]  # headline first, in the headline's order
    assert "gallery_size  100" in result.report() and "accuracy 0.9000" in result.summary()


@pytest.mark.parametrize("content, message", [
    (None, "no result file at"),
    ("{not json", "cannot read the result file"),
    ('{"main": "m"}', "lacks split, train, extract, model_uri, bundle_uri, metrics"),
])
def test_bad_result_file_is_one_line_naming_it(tmp_path, capsys, content, message):
    path = tmp_path / "result.json"
    if content is not None:
        path.write_text(content)
    for argv in (["report", str(path)], ["pick-image", "--result", str(path)],
                 ["export", "--result", str(path), "--out", str(tmp_path / "b")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and str(path) in err and "imgsim main --result-file" in err
    assert not (tmp_path / "b").exists()


def test_pick_image_from_a_manifest_folder(tmp_path, capsys):
    items = [("circle/0.png", "circle", "train"), ("circle/1.png", "circle", "test"), ("square/2.png", "square", "test")]
    from imgsim.manifest import Item
    Manifest(str(tmp_path / "images"), ["circle", "square"], [Item(p, label, split, "0" * 64, 8, 8)
                                                               for p, label, split in items], [], {}).save(tmp_path / "m")
    assert main(["pick-image", "--manifest", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "images" / "circle/1.png")
    assert main(["pick-image", "--manifest", str(tmp_path / "m"), "--split", "test", "--index", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "images" / "square/2.png")
    assert main(["pick-image", "--manifest", str(tmp_path / "m"), "--split", "eval"]) == 2
    assert "eval split is empty" in capsys.readouterr().err
    assert main(["pick-image", "--manifest", str(tmp_path / "m"), "--index", "5"]) == 2
    assert "has 2 images" in capsys.readouterr().err
    assert main(["pick-image", "--manifest", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["pick-image"]) == 2 and "give --result" in capsys.readouterr().err


@pytest.mark.slow
def test_the_demo_steps_on_a_real_pipeline_run(pipeline_run, tmp_path, capsys):
    result_file = pipeline_run["work"] / "result.json"
    result = MainResult.load(result_file)
    with mlflow_store(pipeline_run["work"]):
        assert main(["export", "--result", str(result_file), "--out", str(tmp_path / "bundle")]) == 0
        assert (tmp_path / "bundle" / "bundle.json").is_file()
        assert main(["pick-image", "--result", str(result_file), "--split", "test"]) == 0
        picked = Path(capsys.readouterr().out.strip().splitlines()[-1])
        assert picked.is_file() and picked.is_relative_to(pipeline_run["root"])
        assert main(["report", str(result_file)]) == 0
        report = capsys.readouterr().out
        assert result.extract in report and "map_at_r" in report and "mlflow ui --backend-store-uri sqlite:" in report
        assert main(["pick-image", "--manifest", "runs:/0123456789abcdef/split"]) == 2
        assert "cannot be fetched" in capsys.readouterr().err


class _Health(http.server.BaseHTTPRequestHandler):
    ready_after = 0  # requests answered 503 before the first 200

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).ready_after -= 1
        self.send_response(200 if self.path == "/health/status" and self.ready_after < 0 else 503)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_wait_ready_polls_until_the_server_answers(capsys):
    _Health.ready_after = 2
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert main(["wait-ready", "--url", f"http://127.0.0.1:{server.server_port}", "--timeout-s", "30"]) == 0
        assert "ready after" in capsys.readouterr().out and _Health.ready_after < 0
    finally:
        server.shutdown()


def test_wait_ready_gives_up_on_a_dead_server_or_a_timeout(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert main(["wait-ready", "--url", url, "--pid", str(dead.pid), "--log", "server.log"]) == 2
    assert f"(pid {dead.pid}) exited before it was ready; see server.log" in capsys.readouterr().err
    assert main(["wait-ready", "--url", url, "--timeout-s", "1"]) == 2
    assert f"{url} was not ready after 1 s" in capsys.readouterr().err


def test_a_zombie_server_counts_as_exited(capsys):
    child = subprocess.Popen([sys.executable, "-c", "pass"])  # exits, not yet reaped: a zombie
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        assert main(["wait-ready", "--url", f"http://127.0.0.1:{free_port()}", "--pid", str(child.pid)]) == 2
        assert "exited before it was ready" in capsys.readouterr().err
    finally:
        child.wait()


def _setup_tracking(folder: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "IMGSIM_LOG"))}
    return subprocess.run([sys.executable, "-m", "imgsim.cli", "setup-tracking"], cwd=folder, capture_output=True,
                          text=True, timeout=300, env=clean | {"MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db"}
                          | env, check=True)


@pytest.mark.slow
def test_a_quiet_terminal_unless_asked(tmp_path):
    (tmp_path / "quiet").mkdir()
    (tmp_path / "loud").mkdir()
    quiet = _setup_tracking(tmp_path / "quiet")
    assert quiet.stderr == "" and quiet.stdout.count("\n") == 1 and "MLflow tracking: sqlite:" in quiet.stdout
    again = _setup_tracking(tmp_path / "quiet")  # the store exists: MLflow still re-runs its set-up
    assert again.stderr == ""
    loud = _setup_tracking(tmp_path / "loud", IMGSIM_LOG_LEVEL="DEBUG")
    assert "mlflow.store.db.utils" in loud.stderr and "Creating initial MLflow database tables" in loud.stderr


def test_scripts_and_makefile_hold_no_inline_program():
    # Logic hidden in `python -c` or a heredoc is code no test runs: the demo broke that way (issue 19).
    inline = re.compile(r"((^|[\s;&|(\"'])(\S*/)?(python3?(\.\d+)?|\$\{?PY(THON)?\}?)\s([^\n]*\s)?-c\s)"
                        r"|(<<(?!<)-?\s*['\"]?[A-Za-z_])")
    repo = Path(__file__).resolve().parents[1]
    for path in [*sorted((repo / "scripts").glob("*.sh")), repo / "Makefile", repo / ".ci" / "run"]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not inline.search(line.split(" #")[0]), f"{path.relative_to(repo)}:{number}: {line.strip()}"
