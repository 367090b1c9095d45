"""Atomic writes: all or nothing, with the permissions an ordinary write would give."""

from __future__ import annotations

import os
import stat

import pytest

from imgsim import atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_and_folders_get_ordinary_permissions_not_mkstemps(tmp_path):
    # mkstemp makes 0600 files: a bundle written that way is unreadable to the serving container's uid 8888.
    atomic.write_text(tmp_path / "a.json", "{}")
    with atomic.atomic_dir(tmp_path / "folder") as folder:
        (folder / "inside.txt").write_text("x")
    umask = os.umask(0)
    os.umask(umask)
    assert _mode(tmp_path / "a.json") == 0o666 & ~umask
    assert _mode(tmp_path / "folder") == 0o777 & ~umask


def test_a_failed_write_leaves_the_previous_file_and_no_temp(tmp_path):
    atomic.write_text(tmp_path / "a.txt", "good")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert (tmp_path / "a.txt").read_text() == "good" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
