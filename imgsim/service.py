"""Protocol-independent request handling for the similarity server: validate, decode, search, shape."""

from __future__ import annotations

import atexit
import base64
import binascii
import ctypes
import dataclasses
import hashlib
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from imgsim.bundle import BundleError
from imgsim.errors import BadInput, ImgsimError
from imgsim.search import QueryResult, Searcher

log = logging.getLogger(__name__)
_START_LEVEL = logging.getLogger().getEffectiveLevel()  # Seldon sets it from LOG_LEVEL before importing us


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """Server settings; each can come from a constructor parameter or an ``IMGSIM_*`` environment variable."""

    model_uri: str = "/mnt/models"
    default_k: int = 5
    max_k: int = 100
    gallery_root: str = ""
    max_image_bytes: int = 8 * 1024 * 1024
    max_request_bytes: int = 16 * 1024 * 1024
    max_batch: int = 32
    # Pixels one image may decode to (after JPEG draft scaling), far below split's 40 MP: a 12 MP image costs
    # at most ~100 MB while it is decoded and reduced, and JPEG photos of any size draft-decode below it.
    max_pixels: int = 12_000_000
    max_request_pixels: int = 48_000_000  # summed over a batch
    max_concurrent_decodes: int = 1  # per worker process: decoding is where a request's memory goes (~100 MB at 12 MP)
    search_k: int = 0  # 0: the search_k the bundle's index recall was measured with at extract
    runtime: str = "onnx"  # onnx: ONNX Runtime (the serving image has no torch); torch: the PyTorch weights
    threads: int = 1  # the runtime's threads per worker: several gunicorn workers must not oversubscribe the cores
    load_backoff_s: float = 1.0  # first wait before retrying a failed load; doubles up to the maximum
    load_backoff_max_s: float = 60.0
    # How often to look for a newer gallery: the version a models:/name@alias URI names, or a changed bundle.json
    # in a bundle folder (replaced by `imgsim export`). 0: only on SIGHUP.
    poll_interval_s: float = 30.0

    @classmethod
    def from_sources(cls, **params: Any) -> "ServiceConfig":
        """Constructor parameters win over ``IMGSIM_<NAME>`` environment variables, which win over defaults."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = params.get(field.name)
            if raw is None or raw == "":
                raw = os.environ.get(f"IMGSIM_{field.name.upper()}")
            if raw is None or raw == "":
                continue
            try:
                values[field.name] = type(field.default)(raw)
            except ValueError:
                raise ImgsimError(f"server setting {field.name}={raw!r} is not a valid {type(field.default).__name__}") from None
        unknown = set(params) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ImgsimError(f"unknown server parameter(s) {sorted(unknown)}; valid: {[f.name for f in dataclasses.fields(cls)]}")
        cfg = cls(**values)
        if not 1 <= cfg.default_k <= cfg.max_k:
            raise ImgsimError(f"need 1 <= default_k <= max_k, got default_k={cfg.default_k}, max_k={cfg.max_k}")
        return cfg


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


class Stats:
    """Thread-safe timers and counters, drained into Seldon's custom metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rejected = 0

    def reject(self) -> None:
        with self._lock:
            self._rejected += 1

    def drain_rejected(self) -> int:
        with self._lock:
            n, self._rejected = self._rejected, 0
            return n


