"""A sharded gallery's COMBINER node (see imgsim.serve.graph): merge the shards' top-k into one answer."""

from __future__ import annotations

import logging
from typing import Any

from flask import jsonify
from google.protobuf import json_format
from ModelServer import _error_blueprint, _proto_answer, seldon_error
from seldon_core.proto import prediction_pb2

from imgsim.errors import BadInput
from imgsim.serve.graph import Merger, ShardAnswerError
from imgsim.serve.limits import body_limit
from imgsim.serve.query import identity_of, status_for
from imgsim.serve.settings import ServiceConfig

log = logging.getLogger(__name__)


class ShardMerger:
    """Holds no bundle; ``shards`` (a graph parameter) is how many shard answers each query must have."""

    def __init__(self, **params: Any) -> None:
        cfg = ServiceConfig.from_sources(**params)
        # Its one body carries every shard's answer, each within what a node accepts.
        self.merger, self.body_limit = Merger.from_config(cfg), body_limit(cfg, messages=cfg.shards)
        self.model_error_handler = _error_blueprint(self.body_limit, self.init_metadata)
        self.model_error_handler.app_errorhandler(413)(self._answers_too_large)

    def aggregate_raw(self, request: Any) -> Any:
        is_proto = isinstance(request, prediction_pb2.SeldonMessageList)
        try:
            answers = _proto_answers(request) if is_proto else _rest_answers(request)
            answer = self.merger.merge(answers)
        except Exception as exc:  # noqa: BLE001 - each gets its status; a client never sees a trace
            # 400: a body that is no SeldonMessageList (the caller's fault); 502: a shard's unusable answer; 503: a
            # shard missing or twice, or shards of different galleries (the deployment's fault).
            code, message = status_for(exc, "the merger's log")
            if code in (502, 503):
                log.error("imgsim merger: %s", message)
            raise seldon_error(code, message) from None
        tags = identity_of(answer)
        if is_proto:
            return _proto_answer(answer, tags, [], compact=False)
        return {"jsonData": answer, "meta": {"tags": tags}}

    def _answers_too_large(self, _exc: Exception):
        # The executor wrote this body from the shards' answers: too large is a shard's fault, not the client's.
        info = (f"the shards' answers exceed the merger's limit of {self.body_limit} bytes (max_request_bytes x "
                "shards): a shard answered far more than k neighbours per query")
        log.error("imgsim merger: %s", info)
        return jsonify({"status": {"status": 1, "code": 502, "reason": "BAD_GATEWAY", "info": info}}), 502

    def health_status(self) -> dict:
        return {"ready": True, "shards": self.merger.shards}

    def init_metadata(self) -> dict:
        return {"name": "imgsim-merger", "versions": [f"{self.merger.shards}-shards"], "platform": "seldon",
                "inputs": [{"messagetype": "jsonData"}], "outputs": [{"messagetype": "jsonData"}]}


def _rest_answers(request: Any) -> list[Any]:
    messages = request.get("seldonMessages") if isinstance(request, dict) else None
    if not isinstance(messages, list):
        raise BadInput("the body must be a SeldonMessageList: {\"seldonMessages\": [...]}, one per shard")
    return [m.get("jsonData") if isinstance(m, dict) else None for m in messages]


def _proto_answers(request: prediction_pb2.SeldonMessageList) -> list[Any]:
    answers = []
    for i, message in enumerate(request.seldonMessages):
        try:
            answers.append(json_format.MessageToDict(message.jsonData))
        except (ValueError, json_format.Error):  # protobuf refuses to write a NaN or infinite number_value as JSON
            raise ShardAnswerError(f"message {i} of {len(request.seldonMessages)} holds a number that is not "
                                   "finite: not an index shard's answer") from None
    return answers
