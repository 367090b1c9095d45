"""Open Inference Protocol (KServe V2) adapter: an MLServer runtime over the same similarity service as the Seldon v1
wrapper (model_server/ModelServer.py): the same bundle, limits, validation and answers. Here, and only here, a v2
request becomes a ``Query`` (``query_of``) and the service's ``Answer`` typed tensors (``_response``).

Request: one input tensor, ``images`` (BYTES, one element per encoded image: raw bytes over gRPC, base64 strings
in REST JSON), ``id`` (INT64, a gallery id) or ``path`` (BYTES, a gallery path under gallery_root); request
parameters ``k``, ``labels``, ``exclude_ids``, ``format``. Response: ``ids`` (INT64), ``scores`` (FP32, cosine
similarity) and ``labels`` (BYTES), each [queries, k] with id -1 where a query has fewer neighbours; ``predicted``
(BYTES, [queries]); with ``format`` "json" also ``answer`` (BYTES, [1]: the v1 server's JSON answer); response
parameters name the model and gallery version. Runs in its own environment (requirements-serve-v2.txt: MLServer
needs protobuf >= 5).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import imgsim_v2_metrics as metrics  # a module of its own: see there
from mlserver import MLModel
from mlserver.errors import MLServerError
from mlserver.types import (InferenceRequest, InferenceResponse, MetadataModelResponse, MetadataTensor, Parameters,
                            ResponseOutput)

from imgsim.errors import BadInput
from imgsim.serve import inputs
from imgsim.serve.inputs import short
from imgsim.serve.query import Answer, Encoded, Query, filters_of, is_rejection, status_for
from imgsim.serve.service import SimilarityService
from imgsim.serve.settings import ServiceConfig

log = logging.getLogger(__name__)
QUERY_INPUTS = ("images", "id", "path")
FORMATS = ("tensors", "json")  # request parameter "format": "json" adds the v1 server's JSON answer as "answer"
# What a client discovers at /v2/models/imgsim: one of the inputs per request; -1 where a size varies.
INPUTS = [MetadataTensor(name="images", datatype="BYTES", shape=[-1]),
          MetadataTensor(name="id", datatype="INT64", shape=[1]),
          MetadataTensor(name="path", datatype="BYTES", shape=[1])]
OUTPUTS = [MetadataTensor(name="ids", datatype="INT64", shape=[-1, -1]),
           MetadataTensor(name="scores", datatype="FP32", shape=[-1, -1]),
           MetadataTensor(name="labels", datatype="BYTES", shape=[-1, -1]),
           MetadataTensor(name="predicted", datatype="BYTES", shape=[-1]),
           MetadataTensor(name="answer", datatype="BYTES", shape=[1])]


class ImgsimRuntime(MLModel):
    """Top-k image similarity over the Open Inference Protocol; ready once the bundle is loaded and verified."""

    service: SimilarityService | None = None

    @property
    def ready(self) -> bool:
        """The service's own readiness, read on every check: MLServer stores load()'s result once, but a bundle
        that was not there at start is loaded later by the service's retries (and a bad one never is)."""
        return self.service is not None and self.service.ready

    @ready.setter
    def ready(self, value: bool) -> None:
        pass  # MLServer's assignments; the loaded bundle decides

    async def load(self) -> bool:
        extra = (self.settings.parameters.extra if self.settings.parameters else None) or {}
        self.service = SimilarityService(ServiceConfig.from_sources(**extra))
        metrics.index_size.set_function(lambda: self.service.index_size if self.service is not None else 0.0)
        await asyncio.get_running_loop().run_in_executor(None, self.service.load)
        if not self.service.ready:  # kept registered and not ready, with the reason in the log (retried if it may pass)
            log.error("imgsim: NOT READY: %s", self.service.load_error)
        return self.service.ready

    async def unload(self) -> bool:
        """Stop following the gallery and remove this server's downloads (MLServer calls it on shutdown)."""
        if self.service is not None:
            self.service.close()
        return True

    async def metadata(self) -> MetadataModelResponse:
        """MLServer's metadata, with the model and gallery identity of the version serving now in its parameters
        (what the v1 server's /health/status answers; the search page shows it)."""
        meta = await super().metadata()
        meta.inputs, meta.outputs = INPUTS, OUTPUTS
        meta.parameters = Parameters(**(self.service.versions() if self.service is not None else {}))
        return meta

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        try:
            params = _params(payload.parameters)
            fmt = params.pop("format", "tensors")
            if fmt not in FORMATS:
                raise BadInput(f"parameter 'format' must be one of {', '.join(FORMATS)}, got {short(fmt)}")
            wanted = _requested(payload)
            # Reading the query, decoding and embedding off the event loop: health checks and other requests go on.
            answer = await asyncio.get_running_loop().run_in_executor(None, self._answer, payload, params)
        except Exception as exc:  # noqa: BLE001 - each gets its status; a client never sees a trace
            code, message = status_for(exc)
            if is_rejection(code):
                metrics.rejected.labels(self.name).inc()
            raise MLServerError(message, code) from None
        metrics.record(self.name, answer)  # the v1 server's metrics, on MLServer's endpoint
        return _response(self.name, answer, with_json=fmt == "json", wanted=wanted)

    def _answer(self, payload: InferenceRequest, params: dict) -> Answer:
        self.service.serving()  # not ready: 503 for any request, a malformed one too, before its query is read
        return self.service.answer(query_of(payload, params))