class SimilarityService:
    """Holds the loaded bundle and answers parsed requests; no knowledge of HTTP or gRPC."""

    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        return_large_buffers_to_the_os()  # the server process and the workers it forks inherit this
        self.searcher: Searcher | None = None
        self.load_error: str | None = None
        self.load_failed_for_good = False
        self._last_failure = ""
        self.stats = Stats()
        self._decode_slots = threading.BoundedSemaphore(max(1, cfg.max_concurrent_decodes))
        self._refresh_lock = threading.Lock()
        self._loaded_key: str | None = None
        self._failed_key: str | None = None
        self._download: Path | None = None  # the temp folder the serving version was downloaded into, if any

    def load(self) -> None:
        """Load the bundle; if that fails for a reason that may pass (store unreachable, folder not there yet),
        keep retrying in the background with bounded backoff. Not ready until loaded; a bundle that is itself
        wrong (damaged, inconsistent, unknown format) is reported and not retried. Then follow the gallery:
        poll for a newer version every ``poll_interval_s`` and on SIGHUP."""
        if not self._try_load(1) and not self.load_failed_for_good:
            self._announce_retry(1, self.cfg.load_backoff_s)  # before the first health check can ask
            threading.Thread(target=self._retry, name="imgsim-load-retry", daemon=True).start()
        _on_sighup(lambda: threading.Thread(target=self.refresh, name="imgsim-refresh", daemon=True).start())
        _remove_downloads_on_sigterm()
        if self.cfg.poll_interval_s > 0:
            threading.Thread(target=self._poll, name="imgsim-poll", daemon=True).start()

    def _poll(self) -> None:
        while True:
            time.sleep(self.cfg.poll_interval_s)
            self.refresh()

    def refresh(self) -> bool:
        """Load the gallery's newest version if it differs from the one serving, then switch to it: requests
        already running finish on the version they started with. Returns whether it switched. A version
        that fails to load is logged and the current one keeps serving. A server whose first bundle was broken
        (not ready, not retried) recovers this way once the alias names a good version."""
        if not (self.ready or self.load_failed_for_good) or not self._refresh_lock.acquire(blocking=False):
            return False  # still loading (the retry thread owns that), or a refresh is already running
        try:
            current = self._source_key()
            if current is None or current in (self._loaded_key, self._failed_key):
                return False  # nothing new, or the same broken version as last time (logged then)
            old = self.searcher
            before = (old.version if old else "") or ("the previous bundle" if old else "no version")
            if not self._try_load(0, swap=True):
                self._failed_key = current
                log.error("imgsim: keeping %s after the failed switch", before)
                return False
            log.info("imgsim: switched from %s to %s", before, self.searcher.version or "the changed bundle")
            return True
        finally:
            self._refresh_lock.release()

    def _source_key(self) -> str | None:
        """What identifies the newest version at the source: the registry version an alias names now, or the
        bundle.json checksum of a bundle folder; None when the source cannot change (a pinned version, a run)."""
        from imgsim import tracking
        from imgsim.bundle import BUNDLE_JSON
        from imgsim.export import locate_bundle

        uri = self.cfg.model_uri
        try:
            if uri.startswith("models:/") and "@" in uri:
                return locate_bundle(uri)[1] or None
            folder = tracking.local_path(uri)
            if folder is not None:
                meta = folder / BUNDLE_JSON if (folder / BUNDLE_JSON).exists() else folder / "bundle" / BUNDLE_JSON
                return hashlib.sha256(meta.read_bytes()).hexdigest()
        except (ImgsimError, OSError) as exc:  # the store is unreachable for now: try again next time
            _keep_logging()
            log.warning("imgsim: cannot check for a newer gallery at %s: %s", uri, exc)
        return None

    def _retry(self) -> None:
        delay, attempt = self.cfg.load_backoff_s, 1
        while True:
            self._announce_retry(attempt, delay)
            time.sleep(delay)
            attempt += 1
            if self._try_load(attempt) or self.load_failed_for_good:
                return
            delay = min(delay * 2, self.cfg.load_backoff_max_s)

    def _announce_retry(self, attempt: int, delay: float) -> None:
        self.load_error = f"{self._last_failure} (attempt {attempt}; next try in {delay:g} s)"

    def _try_load(self, attempt: int, swap: bool = False) -> bool:
        """Load the bundle the URI names now. ``swap``: a refresh, where a failure leaves the serving version."""
        import mlflow

        from imgsim import tracking
        from imgsim.export import resolve_bundle

        key = version = None
        uri = self.cfg.model_uri
        download = None if tracking.local_path(uri) is not None else new_download_dir()
        try:
            if uri.startswith(("runs:", "models:")):
                # Read-only use of the registry: no experiment to create, nothing written to the (read-only) cwd.
                mlflow.set_tracking_uri(tracking.tracking_uri())
            # A bundle folder is identified by its bundle.json, read before the load so that a replacement during
            # it is seen by the next poll; a registry bundle by the version resolve_bundle pins.
            key = None if uri.startswith("models:/") else self._source_key()
            folder, version = resolve_bundle(uri, download)
            _keep_logging()
            searcher = Searcher(folder, search_k=self.cfg.search_k, runtime=self.cfg.runtime, threads=self.cfg.threads,
                                version=version)
        except Exception as exc:  # noqa: BLE001 - stay up and report not-ready rather than crash-loop the worker
            if download is not None:  # each retry downloads afresh: a failed one must not pile up on disk
                shutil.rmtree(download, ignore_errors=True)
            reason, permanent, trace = _load_failure(exc, uri)
            if swap:
                return self._refresh_failed(reason)
            if permanent:  # a newer version may still come: refresh() tries it
                self.load_failed_for_good, self._failed_key = True, version or key
                reason += " (not retried: loading this bundle again cannot succeed)"
            return self._failed(attempt, reason, trace)
        # One assignment switches versions: each request holds the searcher it started with until it answers.
        previous = self._download
        self.searcher, self.load_error, self.load_failed_for_good = searcher, None, False
        self._loaded_key = version or key
        self._download = download
        if previous is not None:
            # The old version's files are memory-mapped by requests that may still run: unlinking keeps the
            # mappings valid (Linux frees the pages with the last one) and the disk space comes back.
            shutil.rmtree(previous, ignore_errors=True)
        log.info("imgsim: loaded %d gallery items%s from %s, model on %s (%s)", searcher.size,
                 f" (version {version})" if version else "", uri,
                 "ONNX Runtime" if self.cfg.runtime == "onnx" else "PyTorch",
                 "refresh" if swap else f"attempt {attempt}")
        return True

    def _refresh_failed(self, reason: str) -> bool:
        log.error("imgsim: a newer gallery was found but cannot be loaded: %s", reason)
        return False

    def _failed(self, attempt: int, reason: str, trace: bool = False) -> bool:
        self.searcher, self.load_error, self._last_failure = None, reason, reason
        log.error("imgsim: NOT READY: load attempt %d failed: %s", attempt, reason, exc_info=trace)
        return False

    @property
    def ready(self) -> bool:
        return self.searcher is not None

    def versions(self) -> dict[str, str]:
        """Model and gallery identity of the version serving now, for health and metadata."""
        searcher = self.searcher
        return searcher.bundle.identity() if searcher else {}

    def handle(self, json_data: Any, bin_data: bytes | None, tags: dict) -> tuple[dict, dict[str, float]]:
        """Answer one request; returns (answer, timings in ms). Raises ``BadInput`` for client errors."""
        searcher = self.searcher  # this request's gallery version, even if a refresh switches meanwhile
        if not searcher:
            raise ImgsimError(f"not ready: {self.load_error or 'still loading'}")
        timings: dict[str, float] = {}
        started = time.perf_counter()
        k = self._k(json_data.get("k") if isinstance(json_data, dict) else None, tags.get("k"), searcher.size)
        if bin_data is not None:
            payloads: Iterable[bytes] = [bin_data]
        elif isinstance(json_data, dict):
            forms = [key for key in ("image", "images", "path", "id") if key in json_data]
            if len(forms) != 1:
                raise BadInput("jsonData needs exactly one of 'image' (base64), 'images' (list of base64), 'path' or 'id'")
            if forms == ["id"]:
                return make_answer(searcher, [searcher.search_id(_integer(json_data["id"], "id"), k)]), timings
            payloads = self._json_payloads(json_data, forms[0])
        else:
            raise BadInput("send an image as binData, or jsonData with one of image, images, path or id")
        inputs = self._preprocess(payloads, searcher)
        timings["decode_ms"] = _ms_since(started)
        started = time.perf_counter()
        embeddings, probs = searcher.embed_inputs(inputs)
        timings["embed_ms"] = _ms_since(started)
        started = time.perf_counter()
        results = [searcher.rank(e, p, k) for e, p in zip(embeddings, probs)]
        timings["search_ms"] = _ms_since(started)
        return make_answer(searcher, results), timings

    def _json_payloads(self, data: dict, form: str) -> Iterable[bytes]:
        if form == "image":
            return [decode_base64(data["image"], "image")]
        if form == "path":
            return [self._read_gallery_file(data["path"])]
        batch = data["images"]
        if not isinstance(batch, list) or not batch:
            raise BadInput("'images' must be a non-empty list of base64 strings")
        if len(batch) > self.cfg.max_batch:
            raise BadInput(f"'images' has {len(batch)} entries; at most {self.cfg.max_batch} per request")
        return (decode_base64(b, f"images[{i}]") for i, b in enumerate(batch))  # one at a time

    def _preprocess(self, payloads: Iterable[bytes], searcher: Searcher) -> np.ndarray:
        """Decode each image straight to the model's input size, one at a time, so a request holds at most one
        full-size image (and a worker at most ``max_concurrent_decodes``), within a per-request pixel budget."""
        budget = _PixelBudget(self.cfg.max_request_pixels)
        arrays = []
        for data in payloads:
            if len(data) > self.cfg.max_image_bytes:
                raise BadInput(f"image is {len(data)} bytes; the limit is {self.cfg.max_image_bytes}")
            with self._decode_slots:
                arrays.append(searcher.preprocess.decode(data, max_pixels=self.cfg.max_pixels, admit=budget.take))
        return np.stack(arrays)

    def _read_gallery_file(self, path: Any) -> bytes:
        if not self.cfg.gallery_root:
            raise BadInput("path queries are disabled on this server (no gallery_root configured); send the image bytes")
        return read_gallery_file(self.cfg.gallery_root, path, self.cfg.max_image_bytes)

    def _k(self, from_json: Any, from_tags: Any, size: int) -> int:
        raw = from_json if from_json is not None else from_tags
        k = self.cfg.default_k if raw is None else _integer(raw, "k")
        if not 1 <= k <= self.cfg.max_k:
            raise BadInput(f"k must be between 1 and {self.cfg.max_k}, got {k}")
        return min(k, size)


