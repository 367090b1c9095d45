"""Atomic file and directory writes, so an interrupted run leaves the last good state."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

# mkstemp/mkdtemp create 0600 files and 0700 folders; a renamed result should have the permissions a plain
# open()/mkdir() would give, or a server running as another user (uid 8888 on a PVC) cannot read the bundle.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``path`` only if the block succeeds.

    The swap is one ``renameat2(RENAME_EXCHANGE)``: ``path`` is never missing, and concurrent writers each
    exchange their own uniquely named folder in (the last one wins, complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, DIR_MODE)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap this holds the previous contents


class FolderReplaced(OSError):
    """A folder was replaced by :func:`atomic_dir` while it was being read: read it again."""


@contextlib.contextmanager
def pinned_dir(path: str | Path) -> Iterator[Path]:
    """``path`` opened once: everything read through the yielded path comes from that one version of the folder.

    A replaced version is deleted by its replacer, possibly while still being read; so on leaving, the folder
    must still be the one at ``path``, else ``FolderReplaced`` is raised (whatever the block raised meanwhile)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # Linux resolves /proc/self/fd/N to the opened folder itself, wherever its name now points.
        pinned = Path(f"/proc/self/fd/{fd}")
        try:
            yield pinned if pinned.is_dir() else Path(path)
        except Exception:
            _check_current(fd, path)
            raise
        _check_current(fd, path)
    finally:
        os.close(fd)


def _check_current(fd: int, path: str | Path) -> None:
    # Replacement only ever moves a version away from ``path``, never back: still there at the end means
    # nothing replaced it (nor deleted any of its files) during the read.
    held = os.fstat(fd)
    try:
        now = os.stat(path)
    except FileNotFoundError:
        now = None
    if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
        raise FolderReplaced(errno.ESTALE, "replaced while being read; read it again", str(path))


def replace_dir(new: Path, path: Path) -> None:
    """Put folder ``new`` at ``path``; whatever was at ``path`` ends up at ``new`` (the caller deletes it)."""
    while True:
        try:
            os.rename(new, path)  # no folder there yet (or an empty one): a plain rename is atomic
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
        try:
            _exchange(new, path)
            return
        except FileNotFoundError:
            continue  # someone removed ``path`` between the two calls: rename again


def _exchange(a: Path, b: Path) -> None:
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # EINVAL: the filesystem cannot exchange
            raise OSError(err, os.strerror(err), str(b))
    # No atomic exchange here (not Linux, or a filesystem without it): move the old folder to a unique name
    # first. ``b`` is missing for a moment in between; readers retry, and no two writers share the name.
    backup = Path(tempfile.mkdtemp(prefix=f".{b.name}.", suffix=".old", dir=b.parent))
    os.replace(b, backup / "old")
    os.replace(a, b)
    os.replace(backup / "old", a)
    backup.rmdir()


def _load_renameat2():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):  # no glibc 2.28+ (musl, macOS)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_renameat2 = _load_renameat2()
