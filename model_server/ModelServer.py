"""Seldon Core v1 adapter: where a v1 request (REST or gRPC: binData, jsonData, meta.tags) becomes a ``Query``, and
the service's ``Answer`` a Seldon message (jsonData, or strData when compact, with meta.tags and meta.metrics)."""

from __future__ import annotations

import io
import json
import signal
import threading
from typing import Any, Callable

from flask import Blueprint, abort, jsonify, request
from google.protobuf import json_format
from seldon_core import seldon_methods
from seldon_core.flask_utils import SeldonMicroserviceException
from seldon_core.proto import prediction_pb2
from seldon_core.utils import json_to_seldon_message
from werkzeug.exceptions import HTTPException

from imgsim.errors import BadInput
from imgsim.serve import inputs
from imgsim.serve import seldon as seldon_compat
from imgsim.serve.limits import body_limit
from imgsim.serve.query import (COUNTER, INDEX_SIZE, REJECTED, Answer, Encoded, Metric, Query, filters_of,
                                is_rejection, metrics_of, status_for)
from imgsim.serve.service import SimilarityService
from imgsim.serve.settings import ServiceConfig

REASONS = {400: "BAD_REQUEST", 502: "BAD_GATEWAY", 503: "NOT_READY"}  # Seldon's words beside status_for's codes


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


class ModelServer:
    """Top-k image similarity over Seldon's protocols; configuration only here, loading in ``load()``."""

    service_class: type[SimilarityService] = SimilarityService
    compact_answers = True  # meta.tags.format=compact may ask for the answer as a JSON string (see _compact)

    def __init__(self, **params: Any) -> None:
        """``params``: the SeldonDeployment graph's parameters, any of ServiceConfig's settings (checked there:
        an unknown name or a bad value stops the server with a message naming it)."""
        self.service = self.service_class(ServiceConfig.from_sources(**params))
        self.rejected = RejectedCount()
        _survive_sighup()
        self.model_error_handler = _error_blueprint(body_limit(self.service.cfg), self._live_metadata)

    def load(self) -> None:
        self.service.load()

    def predict_raw(self, request: Any) -> Any:
        is_proto = isinstance(request, prediction_pb2.SeldonMessage)
        try:
            json_data, bin_data, tags = _parse_proto(request) if is_proto else _parse_rest(request)
            compact = _compact(tags) and self.compact_answers
            answer = self.answer(json_data, bin_data, tags)
        except Exception as exc:  # noqa: BLE001 - each gets its status; a client never sees a trace
            code, message = status_for(exc)
            if is_rejection(code):
                self.rejected.add()
            raise seldon_error(code, message) from None
        metrics = self._request_metrics(answer)
        if is_proto:
            return _proto_answer(answer.body, answer.identity, metrics, compact)
        payload = {"strData": json.dumps(answer.body)} if compact else {"jsonData": answer.body}
        return {**payload, "meta": {"tags": answer.identity, "metrics": metrics}}

    def answer(self, json_data: Any, bin_data: bytes | None, tags: dict) -> Answer:
        """A request's answer; a graph's index shard reads the embedder's message instead (IndexShard)."""
        self.service.serving()  # not ready: 503 for any request, a malformed one too, before its query is read
        return self.service.answer(query_of(json_data, bin_data, tags))

    def health_status(self) -> dict:
        if not self.service.ready:
            raise SeldonMicroserviceException(f"not ready: {self.service.load_error or 'loading'}",
                                              status_code=503, reason="NOT_READY")
        return {"ready": True, **self.service.versions()}

    def tags(self) -> dict:
        return self.service.versions()

    def metrics(self) -> list[dict]:
        """Called by Seldon on health checks: flushes rejected-request counts and reports the index size."""
        return [{"type": "GAUGE", "key": INDEX_SIZE, "value": self.service.index_size}, *self._rejected()]

    def _rejected(self) -> list[dict]:
        # A rejected request raises before any response carries metrics, so its count waits for the next one.
        rejected = self.rejected.drain()
        return [_seldon_metric(Metric(COUNTER, REJECTED, rejected))] if rejected else []

    def _request_metrics(self, answer: Answer) -> list[dict]:
        # Seldon takes TIMER values in milliseconds and exports them to Prometheus in seconds. Each metric is
        # an IPC round trip to Seldon's metrics manager, so the index-size gauge is left to health checks.
        return [_seldon_metric(m) for m in metrics_of(answer)] + self._rejected()

    def init_metadata(self) -> dict:
        # Seldon calls this once before load(); the adapter answers /metadata from it on every call instead
        # (see _live_metadata), so the name, version and index checksum are the loaded bundle's.
        identity = self.service.versions()
        return {
            "name": identity.get("model_name") or "imgsim",
            "versions": [identity.get("model_version") or identity.get("model_sha256") or "not-loaded"],
            "platform": "seldon", "custom": {"ready": str(self.service.ready).lower(), "runtime": self.service.cfg.runtime,
                                             **identity}, "inputs": [
                {"messagetype": "binData"},
                {"messagetype": "jsonData", "schema": {"type": "object", "properties": {
                    "image": {"type": "string"}, "images": {"type": "array"}, "path": {"type": "string"},
                    "id": {"type": "integer"}, "k": {"type": "integer"}}}}],
            "outputs": [{"messagetype": "jsonData", "schema": {"type": "object", "properties": {
                "results": {"type": "array"}, "model_version": {"type": "string"}}}}],
        }

    def _live_metadata(self) -> dict | None:
        return seldon_methods.init_metadata(self)


