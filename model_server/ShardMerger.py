"""A sharded gallery's COMBINER node (see imgsim.serve.graph): merge the shards' top-k into one answer."""

from __future__ import annotations

import logging
from typing import Any

from google.protobuf import json_format
from ModelServer import _error_blueprint, _proto_answer
from seldon_core.flask_utils import SeldonMicroserviceException
from seldon_core.proto import prediction_pb2

from imgsim.errors import BadInput, ImgsimError
from imgsim.serve.graph import Merger
from imgsim.serve.settings import ServiceConfig

log = logging.getLogger(__name__)


class ShardMerger:
    """Holds no bundle; ``shards`` (a graph parameter) is how many shard answers each query must have."""

    def __init__(self, **params: Any) -> None:
        cfg = ServiceConfig.from_sources(**params)
        self.merger = Merger.from_config(cfg)
        self.model_error_handler = _error_blueprint(cfg.max_request_bytes, self.init_metadata)

    def aggregate_raw(self, request: Any) -> Any:
        is_proto = isinstance(request, prediction_pb2.SeldonMessageList)
        try:
            answers = [json_format.MessageToDict(m.jsonData) for m in request.seldonMessages] if is_proto else \
                _rest_answers(request)
            answer = self.merger.merge(answers)
        except BadInput as exc:
            raise SeldonMicroserviceException(str(exc), status_code=400, reason="BAD_REQUEST") from None
        except ImgsimError as exc:  # a shard missing or twice, or shards of different galleries: the deployment
            log.error("imgsim merger: %s", exc)
            raise SeldonMicroserviceException(str(exc), status_code=503, reason="NOT_READY") from None
        except Exception:  # noqa: BLE001 - the client gets a generic message; the log keeps the trace
            log.exception("imgsim merger: unexpected failure while merging")
            raise SeldonMicroserviceException("internal error; see the merger's log", status_code=500,
                                              reason="INTERNAL_ERROR") from None
        tags = {k: v for k, v in answer.items() if isinstance(v, str)}
        if is_proto:
            return _proto_answer(answer, tags, [], compact=False)
        return {"jsonData": answer, "meta": {"tags": tags}}

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
