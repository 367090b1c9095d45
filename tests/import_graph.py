"""imgsim's import graph from the source (AST): which module imports which, at import time, inside a function or
for type annotations only (under ``if TYPE_CHECKING:``)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "imgsim"


@dataclasses.dataclass(frozen=True)
class Import:
    importer: str  # imgsim.serve.service
    imported: str  # imgsim.serve.search, torch, mlflow.tracking
    line: int
    at_import_time: bool  # False: inside a function (runs when called) or for annotations only
    type_only: bool = False  # under `if TYPE_CHECKING:`: never run, but the modules still depend on each other


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def imports(package: Path = PACKAGE) -> list[Import]:
    known = modules(package)
    found: list[Import] = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        _walk(tree, name, path.name == "__init__.py", known, True, False, found)
    return found


def _walk(node: ast.AST, name: str, is_package: bool, known: dict[str, Path], top: bool, typing: bool,
          found: list[Import]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            # Annotations only: never imported at run time, yet a dependency all the same.
            _walk(ast.Module(body=child.body, type_ignores=[]), name, is_package, known, False, True, found)
            _walk(ast.Module(body=child.orelse, type_ignores=[]), name, is_package, known, top, typing, found)
            continue
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            _walk(child, name, is_package, known, False, typing, found)
            continue
        if isinstance(child, ast.Import):
            found += [Import(name, a.name, child.lineno, top, typing) for a in child.names]
        elif isinstance(child, ast.ImportFrom):
            base = _resolve(child, name, is_package)
            for a in child.names:  # `from imgsim import tracking` imports the module imgsim.tracking
                target = f"{base}.{a.name}"
                found.append(Import(name, target if target in known else base, child.lineno, top, typing))
        _walk(child, name, is_package, known, top, typing, found)


def _resolve(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(parts + ([node.module] if node.module else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
