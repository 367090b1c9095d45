"""What a server process does for its own hygiene: memory back to the OS, logging kept on, its downloads
deleted however it ends, and SIGHUP handling."""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

_START_LEVEL = logging.getLogger().getEffectiveLevel()  # Seldon sets it from LOG_LEVEL before importing us


def return_large_buffers_to_the_os(threshold: int = 1 << 20) -> None:
    """Serve allocations of ``threshold`` bytes or more (decoded images) from mmap, so each goes back to the OS
    when freed. glibc otherwise raises its mmap threshold after the first large free (up to 32 MB) and keeps
    later image buffers in its heaps: with one decode at a time per worker, the hostile mix peaked ~100 MB
    higher that way (bench/hostile_memory.py). An explicit MALLOC_MMAP_THRESHOLD_ in the environment wins."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(ctypes.c_int(-3), ctypes.c_int(threshold))  # M_MMAP_THRESHOLD; fixed, not adaptive
    except (OSError, AttributeError):  # not glibc: its allocator decides
        pass


def keep_logging() -> None:
    """Opening MLflow's sqlite store runs alembic's logging set-up, which disables every logger that exists by
    then (this module's included) and raises the root level to WARNING: the server would go silent about loads
    and switches. Ours are turned back on, at the level the server started with."""
    for name in [n for n in logging.root.manager.loggerDict if n == "imgsim" or n.startswith("imgsim.")]:
        logging.getLogger(name).disabled = False
    if logging.getLogger("imgsim").level == logging.NOTSET:
        logging.getLogger("imgsim").setLevel(_START_LEVEL)


DOWNLOADS = "imgsim-serving"  # under the temp dir: one <pid>-<random> folder per bundle a server process holds


def new_download_dir() -> Path:
    """A fresh folder for one registry download by this process. Folders left by server processes that are gone
    are deleted first: a gRPC worker ends on SIGTERM without running any cleanup, and a server that follows a
    living gallery downloads every version, so leftovers would otherwise fill the disk over restarts."""
    root = _downloads_root()
    root.mkdir(exist_ok=True)
    for folder in root.iterdir():
        match = re.fullmatch(r"(\d+)-.+", folder.name)
        if match and not _alive(int(match[1])):
            shutil.rmtree(folder, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))


def _downloads_root() -> Path:
    return Path(tempfile.gettempdir()) / DOWNLOADS  # read at each call: TMPDIR may differ per process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True


@atexit.register
def _remove_own_downloads() -> None:
    """A process that exits normally (a gunicorn worker on SIGTERM) deletes its downloads; forked workers share
    this hook and each deletes only the folders named by its own pid."""
    for folder in _downloads_root().glob(f"{os.getpid()}-*"):
        shutil.rmtree(folder, ignore_errors=True)


def remove_downloads_on_sigterm() -> None:
    """A process that SIGTERM would end on the spot (Seldon's gRPC worker: gunicorn's handle it and exit
    normally) deletes its downloads first, then ends as the signal's default action would."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return

    def handler(signum, frame) -> None:
        _remove_own_downloads()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, handler)


def on_sighup(handler) -> None:
    """Run ``handler`` on SIGHUP in this process (each gunicorn and gRPC worker calls load() in its main
    thread). Elsewhere (load() from another thread, or no SIGHUP on the platform) polling alone follows."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
        return
    signal.signal(signal.SIGHUP, lambda signum, frame: handler())


CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def memory_limit() -> int | None:
    """This container's memory limit in bytes (cgroup v2, else v1), or None when it has none."""
    for path in CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 writes "no limit" as a number near 2**63
            return int(text)
    return None
