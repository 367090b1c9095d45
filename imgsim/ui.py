"""The search page: a small Flask app that serves the page, relays queries to Seldon's REST API and serves
gallery thumbnails from the configured root only."""

from __future__ import annotations

import base64
import dataclasses
import functools
import io
import os
from pathlib import Path

import requests
from flask import Flask, Response, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException

from imgsim.errors import BadInput
from imgsim.images import decode_image
from imgsim.service import read_gallery_file

STATIC = Path(__file__).resolve().parent / "ui_static"
THUMB_SIDE = 160


@dataclasses.dataclass(frozen=True)
class UiConfig:
    """Where the Seldon server is, where the gallery's images are, and the page's limits."""

    url: str = "http://127.0.0.1:9000"  # the Seldon REST endpoint (the UI relays to it: no CORS on Seldon)
    gallery_root: str = ""  # thumbnails come from here only; empty: no thumbnails
    max_image_bytes: int = 8 * 1024 * 1024
    max_k: int = 50
    timeout_s: float = 30.0

    @classmethod
    def from_env(cls) -> "UiConfig":
        """For gunicorn in the chart: IMGSIM_UI_URL, IMGSIM_UI_GALLERY_ROOT, IMGSIM_UI_MAX_IMAGE_BYTES, ..."""
        values = {}
        for field in dataclasses.fields(cls):
            raw = os.environ.get(f"IMGSIM_UI_{field.name.upper()}")
            if raw:
                values[field.name] = type(field.default)(raw)
        return cls(**values)


def create_app(cfg: UiConfig | None = None) -> Flask:
    cfg = cfg or UiConfig.from_env()
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_image_bytes + 64 * 1024  # the image plus the form fields

    @app.get("/")
    def index():
        return send_from_directory(STATIC, "index.html")

    @app.get("/static/<path:name>")
    def static_file(name: str):
        return send_from_directory(STATIC, name, max_age=300)

    @app.get("/api/status")
    def status():
        try:
            response = requests.get(f"{cfg.url}/health/status", timeout=5)
        except requests.RequestException:
            return jsonify(ready=False, message=f"the search server at {cfg.url} cannot be reached"), 502
        body = _json(response)
        if response.ok:
            identity = body.get("jsonData", body) if isinstance(body.get("jsonData", body), dict) else {}
            return jsonify({**identity, "ready": True, "thumbnails": bool(cfg.gallery_root)})
        return jsonify(ready=False, message=_info(body) or f"the search server answered {response.status_code}"), 503

    @app.post("/api/search")
    def search():
        upload = request.files.get("image")
        if upload is None:
            return _error(400, "choose an image file to search with")
        data = upload.read(cfg.max_image_bytes + 1)
        if not data:
            return _error(400, f"{upload.filename or 'the file'} is empty")
        if len(data) > cfg.max_image_bytes:
            return _error(413, f"the image is larger than {cfg.max_image_bytes // 2**20} MB")
        return _relay(cfg, {"binData": base64.b64encode(data).decode(), "meta": {"tags": {"k": _k(cfg)}}})

    @app.post("/api/more")
    def more():
        body = request.get_json(silent=True) or {}
        item_id = body.get("id")
        if not isinstance(item_id, int) or isinstance(item_id, bool):
            return _error(400, "'id' must be a gallery id (an integer)")
        return _relay(cfg, {"jsonData": {"id": item_id, "k": _k(cfg, body.get("k"))}})

    @app.get("/thumb/<path:rel>")
    def thumb(rel: str):
        if not cfg.gallery_root:
            return _error(404, "no gallery root configured: thumbnails are off")
        try:
            png = _thumbnail(cfg.gallery_root, rel, cfg.max_image_bytes, *_stamp(cfg.gallery_root, rel))
        except BadInput as exc:
            return _error(404 if "does not exist" in str(exc) else 400, str(exc))
        return Response(png, mimetype="image/png", headers={"Cache-Control": "public, max-age=3600"})

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):  # JSON like every other answer, not Werkzeug's HTML pages
        if exc.code == 413:
            return _error(413, f"the image is larger than {cfg.max_image_bytes // 2**20} MB")
        return _error(exc.code or 500, exc.description or exc.name)

    return app


def _k(cfg: UiConfig, raw=None) -> int:
    raw = request.form.get("k") if raw is None else raw
    try:
        return max(1, min(cfg.max_k, int(raw)))
    except (TypeError, ValueError):
        return 5


def _relay(cfg: UiConfig, body: dict):
    """Send a query to Seldon; its answer back as is, its 4xx text as our message, unreachable as 502."""
    try:
        response = requests.post(f"{cfg.url}/api/v1.0/predictions", json=body, timeout=cfg.timeout_s)
    except requests.RequestException:
        return _error(502, f"the search server at {cfg.url} cannot be reached; is it running?")
    payload = _json(response)
    if response.ok and "jsonData" in payload:
        return jsonify(payload["jsonData"])
    status = response.status_code if 400 <= response.status_code < 600 else 502
    return _error(status, _info(payload) or f"the search server answered {response.status_code}")


def _json(response: requests.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _info(body: dict) -> str:
    status = body.get("status")
    return str(status.get("info", "")) if isinstance(status, dict) else ""


def _error(code: int, message: str):
    return jsonify(error=message), code


def _stamp(root: str, rel: str) -> tuple[int, int]:
    """(mtime, size) of the file, so the cache below notices a replaced image; (0, 0) if it cannot be read
    (the checks in read_gallery_file then say why)."""
    try:
        st = (Path(root) / rel).stat()
        return int(st.st_mtime_ns), st.st_size
    except (OSError, ValueError):
        return 0, 0


@functools.lru_cache(maxsize=2048)
def _thumbnail(root: str, rel: str, max_bytes: int, mtime: int, size: int) -> bytes:
    img = decode_image(read_gallery_file(root, rel, max_bytes), draft=THUMB_SIDE)
    img.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def serve(cfg: UiConfig, host: str = "127.0.0.1", port: int = 8501) -> None:
    """Run the page under gunicorn (threaded: a page waits on Seldon most of the time), as the chart does."""
    from gunicorn.app.base import BaseApplication

    class Page(BaseApplication):
        def load_config(self):
            for key, value in {"bind": f"{host}:{port}", "workers": 1, "threads": 8, "worker_class": "gthread",
                               "accesslog": "-", "timeout": int(cfg.timeout_s) + 30}.items():
                self.cfg.set(key, value)

        def load(self):
            return create_app(cfg)

    print(f"imgsim ui: http://{host}:{port}/ -> {cfg.url}" + (f", thumbnails from {cfg.gallery_root}"
                                                              if cfg.gallery_root else ", no thumbnails"), flush=True)
    Page().run()