def make_answer(searcher: Searcher, results: list[QueryResult]) -> dict:
    """The answer, naming the model and gallery version that produced it."""
    return {"results": [{"neighbours": [dataclasses.asdict(n) for n in r.neighbours],
                         "predicted": None if r.predicted_label is None else
                         {"label": r.predicted_label, "probability": r.probability}}
                        for r in results],
            **searcher.bundle.identity()}


def _load_failure(exc: Exception, uri: str) -> tuple[str, bool, bool]:
    """(what to report, whether loading again cannot help, whether the trace belongs in the log)."""
    if isinstance(exc, BundleError):  # damaged, inconsistent, unknown format
        return str(exc), True, False
    if isinstance(exc, ImgsimError):  # store unreachable, folder not there yet: may pass
        return str(exc), False, False
    if isinstance(exc, PermissionError):  # typically a bundle on a volume that this server's user may not read
        return (f"cannot read the bundle from {uri}: {exc}; this server runs as uid {os.getuid()}: make the "
                "bundle's files readable by it"), False, False
    if isinstance(exc, OSError):
        return f"cannot read the bundle from {uri}: {exc}", False, False
    return f"unexpected error while loading: {exc!r}", False, True


def _keep_logging() -> None:
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


def _remove_downloads_on_sigterm() -> None:
    """A process that SIGTERM would end on the spot (Seldon's gRPC worker: gunicorn's handle it and exit
    normally) deletes its downloads first, then ends as the signal's default action would."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return

    def handler(signum, frame) -> None:
        _remove_own_downloads()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, handler)


def _on_sighup(handler) -> None:
    """Run ``handler`` on SIGHUP in this process (each gunicorn and gRPC worker calls load() in its main
    thread). Elsewhere (load() from another thread, or no SIGHUP on the platform) polling alone follows."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
        return
    signal.signal(signal.SIGHUP, lambda signum, frame: handler())