def query_of(payload: InferenceRequest, params: dict) -> Query:
    """The query a v2 request asks: one input tensor, ``images`` (encoded images), ``id`` or ``path``; request
    parameters ``k``, ``labels`` and ``exclude_ids``. The service checks them against its limits."""
    k = None if params.get("k") is None else inputs.integer(params["k"], "k")
    where = filters_of(params.get("labels"), params.get("exclude_ids"))
    given = [i for i in payload.inputs if i.name in QUERY_INPUTS]
    if len(given) != 1 or len(payload.inputs) != 1:
        raise BadInput(f"send exactly one input tensor, one of {', '.join(QUERY_INPUTS)} (got "
                       f"{short([i.name for i in payload.inputs])})")
    tensor = given[0]
    elements = tensor.data.root if tensor.data is not None else None
    if not isinstance(elements, list) or not elements:
        raise BadInput(f"input '{tensor.name}' needs a non-empty list of data")
    base64_bytes = _params(tensor.parameters).get("content_type") == "base64"
    if tensor.name == "images":
        return Query(k, where, images=Encoded(elements, lambda e, i: _image(e, i, base64_bytes)))
    if len(elements) != 1:  # before any is decoded: a long tensor is refused at the cost of its length
        raise BadInput(f"input '{tensor.name}' takes one gallery {tensor.name}")
    element = inputs.decode_base64(elements[0], tensor.name) if base64_bytes else elements[0]  # (binary tensors)
    if tensor.name == "id":
        return Query(k, where, id=inputs.integer(element, "id"))
    return Query(k, where, path=_text(element, "path"))


def _params(parameters: Parameters | None) -> dict:
    """Request or tensor parameters as a dict. gRPC parameters hold scalars only, so ``labels`` and
    ``exclude_ids`` may come as a JSON list in a string there ('["bag", "shirt"]')."""
    if parameters is None:
        return {}
    params = dict(parameters.model_extra or {})
    if parameters.content_type:
        params["content_type"] = parameters.content_type
    for key in ("labels", "exclude_ids"):
        if isinstance(params.get(key), str):
            try:
                params[key] = json.loads(params[key])
            except (ValueError, RecursionError):  # RecursionError: nesting deeper than the interpreter's stack
                raise BadInput(f"parameter '{key}' must be a list, or a JSON list in a string") from None
    return params


def _requested(payload: InferenceRequest) -> list[str] | None:
    """The output names the request asks for, in its order; None: all."""
    if not payload.outputs:
        return None
    names = [o.name for o in payload.outputs]
    known = [o.name for o in OUTPUTS]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BadInput(f"unknown output {short(unknown[0])}; this model's outputs are {', '.join(known)}")
    return names


def _image(element: Any, i: int, base64_bytes: bool) -> bytes:
    """An image element: raw bytes (gRPC), or base64 text (REST JSON cannot carry bytes; or content_type base64)."""
    if isinstance(element, bytes) and not base64_bytes:
        return element
    return inputs.decode_base64(element, f"images[{i}]")


def _text(element: Any, name: str) -> str:
    if isinstance(element, bytes):
        try:
            return element.decode()
        except UnicodeDecodeError:
            raise BadInput(f"'{name}' must be UTF-8 text") from None
    if not isinstance(element, str):
        raise BadInput(f"'{name}' must be a string")
    return element


def _response(model_name: str, answer: Answer, with_json: bool, wanted: list[str] | None = None) -> InferenceResponse:
    results = answer.body["results"]
    width = max((len(r["neighbours"]) for r in results), default=0)
    ids = [[n["id"] for n in r["neighbours"]] + [-1] * (width - len(r["neighbours"])) for r in results]
    scores = [[n["score"] for n in r["neighbours"]] + [0.0] * (width - len(r["neighbours"])) for r in results]
    # BYTES elements as bytes: gRPC's bytes_contents takes nothing else; REST's JSON writes them as UTF-8 strings.
    labels = [[n["label"].encode() for n in r["neighbours"]] + [b""] * (width - len(r["neighbours"])) for r in results]
    predicted = [(r["predicted"] or {}).get("label", "").encode() for r in results]
    shape = [len(results), width]
    flat = [x for row in ids for x in row], [x for row in scores for x in row], [x for row in labels for x in row]
    outputs = [ResponseOutput(name="ids", datatype="INT64", shape=shape, data=flat[0]),
               ResponseOutput(name="scores", datatype="FP32", shape=shape, data=flat[1]),
               ResponseOutput(name="labels", datatype="BYTES", shape=shape, data=flat[2]),
               ResponseOutput(name="predicted", datatype="BYTES", shape=[len(results)], data=predicted)]
    if with_json or (wanted and "answer" in wanted):
        outputs.append(ResponseOutput(name="answer", datatype="BYTES", shape=[1], data=[json.dumps(answer.body).encode()],
                                      parameters=Parameters(content_type="str")))
    if wanted is not None:
        by_name = {o.name: o for o in outputs}
        outputs = [by_name[name] for name in dict.fromkeys(wanted)]
    return InferenceResponse(model_name=model_name, parameters=Parameters(**answer.identity), outputs=outputs)
