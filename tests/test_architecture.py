"""The import rules of docs/architecture.md, checked on the source: layers, the serving boundary, no cycles."""

from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

import pytest

from support.servers import SERVE_VENV, venv_bin
from tests.import_graph import PACKAGE, Import, imports, modules

# Lowest first. A module may import, when it is imported, only from its own layer or a lower one.
LAYERS = ("core", "serve", "nn", "stages", "runs", "explore", "cli")
HEAVY = {"torch": "nn", "torchvision": "nn", "mlflow": "runs"}  # the lowest layer that may import each at import time
# Imports that reach up a layer, or to torch / MLflow, inside a function (or for annotations only): each is a
# deliberate, lazy door. Writing a bundle is a stage's (imgsim.stages.bundle_writer), which may use nn/ itself.
LAZY_DOORS = {
    ("imgsim.bundle", "imgsim.nn.embed"): "runtime=torch embeds the probes and queries with the PyTorch model",
    ("imgsim.bundle", "imgsim.nn.model"): "runtime=torch serves the PyTorch weights (ServingBundle.torch_model)",
    ("imgsim.bundle", "torch"): "runtime=torch serves the PyTorch weights",
    ("imgsim.bundle", "imgsim.serve.runtime"): "a bundle opens its ONNX Runtime engine when loaded",
    ("imgsim.serve.service", "imgsim.runs.tracking"): "a models:/ or runs:/ URI is fetched with mlflow-skinny",
    ("imgsim.serve.service", "imgsim.runs.export"): "a models:/ or runs:/ URI is fetched with mlflow-skinny",
    ("imgsim.serve.service", "mlflow"): "a models:/ or runs:/ URI is fetched with mlflow-skinny",
    ("imgsim.nn.weights", "imgsim.runs.tracking"): "weights=runs:/... or models:/... are fetched from MLflow",
    ("imgsim.fashion_mnist", "torchvision.datasets"): "the default dataset's download when no local copy exists",
}
# The serving image: these import with torch, torchvision and the full MLflow absent.
SERVING = ("core", "serve")
# A module past this many lines holds more than one idea (docs/architecture.md).
MAX_LINES = 350


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "core"  # the package itself
    if len(parts) == 2:
        return "cli" if parts[1] == "cli" else "core" if parts[1] not in LAYERS else parts[1]
    return parts[1]


def rank(module: str) -> int:
    return LAYERS.index(layer(module))


def target_rank(imp: Import) -> int | None:
    """The layer rank of what is imported: imgsim modules by layer, torch/MLflow by HEAVY, others None."""
    if imp.imported == "imgsim" or imp.imported.startswith("imgsim."):
        return rank(imp.imported)
    top = imp.imported.split(".")[0]
    return LAYERS.index(HEAVY[top]) if top in HEAVY else None


def violations(found: list[Import]) -> list[str]:
    problems = []
    for imp in found:
        target = target_rank(imp)
        if target is None or target <= rank(imp.importer):
            continue
        door = LAZY_DOORS.get((imp.importer, imp.imported))
        if imp.at_import_time or door is None:
            when = "at import time" if imp.at_import_time else \
                f"{'for annotations only' if imp.type_only else 'inside a function'}, with no reason on record"
            problems.append(f"{imp.importer} ({layer(imp.importer)}) imports {imp.imported} {when} "
                            f"(line {imp.line}); see docs/architecture.md")
    return problems


