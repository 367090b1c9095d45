"""The search page: a small Flask app that serves the page, relays queries to Seldon's REST API and serves
gallery thumbnails from the configured root only."""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import posixpath
import threading
from pathlib import Path
from typing import Any

import requests
from flask import Flask, Response, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException

from imgsim import config
from imgsim.config import setting
from imgsim.errors import BadInput, ImgsimError
from imgsim.images import SERVING_MAX_PIXELS, decode_image
from imgsim.serve import protocols
from imgsim.serve.bodies import RETRY_AFTER_S, BoundedBody, ImageJson, InMemoryRequest, upload_bytes
from imgsim.serve.process import memory_limit
from imgsim.serve.inputs import read_gallery_file
from imgsim.serve.limits import SMALL_BODY, too_large, upload_limit
from imgsim.serve.query import NotFound, status_for

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "page_static"
THUMB_SIDE = 160


@dataclasses.dataclass(frozen=True)
class UiConfig:
    """Where the Seldon server is, where the gallery's images are, and the page's limits."""

    url: str = setting("http://127.0.0.1:9000", "the server's REST endpoint; the page relays to it (Seldon sends no "
                       "CORS headers)", "page")
    protocol: str = setting("seldon", "the server's protocol: seldon (Seldon v1) or v2 (the Open Inference Protocol, "
                            "MLServer)", "page")
    model: str = setting(protocols.DEFAULT_V2_MODEL, "the v2 model's name (protocol v2)", "page")
    gallery_root: str = setting("", "thumbnails come from this folder only; empty: no thumbnails", "page")
    timeout_s: float = setting(30.0, "how long to wait for the server's answer", "page")
    max_image_bytes: int = setting(8 * 1024 * 1024, "largest upload", "limits")
    max_k: int = setting(50, "the largest k the page asks for", "limits")
    max_pixels: int = setting(SERVING_MAX_PIXELS, "a thumbnail decodes no larger image than the server would",
                              "limits")
    max_concurrent_decodes: int = setting(1, "thumbnail decodes at once per worker process, as in the server",
                                          "limits")
    thumbnail_cache_bytes: int = setting(16 * 1024 * 1024, "thumbnail cache per worker process", "limits")
    in_flight: int = setting(0, "queries with a body (uploads, more-like-this) held at once per worker process; "
                             "more are answered 503 with Retry-After. 0: what the container's memory limit allows",
                             "limits")
    body_deadline_s: float = setting(30.0, "a request's body must arrive within this many seconds, else 408 (a "
                                     "stalled upload gives back its memory)", "limits")
    workers: int = setting(1, "gunicorn worker processes (the chart runs 2); they share the memory that sets the "
                           "in-flight default", "page")

    def __post_init__(self) -> None:
        small = [f.name for f in dataclasses.fields(self) if (f.name.startswith("max_") or f.name == "workers")
                 and getattr(self, f.name) < 1]
        if small:
            raise ImgsimError(f"{', '.join(small)} must be at least 1")
        if self.in_flight < 0:
            raise ImgsimError("in_flight must be at least 0 (0: from the memory limit)")
        if not 0 < self.body_deadline_s < 24 * 3600:  # NaN and inf too: a timer cannot wait on them
            raise ImgsimError("body_deadline_s must be above 0 and under a day")
        protocols.protocol(self.protocol, self.model)  # an unknown protocol fails at start, not at the first query

    @property
    def proto(self) -> protocols.Seldon | protocols.OpenInference:
        return protocols.protocol(self.protocol, self.model)

    def in_flight_slots(self, limit: int | None = None) -> int:
        """``in_flight``, or what the memory ``limit`` (default: the container's) leaves each worker process."""
        if self.in_flight:
            return self.in_flight
        limit = memory_limit() if limit is None else limit
        if limit is None:
            return DEFAULT_IN_FLIGHT
        # Per worker: (limit - idle processes - their thumbnail caches) / (workers x one query's worst case, twice
        # its largest body: the body, plus allocator slack and the relay's pieces; bench/hostile_page.py --stalls).
        idle = IDLE_PROCESS_BYTES * (self.workers + 1) + self.thumbnail_cache_bytes * self.workers
        return max(1, (limit - idle) // (self.workers * 2 * upload_limit(self.max_image_bytes)))

    @classmethod
    def from_env(cls, **params: Any) -> "UiConfig":
        """For gunicorn in the chart: ``params`` win over IMGSIM_UI_URL, IMGSIM_UI_GALLERY_ROOT, ..."""
        return config.from_sources(cls, ENV_PREFIX, params, "page setting")


ENV_PREFIX = "IMGSIM_UI_"
MAX_LABELS_FIELD = 2000  # characters of the "only labels" field that are read
QUOTED = 100  # characters of a client's text an error message quotes
DEFAULT_IN_FLIGHT = 16  # queries held at once per worker where the container has no memory limit
IDLE_PROCESS_BYTES = 48 * 2**20  # a page process at rest (gunicorn's arbiter or a worker), a little above its measured PSS
MAX_ID = 2**63 - 1  # gallery ids are int64 on the wire (protocol v2)
SECURITY_HEADERS = {
    # Everything the page uses is its own (no inline script or style); the query preview is a blob: URL.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
                               "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def create_app(cfg: UiConfig | None = None) -> Flask:
    cfg = cfg or UiConfig.from_env()
    app = Flask(__name__, static_folder=None)
    upload = upload_limit(cfg.max_image_bytes)  # every other route: SMALL_BODY
    app.config["MAX_CONTENT_LENGTH"] = upload
    app.request_class = InMemoryRequest
    app.wsgi_app = BoundedBody(app.wsgi_app, {"/api/search": upload}, SMALL_BODY,
                              SECURITY_HEADERS, slots=cfg.in_flight_slots(), deadline_s=cfg.body_deadline_s)
    thumbnails = app.extensions["imgsim.thumbnails"] = ThumbnailCache(cfg)

    @app.after_request
    def secure(response: Response) -> Response:
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.get("/")
    def index():
        return send_from_directory(STATIC, "index.html")

    @app.get("/static/<path:name>")
    def static_file(name: str):
        return send_from_directory(STATIC, name, max_age=300)

    @app.get("/api/status")
    def status():
        proto = cfg.proto
        try:
            response = requests.get(f"{cfg.url}{proto.ready_path}", timeout=5)
            identity = proto.identity(protocols.json_body(response))
            if response.ok and isinstance(proto, protocols.OpenInference):  # its ready answer is empty
                metadata = requests.get(f"{cfg.url}{proto.metadata_path}", timeout=5)
                identity = proto.identity(protocols.json_body(metadata))
        except requests.RequestException:
            return jsonify(ready=False, message=f"the search server at {cfg.url} cannot be reached"), 502
        if response.ok:
            return jsonify({**identity, "ready": True, "thumbnails": bool(cfg.gallery_root)})
        # Not the server's own text: it names the bundle URI, which can hold the tracking store's credentials.
        log.warning("search server not ready (%s): %s", response.status_code,
                    proto.refusal(protocols.json_body(response))[:500])
        return jsonify(ready=False, message="the search server is not ready yet (loading or failing to load its "
                                            "gallery); its log says why"), 503

    @app.post("/api/search")
    def search():
        upload = request.files.get("image")
        if upload is None:
            return _error(400, "choose an image file to search with")
        data = upload_bytes(upload.stream)
        if not data:
            return _error(400, f"{_quote(upload.filename or 'the file')} is empty")
        if len(data) > cfg.max_image_bytes:
            return _error(413, f"the image is larger than {cfg.max_image_bytes // 2**20} MB")
        tags = {"k": _k(cfg), **_labels(request.form.get("labels"))}
        return _relay(cfg, ImageJson(data, lambda image: cfg.proto.image_body(image, tags)))

    @app.post("/api/more")
    def more():
        try:
            body = request.get_json(silent=True)
        except RecursionError:  # nesting deeper than the parser goes: silent=True only silences ValueError
            body = None
        body = body if isinstance(body, dict) else {}  # a JSON number or list is no request either (was a 500)
        item_id = body.get("id")
        if not isinstance(item_id, int) or isinstance(item_id, bool) or abs(item_id) > MAX_ID:
            return _error(400, "'id' must be a gallery id (an integer)")
        labels = body.get("labels")
        return _relay(cfg, cfg.proto.id_body(item_id, {"k": _k(cfg, body.get("k")),
                                                       **_labels(labels if isinstance(labels, str) else None)}))

    @app.get("/thumb/<path:rel>")
    def thumb(rel: str):
        if not cfg.gallery_root:
            return _error(404, "no gallery root configured: thumbnails are off")
        try:
            png = thumbnails.get(rel)
        except BadInput as exc:  # (a file not in the gallery is NotFound: 404)
            return _error(*status_for(exc))
        return Response(png, mimetype="image/png", headers={"Cache-Control": "public, max-age=3600"})

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):  # JSON like every other answer, not Werkzeug's HTML pages
        if exc.code == 413:
            return _error(413, f"the image is larger than {cfg.max_image_bytes // 2**20} MB"
                          if request.path == "/api/search" else too_large(SMALL_BODY))
        return _error(exc.code or 500, exc.description or exc.name)

    return app


def _k(cfg: UiConfig, raw=None) -> int:
    """The k asked for, within 1..max_k; 5 for anything that is not a number (NaN, a list, "1e999" as text)."""
    raw = request.form.get("k") if raw is None else raw
    try:
        return max(1, min(cfg.max_k, int(raw)))
    except OverflowError:  # an infinite float (JSON 1e999): as large as the page asks for
        return cfg.max_k if raw > 0 else 1
    except (TypeError, ValueError):
        return 5


def _quote(text: str) -> str:
    """A client's text as an error message quotes it: at most QUOTED characters."""
    return text if len(text) <= QUOTED else text[:QUOTED] + "..."


def _labels(raw: str | None) -> dict:
    """The page's "only labels" field (comma-separated) as the server's ``labels`` filter; the server says
    which label it does not know."""
    labels = [label.strip() for label in (raw or "")[:MAX_LABELS_FIELD].split(",") if label.strip()]
    return {"labels": labels} if labels else {}


def _relay(cfg: UiConfig, body: dict | ImageJson):
    """Send a query to the server; its answer back as is, its 4xx text as our message, unreachable as 502."""
    proto = cfg.proto
    sent = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, ImageJson) \
        else {"json": body}
    try:
        response = requests.post(f"{cfg.url}{proto.predict_path}", timeout=cfg.timeout_s, **sent)
    except requests.RequestException:
        return _error(502, f"the search server at {cfg.url} cannot be reached; is it running?")
    payload = protocols.json_body(response)
    answer = proto.answer(payload) if response.ok else None
    if answer is not None:
        return jsonify(answer)
    if 400 <= response.status_code < 500:  # what was wrong with the query, in the server's words
        return _error(response.status_code, proto.refusal(payload) or
                      f"the search server answered {response.status_code}")
    log.warning("search server answered %s: %s", response.status_code, proto.refusal(payload)[:500])
    if response.status_code == 503:  # busy or loading: the server's own wait, or the page's
        retry = response.headers.get("Retry-After", "")
        return _error(503, "the search server is busy or loading; try again shortly",
                      {"Retry-After": retry if retry.isdigit() else str(RETRY_AFTER_S)})
    return _error(502, f"the search server could not answer ({response.status_code}); try again shortly")


