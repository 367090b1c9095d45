"""Seldon Core v1 adapter: turn REST/gRPC messages into imgsim service calls and back."""

from __future__ import annotations

import io
import json
import logging
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

from imgsim.errors import BadInput, ImgsimError
from imgsim.serve import seldon as seldon_compat
from imgsim.serve.inputs import decode_base64
from imgsim.serve.service import SimilarityService
from imgsim.serve.settings import ServiceConfig

log = logging.getLogger(__name__)


class ModelServer:
    """Top-k image similarity over Seldon's protocols; configuration only here, loading in ``load()``."""

    service_class: type[SimilarityService] = SimilarityService
    compact_answers = True  # meta.tags.format=compact may ask for the answer as a JSON string (see _compact)

    def __init__(self, **params: Any) -> None:
        """``params``: the SeldonDeployment graph's parameters, any of ServiceConfig's settings (checked there:
        an unknown name or a bad value stops the server with a message naming it)."""
        self.service = self.service_class(ServiceConfig.from_sources(**params))
        _survive_sighup()
        self.model_error_handler = _error_blueprint(self.service.cfg.max_request_bytes, self._live_metadata)

    def load(self) -> None:
        self.service.load()

    def predict_raw(self, request: Any) -> Any:
        is_proto = isinstance(request, prediction_pb2.SeldonMessage)
        try:
            json_data, bin_data, tags = _parse_proto(request) if is_proto else _parse_rest(request)
            compact = _compact(tags) and self.compact_answers
            answer, timings = self.service.handle(json_data, bin_data, tags)
        except BadInput as exc:
            self.service.rejected.add()
            raise SeldonMicroserviceException(str(exc), status_code=400, reason="BAD_REQUEST") from None
        except ImgsimError as exc:
            raise SeldonMicroserviceException(str(exc), status_code=503, reason="NOT_READY") from None
        except Exception:  # noqa: BLE001 - the client gets a generic message; the log keeps the trace
            log.exception("imgsim: unexpected failure while answering a request")
            raise SeldonMicroserviceException("internal error; see the server log", status_code=500,
                                              reason="INTERNAL_ERROR") from None
        metrics = self._request_metrics(answer, timings)
        # The version that answered (not the newest); a graph node's answer also holds its message's fields.
        tags = {k: v for k, v in answer.items() if isinstance(v, str)}
        if is_proto:
            return _proto_answer(answer, tags, metrics, compact)
        payload = {"strData": json.dumps(answer)} if compact else {"jsonData": answer}
        return {**payload, "meta": {"tags": tags, "metrics": metrics}}

    def health_status(self) -> dict:
        if not self.service.ready:
            raise SeldonMicroserviceException(f"not ready: {self.service.load_error or 'loading'}",
                                              status_code=503, reason="NOT_READY")
        return {"ready": True, **self.service.versions()}

    def tags(self) -> dict:
        return self.service.versions()

    def metrics(self) -> list[dict]:
        """Called by Seldon on health checks: flushes rejected-request counts and reports the index size."""
        gauge = {"type": "GAUGE", "key": "imgsim_index_size",
                 "value": float(self.service.versions().get("index_size") or 0)}  # a shard's own, an embedder's all
        return [gauge, *self._rejected()]

    def _rejected(self) -> list[dict]:
        # A rejected request raises before any response carries metrics, so its count waits for the next one.
        rejected = self.service.rejected.drain()
        return [{"type": "COUNTER", "key": "imgsim_rejected_requests_total", "value": rejected}] if rejected else []

    def _request_metrics(self, answer: dict, timings: dict) -> list[dict]:
        # Seldon takes TIMER values in milliseconds and exports them to Prometheus in seconds. Each metric is
        # an IPC round trip to Seldon's metrics manager, so the index-size gauge is left to health checks.
        metrics = [{"type": "TIMER", "key": f"imgsim_{name.removesuffix('_ms')}_seconds", "value": value}
                   for name, value in timings.items()]
        metrics.append({"type": "COUNTER", "key": "imgsim_queries_total", "value": len(answer["results"])})
        return metrics + self._rejected()

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


def _parse_rest(request: Any) -> tuple[Any, bytes | None, dict]:
    if not isinstance(request, dict):
        raise BadInput("the body must be a JSON object with binData or jsonData")
    meta = request.get("meta")
    tags = meta.get("tags") if isinstance(meta, dict) else None
    bin_data = request.get("binData")
    # Seldon passes a multipart file as base64 bytes and a JSON binData as a base64 string.
    bin_data = None if bin_data is None else decode_base64(bin_data, "binData")
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


def _error_blueprint(max_request_bytes: int, metadata: Callable[[], dict | None]) -> Blueprint:
    """Seldon registers this on its Flask app: a body-size limit, HTTP errors as JSON with their own code, and
    /metadata answered from the loaded bundle (Seldon's own route serves what it saw before load())."""
    blueprint = Blueprint("imgsim_errors", __name__)
    blueprint.record_once(lambda state: state.app.config.update(MAX_CONTENT_LENGTH=max_request_bytes))

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
        body = env["wsgi.input"].read(max_request_bytes + 1)
        if len(body) > max_request_bytes:
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
