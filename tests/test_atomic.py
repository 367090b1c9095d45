"""Atomic writes: all or nothing, with the permissions an ordinary write would give."""

from __future__ import annotations

import multiprocessing
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


def _write_versions(target: str, writer: int, count: int) -> None:
    for version in range(count):
        with atomic.atomic_dir(target) as folder:
            for part in range(5):
                (folder / f"part{part}").write_text(f"{writer}:{version}")
            (folder / "complete").write_text(f"{writer}:{version}")


def test_a_folder_is_replaced_whole_and_never_missing_with_two_concurrent_writers(tmp_path):
    target = tmp_path / "bundle"
    _write_versions(str(target), writer=0, count=1)
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_write_versions, args=(str(target), w, 150)) for w in (1, 2)]
    for p in writers:
        p.start()
    seen, torn, replaced = set(), [], 0
    while any(p.is_alive() for p in writers):
        # A reader pins the folder once and reads inside it, as the server's loader does: it must always find a
        # whole version, never a missing folder nor a mix of two writers' files. A version replaced (and so
        # deleted) while it is being read is reported, and the reader starts again, as the loader does.
        try:
            with atomic.pinned_dir(target) as folder:
                names = sorted(os.listdir(folder))
                values = {(folder / n).read_text() for n in names}
        except atomic.FolderReplaced:
            replaced += 1
            continue
        except FileNotFoundError:
            torn.append("missing")
            continue
        if names != ["complete", "part0", "part1", "part2", "part3", "part4"] or len(values) != 1:
            torn.append(f"{names} {values}")
        seen |= values
    assert [p.join() or p.exitcode for p in writers] == [0, 0]
    assert not torn, torn[:5]
    assert {v.split(":")[0] for v in seen} >= {"1", "2"}  # the writers really did interleave with the reader
    assert (target / "complete").read_text() in ("1:149", "2:149")
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no temporary or backup folder left behind


def test_the_fallback_without_an_atomic_exchange_still_replaces_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_renameat2", None)  # as on macOS or a filesystem without RENAME_EXCHANGE
    _write_versions(str(tmp_path / "bundle"), writer=0, count=3)
    assert (tmp_path / "bundle" / "complete").read_text() == "0:2" and len(list(tmp_path.iterdir())) == 1


def test_a_failed_folder_write_keeps_the_previous_folder(tmp_path):
    _write_versions(str(tmp_path / "bundle"), writer=0, count=1)
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(tmp_path / "bundle") as folder:
            (folder / "complete").write_text("half")
            raise RuntimeError("interrupted")
    assert (tmp_path / "bundle" / "complete").read_text() == "0:0" and len(list(tmp_path.iterdir())) == 1
