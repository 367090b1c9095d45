"""Protocol-independent request handling for the similarity server: validate, decode, search, shape."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from imgsim.bundle import BundleError
from imgsim import logs
from imgsim.errors import BadInput, ImgsimError, redact
from imgsim.serve import inputs, process
from imgsim.serve.search import MAX_FILTER_IDS, Filter, Searcher, make_answer
from imgsim.serve.settings import ServiceConfig

log = logging.getLogger(__name__)


class RejectedCount:
    """Requests refused as bad input since the last drain (Seldon's custom metrics read it); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._n = 0

    def add(self) -> None:
        with self._lock:
            self._n += 1

    def drain(self) -> int:
        with self._lock:
            n, self._n = self._n, 0
            return n


class SimilarityService:
    """Holds the loaded bundle and answers parsed requests; no knowledge of HTTP or gRPC."""

    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        process.return_large_buffers_to_the_os()  # the server process and the workers it forks inherit this
        logs.redact_records()  # no log line of the server carries a tracking URI's user:password@
        self.searcher: Searcher | None = None
        self.load_error: str | None = None
        self.load_failed_for_good = False
        self._last_failure = ""
        self.rejected = RejectedCount()
        self._decode_slots = threading.BoundedSemaphore(max(1, cfg.max_concurrent_decodes))
        self._refresh_lock = threading.Lock()
        self._loaded_key: str | None = None
        self._failed_key: str | None = None
        self._download: Path | None = None  # the temp folder the serving version was downloaded into, if any
        self._closed = threading.Event()

    def load(self) -> None:
        """Load the bundle; if that fails for a reason that may pass (store unreachable, folder not there yet),
        keep retrying in the background with bounded backoff. Not ready until loaded; a bundle that is itself
        wrong (damaged, inconsistent, unknown format) is reported and not retried. Then follow the gallery:
        poll for a newer version every ``poll_interval_s`` and on SIGHUP."""
        if not self._try_load(1) and not self.load_failed_for_good:
            self._announce_retry(1, self.cfg.load_backoff_s)  # before the first health check can ask
            threading.Thread(target=self._retry, name="imgsim-load-retry", daemon=True).start()
        process.on_sighup(lambda: threading.Thread(target=self.refresh, name="imgsim-refresh", daemon=True).start())
        process.remove_downloads_on_sigterm()
        if self.cfg.poll_interval_s > 0:
            threading.Thread(target=self._poll, name="imgsim-poll", daemon=True).start()

    def _poll(self) -> None:
        while not self._closed.wait(self.cfg.poll_interval_s):
            self.refresh()

    def close(self) -> None:
        """Stop following the gallery (polls, retries, SIGHUP) and remove this service's download: the runtime's
        unload. Requests already running keep the version they hold."""
        self._closed.set()
        with self._refresh_lock:  # a refresh under way finishes first, then finds the service closed
            self.searcher, self.load_error = None, "unloaded"
            download, self._download = self._download, None
        if download is not None:
            shutil.rmtree(download, ignore_errors=True)

    def refresh(self) -> bool:
        """Load the gallery's newest version if it differs from the one serving, then switch to it: requests
        already running finish on the version they started with. Returns whether it switched. A version
        that fails to load is logged and the current one keeps serving. A server whose first bundle was broken
        (not ready, not retried) recovers this way once the alias names a good version."""
        if not (self.ready or self.load_failed_for_good) or not self._refresh_lock.acquire(blocking=False):
            return False  # still loading (the retry thread owns that), or a refresh is already running
        try:
            if self._closed.is_set():
                return False
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
        from imgsim.bundle import BUNDLE_JSON
        from imgsim.runs import tracking
        from imgsim.runs.export import locate_bundle

        uri = self.cfg.model_uri
        try:
            if uri.startswith("models:/") and "@" in uri:
                return locate_bundle(uri)[1] or None
            folder = tracking.local_path(uri)
            if folder is not None:
                meta = folder / BUNDLE_JSON if (folder / BUNDLE_JSON).exists() else folder / "bundle" / BUNDLE_JSON
                return hashlib.sha256(meta.read_bytes()).hexdigest()
        except (ImgsimError, OSError) as exc:  # the store is unreachable for now: try again next time
            process.keep_logging()
            log.warning("imgsim: cannot check for a newer gallery at %s: %s", uri, exc)
        return None

    def _retry(self) -> None:
        delay, attempt = self.cfg.load_backoff_s, 1
        while True:
            self._announce_retry(attempt, delay)
            if self._closed.wait(delay):
                return
            attempt += 1
            if self._try_load(attempt) or self.load_failed_for_good:
                return
            delay = min(delay * 2, self.cfg.load_backoff_max_s)

    def _announce_retry(self, attempt: int, delay: float) -> None:
        self.load_error = f"{self._last_failure} (attempt {attempt}; next try in {delay:g} s)"

    def _try_load(self, attempt: int, swap: bool = False) -> bool:
        """Load the bundle the URI names now. ``swap``: a refresh, where a failure leaves the serving version."""
        import mlflow

        from imgsim.runs import tracking
        from imgsim.runs.export import resolve_bundle

        key = version = None
        uri = self.cfg.model_uri
        download = None if tracking.local_path(uri) is not None else process.new_download_dir()
        try:
            if uri.startswith(("runs:", "models:")):
                # Read-only use of the registry: no experiment to create, nothing written to the (read-only) cwd.
                mlflow.set_tracking_uri(tracking.tracking_uri())
            # A bundle folder is identified by its bundle.json, read before the load so that a replacement during
            # it is seen by the next poll; a registry bundle by the version resolve_bundle pins.
            key = None if uri.startswith("models:/") else self._source_key()
            serving = self.searcher  # a refresh to changes over the version it serves links that, not download
            folder, version = resolve_bundle(uri, download, serving.bundle.model_folder if serving else None,
                                             bundle_sha256=self.cfg.bundle_sha256, base_root=self.cfg.base_root)
            process.keep_logging()
            searcher = Searcher(folder, search_k=self.cfg.search_k, runtime=self.cfg.runtime, threads=self.cfg.threads,
                                version=version)
            self.accept(searcher, uri)
        except Exception as exc:  # noqa: BLE001 - stay up and report not-ready rather than crash-loop the worker
            if download is not None:  # each retry downloads afresh: a failed one must not pile up on disk
                shutil.rmtree(download, ignore_errors=True)
            reason, permanent, trace = _load_failure(exc, uri)
            reason = redact(reason)  # an MLflow error may quote a URI with its user:password@
            if swap:
                return self._refresh_failed(reason)
            if permanent:  # a newer version may still come: refresh() tries it
                self.load_failed_for_good, self._failed_key = True, version or key
                reason += " (not retried: loading this bundle again cannot succeed)"
            return self._failed(attempt, reason, trace)
        if self._closed.is_set():  # unloaded while this load ran: nothing may be left behind
            if download is not None:
                shutil.rmtree(download, ignore_errors=True)
            return False
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
        searcher = self.serving()
        started = time.perf_counter()
        k, where, query = self.parse(json_data, bin_data, tags, searcher)
        return self.answer(searcher, k, where, query, started)

    def answer(self, searcher: Searcher, k: int, where: Filter | None, query: Iterable[bytes] | int,
               started: float) -> tuple[dict, dict[str, float]]:
        """Answer a parsed query (images, or the gallery id it names) from ``searcher``; (answer, timings in ms)
        since ``started``. Every protocol's adapter ends here."""
        timings: dict[str, float] = {}
        if isinstance(query, int):
            return make_answer(searcher, [searcher.search_id(query, k, where)]), timings
        embeddings, probs = self.embed(query, searcher, started, timings)
        started = time.perf_counter()
        results = [searcher.rank(e, p, k, where) for e, p in zip(embeddings, probs)]
        timings["search_ms"] = ms_since(started)
        return make_answer(searcher, results), timings

    def options(self, params: dict, searcher: Searcher) -> tuple[int, Filter | None]:
        """A query's k and filter from named parameters (``k``, ``labels``, ``exclude_ids``), as the Open
        Inference Protocol's request parameters carry them."""
        return self._k(params.get("k"), None, searcher.gallery_size), self._filter(params, {}, searcher)

    def serving(self) -> Searcher:
        """The version this request is answered from, even if a refresh switches meanwhile."""
        searcher = self.searcher
        if not searcher:
            raise ImgsimError(f"not ready: {self.load_error or 'still loading'}")
        return searcher

    def parse(self, json_data: Any, bin_data: bytes | None, tags: dict,
              searcher: Searcher) -> tuple[int, Filter | None, Iterable[bytes] | int]:
        """A query's k, filter, and images (the encoded bytes, read lazily) or the gallery id it names."""
        k = self._k(json_data.get("k") if isinstance(json_data, dict) else None, tags.get("k"), searcher.gallery_size)
        where = self._filter(json_data if isinstance(json_data, dict) else {}, tags, searcher)
        if bin_data is not None:
            return k, where, [bin_data]
        if not isinstance(json_data, dict):
            raise BadInput("send an image as binData, or jsonData with one of image, images, path or id")
        forms = [key for key in ("image", "images", "path", "id") if key in json_data]
        if len(forms) != 1:
            raise BadInput("jsonData needs exactly one of 'image' (base64), 'images' (list of base64), 'path' or 'id'")
        if forms == ["id"]:
            return k, where, inputs.integer(json_data["id"], "id")
        return k, where, self._json_payloads(json_data, forms[0])

    def embed(self, payloads: Iterable[bytes], searcher: Searcher, started: float,
              timings: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
        """Decode and embed a query's images: embeddings and class probabilities. Adds ``decode_ms`` (since
        ``started``, the request's parsing included) and ``embed_ms`` to ``timings``."""
        batch = self._preprocess(payloads, searcher)
        timings["decode_ms"] = ms_since(started)
        started = time.perf_counter()
        embeddings, probs = searcher.embed_inputs(batch)
        timings["embed_ms"] = ms_since(started)
        return embeddings, probs

    def accept(self, searcher: Searcher, where: str) -> None:
        """Raise ``BundleError`` if this server must not serve the loaded bundle (a graph node's wrong part)."""

    def _json_payloads(self, data: dict, form: str) -> Iterable[bytes]:
        if form == "image":
            return [inputs.decode_base64(data["image"], "image")]
        if form == "path":
            return [self.gallery_file(data["path"])]
        batch = data["images"]
        if not isinstance(batch, list) or not batch:
            raise BadInput("'images' must be a non-empty list of base64 strings")
        if len(batch) > self.cfg.max_batch:
            raise BadInput(f"'images' has {len(batch)} entries; at most {self.cfg.max_batch} per request")
        return (inputs.decode_base64(b, f"images[{i}]") for i, b in enumerate(batch))  # one at a time

    def _preprocess(self, payloads: Iterable[bytes], searcher: Searcher) -> np.ndarray:
        """Decode each image straight to the model's input size, one at a time, so a request holds at most one
        full-size image (and a worker at most ``max_concurrent_decodes``), within a per-request pixel budget."""
        budget = inputs.PixelBudget(self.cfg.max_request_pixels)
        arrays = []
        for data in payloads:
            if len(data) > self.cfg.max_image_bytes:
                raise BadInput(f"image is {len(data)} bytes; the limit is {self.cfg.max_image_bytes}")
            with self._decode_slots:
                arrays.append(searcher.preprocess.decode(data, max_pixels=self.cfg.max_pixels, admit=budget.take))
        return np.stack(arrays)

    def gallery_file(self, path: Any) -> bytes:
        """The bytes of a gallery image a client names by path (inside the configured gallery_root only)."""
        if not self.cfg.gallery_root:
            raise BadInput("path queries are disabled on this server (no gallery_root configured); send the image bytes")
        return inputs.read_gallery_file(self.cfg.gallery_root, path, self.cfg.max_image_bytes)

    @staticmethod
    def _filter(json_data: dict, tags: dict, searcher: Searcher) -> Filter | None:
        """``labels`` / ``exclude_ids`` from jsonData, else from meta.tags (how a binData query carries them)."""
        source = json_data if "labels" in json_data or "exclude_ids" in json_data else tags
        where = inputs.filter_of(source.get("labels"), source.get("exclude_ids"), MAX_FILTER_IDS)
        if where is not None:
            searcher.check_filter(where)
        return where

    def _k(self, from_json: Any, from_tags: Any, size: int) -> int:
        raw = from_json if from_json is not None else from_tags
        k = self.cfg.default_k if raw is None else inputs.integer(raw, "k")
        if not 1 <= k <= self.cfg.max_k:
            raise BadInput(f"k must be between 1 and {self.cfg.max_k}, got {k}")
        return min(k, size)


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


def ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