def _error(code: int, message: str, headers: dict[str, str] | None = None):
    return jsonify(error=message), code, headers or {}


class ThumbnailCache:
    """Thumbnails of gallery files, decoded through the server's bounded path (its pixel limit, palette images
    reduced before expansion, at most ``max_concurrent_decodes`` at once) and kept up to a byte budget, keyed
    by the normalised path and the file's (mtime, size) so a replaced image is noticed."""

    def __init__(self, cfg: UiConfig):
        self.cfg = cfg
        self._slots = threading.BoundedSemaphore(max(1, cfg.max_concurrent_decodes))
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[tuple, bytes] = collections.OrderedDict()
        self._bytes = 0

    def get(self, rel: str) -> bytes:
        rel = normalise(rel)
        key = (rel, *_stamp(self.cfg.gallery_root, rel))
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        data = read_gallery_file(self.cfg.gallery_root, rel, self.cfg.max_image_bytes, missing=NotFound)
        with self._slots:
            img = decode_image(data, max_pixels=self.cfg.max_pixels, draft=THUMB_SIDE)
        img.thumbnail((THUMB_SIDE, THUMB_SIDE))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        png = buf.getvalue()
        with self._lock:
            if key not in self._entries and len(png) <= self.cfg.thumbnail_cache_bytes:
                self._entries[key] = png
                self._bytes += len(png)
                while self._bytes > self.cfg.thumbnail_cache_bytes:
                    self._bytes -= len(self._entries.popitem(last=False)[1])
        return png

    @property
    def size_bytes(self) -> int:
        return self._bytes