def _survive_sighup() -> None:
    """Seldon builds this object in its main process and then forks the gRPC server: a SIGHUP sent to the whole
    process group (to move every worker to the newest gallery) would end that gRPC parent, whose default
    action is to exit. Ignored here, inherited by the forks; gunicorn's master installs its own HUP handler
    (graceful worker reload) and each serving worker its own (load() -> switch to the newest version)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _compact(tags: dict) -> bool:
    """``meta.tags.format``: json (default, the answer as jsonData) or compact (the same answer as a JSON string
    in strData: over gRPC a protobuf Struct costs ~2 ms to serialise and parse in pure Python, a string nothing)."""
    form = tags.get("format", "json")
    if form not in ("json", "compact"):
        raise BadInput(f"meta.tags.format must be 'json' or 'compact', got {str(form)[:40]!r}")
    return form == "compact"


def _proto_answer(answer: dict, tags: dict[str, str], metrics: list[dict], compact: bool) -> prediction_pb2.SeldonMessage:
    """The gRPC reply built field by field, which is cheaper than parsing a dict into the message. A compact
    reply leaves out meta.tags: the answer itself carries the same model and index identity."""
    message = prediction_pb2.SeldonMessage(strData=json.dumps(answer)) if compact else \
        json_to_seldon_message({"jsonData": answer})
    for key, value in ({} if compact else tags).items():
        message.meta.tags[key].string_value = value
    for metric in metrics:
        message.meta.metrics.add(key=metric["key"], type=prediction_pb2.Metric.MetricType.Value(metric["type"]),
                                 value=metric["value"])
    return message


def _seldon_metric(metric: Metric) -> dict:
    """A metric as meta.metrics carries it; Seldon exports a counter under its key as given, so the key has _total."""
    key = f"{metric.name}_total" if metric.kind == COUNTER else metric.name
    return {"type": metric.kind.upper(), "key": key, "value": metric.value}


def seldon_error(code: int, message: str) -> SeldonMicroserviceException:
    """A status from ``status_for`` as Seldon answers it (REST: the status; gRPC: imgsim.serve.seldon maps it)."""
    return SeldonMicroserviceException(message, status_code=code, reason=REASONS.get(code, "INTERNAL_ERROR"))


def _parse_rest(request: Any) -> tuple[Any, bytes | None, dict]:
    if not isinstance(request, dict):
        raise BadInput("the body must be a JSON object with binData or jsonData")
    meta = request.get("meta")
    tags = meta.get("tags") if isinstance(meta, dict) else None
    bin_data = request.get("binData")
    # Seldon passes a multipart file as base64 bytes and a JSON binData as a base64 string.
    bin_data = None if bin_data is None else inputs.decode_base64(bin_data, "binData")
    return request.get("jsonData"), bin_data, tags if isinstance(tags, dict) else {}


def _parse_proto(request: prediction_pb2.SeldonMessage) -> tuple[Any, bytes | None, dict]:
    kind = request.WhichOneof("data_oneof")
    try:
        tags = json_format.MessageToDict(request.meta).get("tags", {})
        if kind == "binData":
            return None, request.binData, tags
        if kind == "jsonData":
            return json_format.MessageToDict(request.jsonData), None, tags
    except (ValueError, json_format.Error):  # protobuf's Value holds inf and NaN, which JSON cannot
        raise BadInput("jsonData and meta.tags must hold finite numbers only") from None
    raise BadInput("send an image as binData, or jsonData with one of image, images, path or id")


def query_of(json_data: Any, bin_data: bytes | None, tags: dict) -> Query:
    """The query a v1 request asks: an image as binData, or jsonData with one of image (base64), images (base64
    list), path or id; k, labels and exclude_ids from jsonData, else from meta.tags (where a binData query has them)."""
    fields = json_data if isinstance(json_data, dict) else {}
    raw_k = fields.get("k") if fields.get("k") is not None else tags.get("k")
    k = None if raw_k is None else inputs.integer(raw_k, "k")
    source = fields if "labels" in fields or "exclude_ids" in fields else tags
    where = filters_of(source.get("labels"), source.get("exclude_ids"))
    if bin_data is not None:
        return Query(k, where, images=[bin_data])
    if not isinstance(json_data, dict):
        raise BadInput("send an image as binData, or jsonData with one of image, images, path or id")
    forms = [key for key in ("image", "images", "path", "id") if key in json_data]
    if len(forms) != 1:
        raise BadInput("jsonData needs exactly one of 'image' (base64), 'images' (list of base64), 'path' or 'id'")
    if forms == ["id"]:
        return Query(k, where, id=inputs.integer(json_data["id"], "id"))
    if forms == ["path"]:  # null: refused where any bad path is, after "path queries are disabled"
        return Query(k, where, path="" if json_data["path"] is None else json_data["path"])
    if forms == ["image"]:  # decoded as it is read, so imgsim_decode_seconds counts its base64 too
        return Query(k, where, images=Encoded([json_data["image"]], lambda b, i: inputs.decode_base64(b, "image")))
    batch = json_data["images"]
    if not isinstance(batch, list) or not batch:
        raise BadInput("'images' must be a non-empty list of base64 strings")
    return Query(k, where, images=Encoded(batch, lambda b, i: inputs.decode_base64(b, f"images[{i}]")))


def _error_blueprint(limit: int, metadata: Callable[[], dict | None]) -> Blueprint:
    """Seldon registers this on its Flask app: a body-size limit, HTTP errors as JSON with their own code, and
    /metadata answered from the loaded bundle (Seldon's own route serves what it saw before load())."""
    blueprint = Blueprint("imgsim_errors", __name__)
    blueprint.record_once(lambda state: state.app.config.update(MAX_CONTENT_LENGTH=limit))

    @blueprint.before_app_request
    def _live_metadata():
        if request.method == "GET" and request.path in ("/metadata", "/api/v1.0/metadata"):
            data = metadata()
            if data is None:
                abort(500, "model metadata failed validation; see the server log")
            return jsonify(data)
        return None

    @blueprint.before_app_request
    def _limit_chunked_body():
        # MAX_CONTENT_LENGTH only sees a Content-Length header; gunicorn hands Werkzeug a chunked body as an
        # unbounded stream. Read at most one byte past the limit, then serve the rest from memory.
        env = request.environ
        if env.get("CONTENT_LENGTH") or not env.get("wsgi.input_terminated"):
            return
        body = env["wsgi.input"].read(limit + 1)
        if len(body) > limit:
            abort(413)
        env["wsgi.input"], env["CONTENT_LENGTH"] = io.BytesIO(body), str(len(body))

    @blueprint.before_app_request
    def _parsable_json():
        # Seldon parses the body itself and answers a RecursionError (JSON nested past the interpreter's stack) as
        # a 500. Parsed here first: Flask keeps the result, so Seldon's own get_json() does not parse it again.
        if request.method != "POST":
            return
        try:
            if request.is_json:
                request.get_json(silent=True)
            for key in ("json", *[k for k in request.form if k not in ("json", "strData")]):
                text = request.form.get(key) or (request.args.get(key) if key == "json" else None)
                if text:
                    json.loads(text)
        except RecursionError:
            abort(400, "the request's JSON is nested too deeply")
        except ValueError:
            pass  # Seldon's own message says what is wrong with it

    @blueprint.app_errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        # Without this, Seldon's catch-all handler turns 404/405/413 into 500s.
        body = {"status": {"status": 1, "code": exc.code, "reason": exc.name, "info": exc.description}}
        return jsonify(body), exc.code

    return blueprint


seldon_compat.install()
