"""Which files below an image folder count: split's rules, shared by every command that reads a folder."""

from __future__ import annotations

import os
from pathlib import Path

from imgsim.manifest import Rejected


def walk_files(root: Path, top: Path, label: str) -> tuple[list[tuple[str, str]], list[Rejected]]:
    """Every visible file below ``top``; symlinks out of ``root``, symlinked folders and non-files rejected."""
    found: list[tuple[str, str]] = []
    rejected: list[Rejected] = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in [d for d in dirnames if (here / d).is_symlink()]:
            rejected.append(Rejected(str((here / d).relative_to(root)), "symlinked folder: not followed"))
            dirnames.remove(d)
        for name in sorted(f for f in filenames if not f.startswith(".")):
            path = here / name
            rel = str(path.relative_to(root))
            if path.is_symlink() and not _inside(path.resolve(), root):
                rejected.append(Rejected(rel, "symlink pointing outside the image folder: not followed"))
            elif not path.is_file():
                rejected.append(Rejected(rel, "not a regular file (broken link, device or pipe)"))
            else:
                found.append((rel, label))
    return found, rejected


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