def read_gallery_file(gallery_root: str | Path, path: Any, max_bytes: int) -> bytes:
    """Read a file named by a client only if it really lies inside ``gallery_root``; ``BadInput`` otherwise."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise BadInput("'path' must be a non-empty string")
    root = Path(gallery_root).resolve()
    # Whether a path escapes is decided before the filesystem is asked anything about it, so a client gets
    # the same answer for an outside file that exists and one that does not.
    outside = BadInput(f"path {_short(path)} is outside the gallery root")
    lexical = Path(os.path.normpath(root / path))
    if root not in lexical.parents:
        raise outside
    try:
        real = lexical.resolve()  # follows symlinks inside the root, wherever they point
    except (OSError, RuntimeError):
        raise BadInput(f"path {_short(path)} cannot be resolved in the gallery (a symlink loop?)") from None
    if root not in real.parents:
        raise outside
    try:
        if not real.is_file():  # inside the root, saying which is fine
            raise BadInput(f"path {_short(path)} " + ("is not a regular file" if real.exists() else
                                                      "does not exist in the gallery"))
        if real.stat().st_size > max_bytes:
            raise BadInput(f"path {_short(path)} is larger than {max_bytes} bytes")
        return real.read_bytes()
    except OSError as exc:  # a name too long, a file this server may not read
        raise BadInput(f"path {_short(path)} cannot be read from the gallery ({exc.strerror})") from None


class _PixelBudget:
    """Decoded pixels left to one request."""

    def __init__(self, total: int) -> None:
        self.total, self.left = total, total

    def take(self, pixels: int) -> None:
        if pixels > self.left:
            raise BadInput(f"the request's images add up to more than {self.total} pixels; send fewer or smaller "
                           "images per request")
        self.left -= pixels


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _integer(value: Any, name: str) -> int:
    # JSON over gRPC arrives as a protobuf Value, where every number is a double: accept 5.0, not 5.5 or "5".
    # A huge JSON integer stays an int (math.isfinite would raise OverflowError on it): range checks refuse it.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, float) or not math.isfinite(value) or not value.is_integer():
        raise BadInput(f"{name} must be an integer, got {_short(value)}")
    return int(value)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value) if not isinstance(value, (str, bytes)) or len(value) < limit else repr(value[:limit]) + "..."
    return text if len(text) <= limit + 5 else text[:limit] + "..."


def decode_base64(value: Any, name: str) -> bytes:
    """Strictly decode a base64 string (or bytes), naming the field in the error."""
    if not isinstance(value, (str, bytes)):
        raise BadInput(f"{name} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"{name} is not valid base64") from None
