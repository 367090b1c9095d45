"""The similarity server's core: load and follow the gallery's bundle, and answer a protocol-free ``Query``."""

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

from imgsim.bundle_format import BundleError
from imgsim import logs
from imgsim.errors import BadInput, ImgsimError, redact
from imgsim.serve import inputs, process
from imgsim.serve.query import Answer, Query, index_size_of
from imgsim.serve.search import Filter, Searcher, make_answer
from imgsim.serve.settings import ServiceConfig

log = logging.getLogger(__name__)


class SimilarityService:
    """Holds the loaded bundle and answers queries; knows no protocol (the adapters decode their wire into a Query)."""

    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        process.return_large_buffers_to_the_os()  # the server process and the workers it forks inherit this
        logs.redact_records()  # no log line of the server carries a tracking URI's user:password@
        self.searcher: Searcher | None = None
        self.load_error: str | None = None
        self.load_failed_for_good = False
        self._last_failure = ""
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
        from imgsim.bundle_format import BUNDLE_JSON
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

    def answer(self, query: Query) -> Answer:
        """Answer ``query`` from the version serving now, within this server's limits. Every protocol's adapter
        ends here (a graph's embedder too: it overrides ``answer_id`` and ``answer_embedded``). Raises ``BadInput``
        for what the client got wrong, ``ImgsimError`` when not ready."""
        started = time.perf_counter()
        searcher = self.serving()
        k, where = self.limits(query, searcher)
        if query.id is not None:
            return self.answer_id(query.id, searcher, k, where)
        timings: dict[str, float] = {}
        embeddings, probs = self.embed(self.images(query), searcher, started, timings)
        return self.answer_embedded(embeddings, probs, searcher, k, where, timings)

    def answer_id(self, item_id: int, searcher: Searcher, k: int, where: Filter | None) -> Answer:
        """The answer to a query by gallery id, within checked limits."""
        return Answer(make_answer(searcher, [searcher.search_id(item_id, k, where)]))

    def answer_embedded(self, embeddings: np.ndarray, probs: np.ndarray, searcher: Searcher, k: int,
                        where: Filter | None, timings: dict[str, float]) -> Answer:
        """The answer to a query by images, once embedded; adds ``search`` milliseconds to ``timings``."""
        started = time.perf_counter()
        results = [searcher.rank(e, p, k, where) for e, p in zip(embeddings, probs)]
        timings["search"] = ms_since(started)
        return Answer(make_answer(searcher, results), timings)

    def serving(self) -> Searcher:
        """The version this request is answered from, even if a refresh switches meanwhile."""
        searcher = self.searcher
        if not searcher:
            raise ImgsimError(f"not ready: {self.load_error or 'still loading'}")
        return searcher

    def limits(self, query: Query, searcher: Searcher) -> tuple[int, Filter | None]:
        """The query's k (the default when it names none; at most the gallery's size) and its filter, checked
        against this server's max_k and the gallery's labels."""
        k = self.k_within(query.k, searcher)
        if query.filters is not None:
            searcher.check_filter(query.filters)
        return k, query.filters

    def k_within(self, k: int | None, searcher: Searcher) -> int:
        k = self.cfg.default_k if k is None else k
        if not 1 <= k <= self.cfg.max_k:
            raise BadInput(f"k must be between 1 and {self.cfg.max_k}, got {k}")
        return min(k, searcher.gallery_size)

    def images(self, query: Query) -> Iterable[bytes]:
        """The encoded images of an image or path query, within the per-request batch limit."""
        if query.path is not None:
            return [self.gallery_file(query.path)]
        if len(query.images) > self.cfg.max_batch:
            raise BadInput(f"'images' has {len(query.images)} entries; at most {self.cfg.max_batch} per request")
        return query.images

    def embed(self, payloads: Iterable[bytes], searcher: Searcher, started: float,
              timings: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
        """Decode and embed a query's images: embeddings and class probabilities. Adds ``decode`` (since
        ``started``) and ``embed`` milliseconds to ``timings``."""
        batch = self._preprocess(payloads, searcher)
        timings["decode"] = ms_since(started)
        started = time.perf_counter()
        embeddings, probs = searcher.embed_inputs(batch)
        timings["embed"] = ms_since(started)
        return embeddings, probs

    @property
    def index_size(self) -> float:
        """The index-size gauge's value now (every server reports it)."""
        return index_size_of(self.versions())

    def accept(self, searcher: Searcher, where: str) -> None:
        """Raise ``BundleError`` if this server must not serve the loaded bundle (a graph node's wrong part)."""

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
