"""The import rules of docs/architecture.md, checked on the source: layers, the serving boundary, no cycles."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from support.servers import SERVE_VENV, venv_bin
from tests.import_graph import PACKAGE, Import, imports, modules

# Lowest first. A module may import, when it is imported, only from its own layer or a lower one.
LAYERS = ("core", "serve", "nn", "stages", "runs", "explore", "cli")
HEAVY = {"torch": "nn", "torchvision": "nn", "mlflow": "runs"}  # the lowest layer that may import each at import time
# Imports that reach up a layer, or to torch / MLflow, inside a function: each is a deliberate, lazy door.
LAZY_DOORS = {
    ("imgsim.bundle", "imgsim.nn.onnx_export"): "writing a bundle exports the torch model to ONNX",
    ("imgsim.bundle", "imgsim.nn.embed"): "writing a bundle embeds its probe images with the torch model",
    ("imgsim.bundle", "imgsim.nn.model"): "runtime=torch serves the PyTorch weights",
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
            when = "at import time" if imp.at_import_time else "inside a function, with no reason on record"
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
            "imgsim.explore.gallery", "imgsim.bundle"} <= set(modules())


def test_no_module_imports_a_higher_layer_or_a_heavy_library_out_of_place():
    assert violations(imports()) == []


def test_no_import_cycles_not_even_through_imports_inside_functions():
    found = imports()
    assert cycles(found) == []
    assert cycles([Import(i.importer, i.imported, i.line, True) for i in found]) == []  # split <-> dedup was one


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
