"""Protocol-independent request handling for the similarity server: validate, decode, search, shape."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from imgsim.errors import BadInput, ImgsimError
from imgsim.images import DEFAULT_MAX_PIXELS, decode_image
from imgsim.index import DEFAULT_SEARCH_K
from imgsim.search import QueryResult, Searcher

log = logging.getLogger(__name__)


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
    max_pixels: int = DEFAULT_MAX_PIXELS
    search_k: int = DEFAULT_SEARCH_K
    torch_threads: int = 1  # one per worker: several gunicorn workers must not oversubscribe the cores

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
        self.searcher: Searcher | None = None
        self.load_error: str | None = None
        self._versions: dict[str, str] = {}
        self.stats = Stats()

    def load(self) -> None:
        """Resolve, verify and load the bundle; on failure remember why, so health checks report not-ready."""
        import mlflow

        from imgsim import tracking
        from imgsim.export import resolve_bundle

        torch.set_num_threads(max(1, self.cfg.torch_threads))
        try:
            if self.cfg.model_uri.startswith(("runs:", "models:")):
                # Read-only use of the registry: no experiment to create, nothing written to the (read-only) cwd.
                mlflow.set_tracking_uri(tracking.tracking_uri())
            self.searcher = Searcher(resolve_bundle(self.cfg.model_uri), search_k=self.cfg.search_k)
            self._versions = self._identity()
            self.load_error = None
            log.info("imgsim: loaded %d gallery items from %s", self.searcher.size, self.cfg.model_uri)
        except ImgsimError as exc:
            self._not_ready(str(exc))
        except OSError as exc:  # typically a bundle on a volume that this server's user may not read
            self._not_ready(f"cannot read the bundle from {self.cfg.model_uri}: {exc}; this server runs as uid "
                            f"{os.getuid()}: make the bundle's files readable by it")
        except Exception as exc:  # noqa: BLE001 - stay up and report not-ready rather than crash-loop the worker
            self._not_ready(f"unexpected error while loading: {exc!r}", trace=True)

    def _not_ready(self, reason: str, trace: bool = False) -> None:
        self.searcher, self._versions, self.load_error = None, {}, reason
        log.error("imgsim: NOT READY: %s", reason, exc_info=trace)

    @property
    def ready(self) -> bool:
        return self.searcher is not None

    def versions(self) -> dict[str, str]:
        """Model and index identity, for response tags and answers (fixed once loaded)."""
        return dict(self._versions)

    def _identity(self) -> dict[str, str]:
        meta = self.searcher.meta
        model = meta["model"]
        return {"model_name": str(model.get("name", "")), "model_version": str(model.get("version", "")),
                "model_sha256": model["weights_sha256"][:12], "index_sha256": meta["files"]["index.ann"][:12],
                "index_size": str(meta["index"]["count"])}

    def handle(self, json_data: Any, bin_data: bytes | None, tags: dict) -> tuple[dict, dict[str, float]]:
        """Answer one request; returns (answer, timings in ms). Raises ``BadInput`` for client errors."""
        if not self.searcher:
            raise ImgsimError(f"not ready: {self.load_error or 'still loading'}")
        timings: dict[str, float] = {}
        started = time.perf_counter()
        k = self._k(json_data.get("k") if isinstance(json_data, dict) else None, tags.get("k"))
        if bin_data is not None:
            images = [self._decode(bin_data)]
        elif isinstance(json_data, dict):
            forms = [key for key in ("image", "images", "path", "id") if key in json_data]
            if len(forms) != 1:
                raise BadInput("jsonData needs exactly one of 'image' (base64), 'images' (list of base64), 'path' or 'id'")
            if forms == ["id"]:
                return self._answer([self.searcher.search_id(_integer(json_data["id"], "id"), k)]), timings
            images = self._json_images(json_data, forms[0])
        else:
            raise BadInput("send an image as binData, or jsonData with one of image, images, path or id")
        timings["decode_ms"] = _ms_since(started)
        started = time.perf_counter()
        embeddings, probs = self.searcher.embed(images)
        timings["embed_ms"] = _ms_since(started)
        started = time.perf_counter()
        results = [self.searcher.rank(e, p, k) for e, p in zip(embeddings, probs)]
        timings["search_ms"] = _ms_since(started)
        return self._answer(results), timings

    def _json_images(self, data: dict, form: str) -> list:
        if form == "image":
            return [self._decode(decode_base64(data["image"], "image"))]
        if form == "path":
            return [self._decode(self._read_gallery_file(data["path"]))]
        batch = data["images"]
        if not isinstance(batch, list) or not batch:
            raise BadInput("'images' must be a non-empty list of base64 strings")
        if len(batch) > self.cfg.max_batch:
            raise BadInput(f"'images' has {len(batch)} entries; at most {self.cfg.max_batch} per request")
        return [self._decode(decode_base64(b, f"images[{i}]")) for i, b in enumerate(batch)]

    def _decode(self, data: bytes):
        if len(data) > self.cfg.max_image_bytes:
            raise BadInput(f"image is {len(data)} bytes; the limit is {self.cfg.max_image_bytes}")
        return decode_image(data, max_pixels=self.cfg.max_pixels)

    def _read_gallery_file(self, path: Any) -> bytes:
        """Read a file named by the client only if it really lies inside the configured gallery root."""
        if not self.cfg.gallery_root:
            raise BadInput("path queries are disabled on this server (no gallery_root configured); send the image bytes")
        if not isinstance(path, str) or not path or "\x00" in path:
            raise BadInput("'path' must be a non-empty string")
        root = Path(self.cfg.gallery_root).resolve()
        try:
            real = (root / path).resolve(strict=True)  # follows symlinks, so an escaping link is caught below
        except (OSError, RuntimeError):
            raise BadInput(f"path {path!r} does not exist in the gallery") from None
        if root not in real.parents:
            raise BadInput(f"path {path!r} is outside the gallery root")
        if not real.is_file():
            raise BadInput(f"path {path!r} is not a regular file")
        if real.stat().st_size > self.cfg.max_image_bytes:
            raise BadInput(f"path {path!r} is larger than {self.cfg.max_image_bytes} bytes")
        return real.read_bytes()

    def _k(self, from_json: Any, from_tags: Any) -> int:
        raw = from_json if from_json is not None else from_tags
        k = self.cfg.default_k if raw is None else _integer(raw, "k")
        if not 1 <= k <= self.cfg.max_k:
            raise BadInput(f"k must be between 1 and {self.cfg.max_k}, got {k}")
        return min(k, self.searcher.size)

    def _answer(self, results: list[QueryResult]) -> dict:
        return {"results": [{"neighbours": [dataclasses.asdict(n) for n in r.neighbours],
                             "predicted": None if r.predicted_label is None else
                             {"label": r.predicted_label, "probability": r.probability}}
                            for r in results],
                **self.versions()}


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