def cycles(found: list[Import], package: Path = PACKAGE) -> list[list[str]]:
    """Strongly connected groups of more than one module over import-time edges (Tarjan)."""
    graph: dict[str, set[str]] = {m: set() for m in modules(package)}
    for imp in found:
        if imp.at_import_time and imp.imported in graph and imp.imported != imp.importer:
            graph[imp.importer].add(imp.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_every_module_belongs_to_a_layer():
    assert {layer(m) for m in modules()} <= set(LAYERS)
    assert {"imgsim.serve.service", "imgsim.nn.model", "imgsim.stages.train", "imgsim.runs.tracking",
            "imgsim.explore.gallery", "imgsim.bundle", "imgsim.bundle_format", "imgsim.bundle_base",
            "imgsim.stages.bundle_writer", "imgsim.stages.sharding"} <= set(modules())


def test_no_module_imports_a_higher_layer_or_a_heavy_library_out_of_place():
    assert violations(imports()) == []


def every_edge(found: list[Import]) -> list[Import]:
    """Every import as a dependency: at import time, inside a function, or for annotations only."""
    return [Import(i.importer, i.imported, i.line, True) for i in found]


def test_no_import_cycles_not_even_through_imports_inside_functions_or_for_annotations():
    found = imports()
    assert any(i.type_only for i in found)  # the annotations-only imports are in the graph this checks
    assert cycles(found) == []
    assert cycles(every_edge(found)) == []  # split <-> dedup was one, and index <-> changes (for annotations)


def long_modules(package: Path = PACKAGE) -> dict[str, int]:
    """Modules over MAX_LINES lines, with their length."""
    return {m: n for m, p in modules(package).items() if (n := len(p.read_text().splitlines())) > MAX_LINES}


def test_no_module_is_longer_than_its_one_idea():
    assert long_modules() == {}, f"over {MAX_LINES} lines: cut each along its ideas"


def test_stages_and_networks_never_touch_mlflow():
    # Stages are plain functions on artifacts; what is tracked, and how, is runs/' business.
    bad = [f"{i.importer} -> {i.imported} (line {i.line})" for i in imports()
           if layer(i.importer) in ("nn", "stages") and (i.imported.split(".")[0] == "mlflow")]
    assert bad == []


def test_every_lazy_door_is_still_used():
    used = {(i.importer, i.imported) for i in imports() if not i.at_import_time}
    assert set(LAZY_DOORS) <= used, set(LAZY_DOORS) - used  # a door no one uses any more is taken off the list


def test_the_rules_catch_a_planted_import(tmp_path):
    # A copy of the package with `import torch` planted at the top of the server, and an upward import in
    # the core: both are named, and the copy's own cycles are found.
    import shutil

    copy = tmp_path / "imgsim"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    service = copy / "serve" / "service.py"
    service.write_text(service.read_text().replace("import numpy as np\n", "import numpy as np\nimport torch\n", 1))
    index = copy / "index.py"
    index.write_text(index.read_text().replace("from imgsim import atomic\n",
                                               "from imgsim import atomic\nfrom imgsim.serve import search\n", 1))
    found = imports(copy)
    problems = violations(found)
    assert any(p.startswith("imgsim.serve.service (serve) imports torch at import time") for p in problems)
    assert any(p.startswith("imgsim.index (core) imports imgsim.serve.search at import time") for p in problems)
    assert any("imgsim.index" in g and "imgsim.serve.search" in g for g in cycles(found, copy))


def test_the_rules_catch_a_planted_annotation_only_cycle_and_a_long_module(tmp_path):
    # The index naming the changes in an annotation (as it once did) closes a cycle that never runs, yet ties
    # the two modules together; and a module grown past MAX_LINES is named.
    import shutil

    copy = tmp_path / "imgsim"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    index = copy / "index.py"
    index.write_text(index.read_text().replace(
        "from imgsim import atomic\n",
        "from typing import TYPE_CHECKING\n\nfrom imgsim import atomic\n\nif TYPE_CHECKING:\n"
        "    from imgsim.changes import Changes\n", 1))
    found = imports(copy)
    planted = [i for i in found if (i.importer, i.imported) == ("imgsim.index", "imgsim.changes")]
    assert planted and all(i.type_only and not i.at_import_time for i in planted)
    assert cycles(found, copy) == []  # nothing runs it at import time...
    assert any({"imgsim.index", "imgsim.changes"} <= set(g) for g in cycles(every_edge(found), copy))  # ...still a cycle
    assert long_modules(copy) == {}
    errors = copy / "errors.py"
    errors.write_text(errors.read_text() + "# ...\n" * MAX_LINES)
    assert list(long_modules(copy)) == ["imgsim.errors"]


BLOCKER = textwrap.dedent("""
    import importlib, importlib.abc, pkgutil, sys
    class Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "mlflow"):
                raise ImportError(f"{name} is not in the serving image")
    sys.meta_path.insert(0, Absent())
    import imgsim
    failed = []
    for m in sorted(sys.argv[1:]):
        try:
            importlib.import_module(m)
        except ImportError as exc:
            failed.append(f"{m}: {exc}")
    print("\\n".join(failed))
    sys.exit(1 if failed else 0)
""")


# Imports seldon-core, which lives only in the Seldon wrapper's environment: checked there, with the wrapper classes.
SELDON_ONLY = ("imgsim.serve.seldon",)
WRAPPERS = ("ModelServer", "Embedder", "IndexShard", "ShardMerger")  # model_server/*.py


def serving_modules() -> list[str]:
    return [m for m in modules() if layer(m) in SERVING and m not in SELDON_ONLY]


def test_the_serving_side_imports_without_torch_or_mlflow():
    names = serving_modules()
    assert "imgsim.serve.service" in names and "imgsim.bundle" in names and "imgsim.nn.model" not in names
    out = subprocess.run([sys.executable, "-c", BLOCKER, *names], capture_output=True, text=True,
                         cwd=PACKAGE.parent, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_seldon_wrappers_import_in_their_own_environment_without_torch_or_mlflow():
    # What the serve image runs: seldon-core 1.19 on Python 3.12, its own pins, no torch and no full MLflow.
    out = subprocess.run([str(venv_bin(SERVE_VENV, "python")), "-c", BLOCKER, *WRAPPERS, *SELDON_ONLY],
                         capture_output=True, text=True, cwd=PACKAGE.parent / "model_server",
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PACKAGE.parent)}, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_command_line_and_the_stage_settings_start_without_torch_or_mlflow():
    # `imgsim --help` and `imgsim ui` (the page's process) load neither; a stage loads them when it runs.
    out = subprocess.run([sys.executable, "-c", BLOCKER, "imgsim.cli", "imgsim.stages.settings"], capture_output=True,
                         text=True, cwd=PACKAGE.parent, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("planted", ["import torch", "import mlflow"])
def test_the_import_check_fails_on_a_planted_import(tmp_path, planted):
    import shutil

    shutil.copytree(PACKAGE, tmp_path / "imgsim", ignore=shutil.ignore_patterns("__pycache__"))
    service = tmp_path / "imgsim" / "serve" / "service.py"
    service.write_text(service.read_text().replace("import numpy as np\n", f"import numpy as np\n{planted}\n", 1))
    out = subprocess.run([sys.executable, "-c", BLOCKER, *serving_modules()], capture_output=True, text=True,
                         cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}, timeout=300)
    assert out.returncode == 1 and f"imgsim.serve.service: {planted.split()[1]} is not in the serving image" in out.stdout


def test_benchmarks_do_not_import_tests():
    bench = Path(PACKAGE.parent / "bench")
    offenders = [f"{p.name}:{n}" for p in sorted(bench.glob("*.py"))
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if line.lstrip().startswith(("from tests", "import tests"))]
    assert offenders == []


# Settings as given (None: auto) are read where they are resolved, and by the entry points that pass them there;
# every stage and network reads the resolved TrainPlan (imgsim.stages.plan).
GIVEN_SETTINGS_READERS = {
    "imgsim.stages.settings": "declares them",
    "imgsim.stages.plan": "resolves every auto setting, once",
    "imgsim.stages.train": "train_model plans settings it is given as they are (benches and tests)",
    "imgsim.runs.train": "plans them once and logs the plan",
    "imgsim.runs.main": "passes them to the train run",
    "imgsim.cli": "parses them from flags and YAML",
    "imgsim.cli.settings_doc": "documents their declarations",
}


def settings_readers(package: Path = PACKAGE) -> set[str]:
    """Modules that import ``TrainConfig`` by name."""
    found = set()
    for name, path in modules(package).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and any(a.name == "TrainConfig" for a in node.names):
                found.add(name)
    return found | ({"imgsim.stages.settings"} if "imgsim.stages.settings" in modules(package) else set())


def test_auto_settings_are_resolved_in_one_place_and_read_from_the_plan():
    assert settings_readers() <= set(GIVEN_SETTINGS_READERS), settings_readers() - set(GIVEN_SETTINGS_READERS)


def test_the_settings_rule_catches_a_stage_that_reads_the_given_settings(tmp_path):
    import shutil

    copy = tmp_path / "imgsim"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    head = copy / "stages" / "head.py"
    head.write_text(head.read_text().replace("from imgsim.stages.plan import TrainPlan\n",
                                             "from imgsim.stages.plan import TrainPlan\n"
                                             "from imgsim.stages.settings import TrainConfig\n", 1))
    assert "imgsim.stages.head" in settings_readers(copy) - set(GIVEN_SETTINGS_READERS)


# Figures go stale with every bench run, so they live in docs/benchmarks.md; a comment may link a section.
MEASUREMENT = re.compile(r"(\d[\d.,]*\s*(ms|MB|GB|MiB|GiB|kB|rps|img/s|images/s|s\b|x (faster|slower))"
                         r"|(P@1|mAP@R|recall@\d+)[^.;]{0,12}\d\.\d)")


def measured_comments(package: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if token.type == tokenize.COMMENT and MEASUREMENT.search(token.string):
                found.append(f"{path.relative_to(package.parent)}:{token.start[0]}: {token.string[:100]}")
    return found


def test_comments_say_why_and_leave_the_figures_to_the_benchmarks_page(tmp_path):
    assert measured_comments() == []
    planted = tmp_path / "imgsim" / "planted.py"
    planted.parent.mkdir()
    planted.write_text("# 20 trees reach recall@10 0.994 at 6.7x exact speed, 1.2 ms a query\nX = 1  # why, in a line\n")
    assert [c.split(": ", 1)[0] for c in measured_comments(planted.parent)] == ["imgsim/planted.py:1"]
