"""Documented commands cannot drift: every imgsim / mlflow run / make / helm line in the README and docs/ parses
against today's CLI, entry points, Makefile and chart; a misspelt one fails naming its file and line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from imgsim.bundle import ServingBundle
from imgsim.fashion_mnist import CLASSES, PARTS, find_source, prepare, read_idx
from imgsim.runs.main import run_main
from imgsim.split import SplitConfig
from imgsim.stages.settings import ExtractConfig, TrainConfig
from tests import doc_commands
from tests.conftest import colour_folder, mlflow_store
from tests.doc_commands import REPO, Command, check, commands, runnable_blocks

DOCUMENTED = [c for path in doc_commands.documents() for c in commands(path.read_text(), str(path.relative_to(REPO)))]
CHECKED = ("imgsim", "mlflow", "make", "helm")


def test_the_docs_show_commands_of_every_kind_checked():
    # A parser that found nothing would pass every check below: make sure it reads what is there.
    programs = {c.words[0] for c in DOCUMENTED}
    assert set(CHECKED) <= programs, programs
    assert any(c.words[:2] == ("mlflow", "run") for c in DOCUMENTED)
    assert any(c.file == "README.md" and c.words[:2] == ("make", "demo") for c in DOCUMENTED)
    # train, serve, sharded extraction and multi-node training releases, each rendered by the real Helm engine
    assert len([c for c in DOCUMENTED if c.words[:2] == ("helm", "install") and "charts/imgsim" in c.words]) >= 4


@pytest.mark.parametrize("command", [c for c in DOCUMENTED if c.words[0] in CHECKED], ids=str)
def test_documented_command_parses(command):
    assert check(command) is None, check(command)


@pytest.mark.parametrize("line, expected", [
    ("imgsim main --epochz 3", "unrecognized arguments: --epochz 3"),
    ("imgsim main --epoch 3", "unrecognized arguments: --epoch 3"),  # no prefix matching of --epochs
    ("imgsim serach --bundle x q.png", "invalid choice: 'serach'"),
    ("mlflow run . -e mian --env-manager local", "unknown entry point 'mian'"),
    ("mlflow run . -e main --env-manager local -P data_dri=my-images", "-P data_dri"),
    ("mlflow run . -e main --env-manger local", "No such option"),
    ("make dmeo", "no target dmeo"),
    ("helm install sim charts/imgsim -n imgsim --set replicsa=2", "does not render"),
])
def test_a_misspelt_command_is_named_with_its_file_and_line(line, expected):
    text = f"# Title\n\nSome prose.\n\n```bash\nmake setup\n{line}   # a comment\n```\n"
    found = commands(text, "docs/example.md")
    assert [str(c).split(":")[:2] for c in found] == [["docs/example.md", "6"], ["docs/example.md", "7"]]
    assert check(found[0]) is None
    problem = check(found[1])
    assert problem is not None and problem.startswith("docs/example.md:7: ") and expected in problem, problem


def test_continuations_operators_placeholders_and_non_shell_blocks():
    text = ("```bash\nmlflow run . -e main --env-manager local \\\n  -P data_dir=my-images -P epochs=2 && "
            "make demo\nimgsim export --run <extract run id> --out b > log 2>&1\n"
            "FOO=1 .venv/bin/imgsim query \"$(imgsim pick-image --result r.json)\" --url http://127.0.0.1:9000\n```\n"
            "```text\nimgsim --no-such-flag (not a shell block)\n```\n")
    found = commands(text, "x.md")
    assert [(c.line, c.words[:2]) for c in found] == [(2, ("mlflow", "run")), (2, ("make", "demo")),
                                                     (4, ("imgsim", "export")), (5, ("imgsim", "query"))]
    assert found[2].words == ("imgsim", "export", "--run", "1", "--out", "b")
    assert all(check(c) is None for c in found)


def test_entry_points_map_to_the_cli_commands_their_scripts_run():
    assert doc_commands.entry_point_commands() == {
        "split": ["split"], "train": ["train"], "extract": ["extract"], "main": ["main"],
        "gallery_add": ["gallery", "add"], "gallery_remove": ["gallery", "remove"]}


def test_command_str_names_file_and_line():
    assert str(Command("README.md", 3, ("make", "demo"))) == "README.md:3: make demo"


# --- blocks a user pastes, run as written in a scratch copy of the project (links to this checkout) ---

PROJECT_FILES = ("Makefile", "scripts", "MLproject", "pipelines", "python_env.yaml", "requirements.txt",
                 "requirements-dev.txt", "constraints.txt", "pyproject.toml", ".venv-k8s", "requirements-serve-v2.txt",
                 "constraints-serve-v2.txt", ".venv-serve-v2", "requirements-serve.txt", "constraints-serve.txt",
                 ".venv-serve", "requirements-v2-client.txt", "constraints-v2-client.txt", ".venv-v2-client")


def _project(tmp_path: Path) -> Path:
    """A folder that looks like a fresh checkout after `make setup`: the block's `make setup` finds the
    environment installed (this one, by checksum) and `mlflow run .` finds the MLproject and pipelines."""
    project = tmp_path / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        (project / name).symlink_to(REPO / name)
    (project / ".venv").symlink_to(sys.prefix)
    return project


def _run_block(name: str, project: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUAL_ENV"))}
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", runnable_blocks()[name]], cwd=project, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"the {name!r} block failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_every_tested_block_is_run_by_a_test():
    assert set(runnable_blocks()) == {"own-images", "gallery-changes", "compact-grpc-client"}


@pytest.mark.slow
def test_readme_own_images_quick_start_runs_as_written(tmp_path):
    project = _project(tmp_path)
    colour_folder(project / "my-images")  # colour images in class folders: the pretrained route, no settings
    _run_block("own-images", project, timeout=1200)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = {r.data.tags.get("imgsim.stage"): r for r in client.search_runs(experiments)}
    assert {"main", "split", "train", "extract"} <= set(runs)
    assert all(run.info.status == "FINISHED" for run in runs.values())
    assert runs["split"].data.params["data_dir"] == "my-images"
    train = runs["train"].data.params
    assert (train["backbone"], train["weights"], train["mode"]) == ("efficientnet_lite0", "DEFAULT", "head")
    assert runs["extract"].data.metrics["gallery_size"] > 0 and "map_at_r" in runs["extract"].data.metrics
    assert str(client.get_model_version_by_alias("imgsim-gallery", "serving").version) == "1"


BAGS = (18, 30, 69)  # the t10k images the block adds: held out of the gallery it starts from


@pytest.mark.slow
def test_gallery_changes_block_runs_as_written(tmp_path):
    project = _project(tmp_path)
    root = prepare(project / "data" / "fashion-mnist", per_class=6)
    for i in BAGS:
        (root / "bag" / f"t10k-{i:05d}.png").unlink(missing_ok=True)
    with mlflow_store(project):  # what `make demo` leaves, in small: a gallery registered as imgsim-gallery@serving
        run_main(SplitConfig(data_dir="data/fashion-mnist"),
                 TrainConfig(epochs=1, widths=(8, 16), depths=(1, 1), embedding_dim=16, image_size=28,
                             checkpoint_dir=str(tmp_path / "ckpt")),
                 ExtractConfig(n_trees=5, plot_points=40))
    source = find_source(None)
    images, labels = (read_idx(next(source.glob(f"{name}*"))) for name in PARTS["t10k"])
    for i in BAGS:
        assert CLASSES[labels[i]] == "bag"
        Image.fromarray(images[i], mode="L").save(root / "bag" / f"t10k-{i:05d}.png")
    out = _run_block("gallery-changes", project, timeout=1200)
    assert "exact copy" in out.stderr  # the repeated add: both skipped, reported
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    # extract's version 1, then add, remove, and the two entry points; the repeated add made none
    assert str(client.get_model_version_by_alias("imgsim-gallery", "serving").version) == "5"
    assert (project / "demo-out" / "duplicates-sandal" / "duplicates.csv").is_file()
    assert (project / "demo-out" / "duplicates-gallery" / "duplicates.csv").is_file()
    current = ServingBundle.load(project / "bundles" / "current")  # the changes of version 5 over 1, with it
    items = {item.path for item in current.index.items}
    assert "bag/t10k-00018.png" in items and "bag/t10k-00069.png" in items and "bag/t10k-00030.png" not in items
    assert current.base.uri == "models:/imgsim-gallery/1" and current.changes.removed.size == 2


def test_the_settings_tables_are_generated_from_the_declarations():
    from imgsim.cli import settings_doc

    page = settings_doc.PAGE.read_text()
    assert settings_doc.render(page) == page, "docs/settings.md is stale: python -m imgsim.cli.settings_doc --write"
    stale = page.replace("| `epochs` | `auto` |", "| `epochs` | `0` |")
    assert stale != page and settings_doc.render(stale) == page
