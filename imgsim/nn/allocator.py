"""Keep freed memory in the process: glibc's malloc returns large blocks to the kernel when they are freed and
maps them again on the next batch. On a 2-core CPU that page-faulting took as long as the network itself:
EfficientNet-Lite0's inference ran at 19.4 images/s with 11.0 s of system time against 7.6 s of user time for
192 images, and at 53.8 images/s (1.0 s system) with the thresholds raised (python -m bench.allocator,
bench/results/allocator.json)."""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
THRESHOLD = 1 << 30  # blocks up to this come from (and go back to) the heap; the process keeps its peak

_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process (training and embedding, never the server);
    False where there is no glibc (macOS, musl), which changes nothing but speed."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    _done = bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
    return _done