def normalise(rel: str) -> str:
    """One name per file: ``./a.png``, ``a.png/`` and ``x/../a.png`` are ``a.png``. The same lexical rule as
    ``read_gallery_file``'s, so a name that escapes the root still escapes (and is refused there)."""
    return posixpath.normpath(rel)


def _stamp(root: str, rel: str) -> tuple[int, int]:
    """(mtime, size) of the file, so the cache notices a replaced image; (0, 0) if it cannot be read (the
    checks in read_gallery_file then say why)."""
    try:
        st = (Path(root) / rel).stat()
        return int(st.st_mtime_ns), st.st_size
    except (OSError, ValueError):
        return 0, 0


# gunicorn's settings for the page, as the chart passes them too. An event-loop worker: a page waits on Seldon
# most of the time, and a slow or idle client holds a greenlet, not one of a few threads (8 slow connections
# froze the threaded worker). keepalive bounds how long reading a request's headers may take, the first
# request's too (gunicorn's gevent worker reads every request line and headers under that timeout).
GUNICORN = {"worker_class": "gevent", "worker_connections": 1000, "keepalive": 5}


def serve(cfg: UiConfig, host: str = "127.0.0.1", port: int = 8501) -> None:
    """Run the page under gunicorn with :data:`GUNICORN`'s worker, as the chart does."""
    from gunicorn.app.base import BaseApplication

    class Page(BaseApplication):
        def load_config(self):
            for key, value in {"bind": f"{host}:{port}", "workers": cfg.workers, **GUNICORN, "accesslog": "-",
                               "timeout": int(cfg.timeout_s) + 30}.items():
                self.cfg.set(key, value)

        def load(self):
            return create_app(cfg)

    print(f"imgsim ui: http://{host}:{port}/ -> {cfg.url}" + (f", thumbnails from {cfg.gallery_root}"
                                                              if cfg.gallery_root else ", no thumbnails"), flush=True)
    Page().run()
