"""The two REST protocols an imgsim server speaks, seen from a client (`imgsim query`, the search page):
Seldon's v1 protocol (model_server/ModelServer.py) and the Open Inference Protocol (model_server/v2, MLServer).

Each says where to ask, how to put a query, and how to read the answer, the server's identity and its
refusals; both hand back the same JSON answer (``results`` with ``neighbours``, plus the model and gallery
identity), so what is built on it does not care which server it talks to.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

from imgsim.errors import ImgsimError

PROTOCOLS = ("seldon", "v2")
DEFAULT_V2_MODEL = "imgsim"  # model_server/v2/model-settings.json's name (the chart's graph node in a cluster)


@dataclasses.dataclass(frozen=True)
class Seldon:
    """Seldon Core's v1 protocol: ``/api/v1.0/predictions``, the answer in ``jsonData``."""

    name = "seldon"
    ready_path = "/health/status"
    predict_path = "/api/v1.0/predictions"

    def image_body(self, image: bytes, tags: dict) -> dict:
        return {"binData": base64.b64encode(image).decode(), "meta": {"tags": tags}}

    def upload(self, image: bytes, tags: dict) -> dict:
        """The image as ``requests.post`` arguments: a multipart ``binData`` upload (no base64 growth)."""
        return {"files": {"binData": ("query", image)}, "data": {"meta": json.dumps({"tags": tags})}}

    def id_body(self, item_id: int, tags: dict) -> dict:
        return {"jsonData": {"id": item_id, **tags}}

    def answer(self, body: dict) -> dict | None:
        answer = body.get("jsonData")
        return answer if isinstance(answer, dict) else None

    def identity(self, body: dict) -> dict:
        """The ready answer's model and gallery identity."""
        identity = body.get("jsonData", body)
        return identity if isinstance(identity, dict) else {}

    def refusal(self, body: dict) -> str:
        status = body.get("status")
        return str(status.get("info", "")) if isinstance(status, dict) else ""


@dataclasses.dataclass(frozen=True)
class OpenInference:
    """The Open Inference Protocol (KServe V2) of model_server/v2: ``/v2/models/<model>/infer`` with an
    ``images`` or ``id`` tensor, asking for the JSON answer (``format: json``) beside the typed tensors."""

    model: str = DEFAULT_V2_MODEL
    name = "v2"

    @property
    def ready_path(self) -> str:
        return f"/v2/models/{self.model}/ready"

    @property
    def predict_path(self) -> str:
        return f"/v2/models/{self.model}/infer"

    @property
    def metadata_path(self) -> str:
        return f"/v2/models/{self.model}"

    def image_body(self, image: bytes, tags: dict) -> dict:
        return {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                            "data": [base64.b64encode(image).decode()], "parameters": {"content_type": "base64"}}],
                "parameters": {**tags, "format": "json"}}

    def id_body(self, item_id: int, tags: dict) -> dict:
        return {"inputs": [{"name": "id", "datatype": "INT64", "shape": [1], "data": [item_id]}],
                "parameters": {**tags, "format": "json"}}

    def upload(self, image: bytes, tags: dict) -> dict:
        """The image as ``requests.post`` arguments: the JSON body (the protocol's REST has no multipart)."""
        return {"json": self.image_body(image, tags)}

    def answer(self, body: dict) -> dict | None:
        outputs = body.get("outputs")
        found = [o for o in outputs if isinstance(o, dict) and o.get("name") == "answer"] if isinstance(outputs, list) \
            else []
        if not found or not isinstance(found[0].get("data"), list) or not found[0]["data"]:
            return None
        try:
            answer = json.loads(found[0]["data"][0])
        except (TypeError, ValueError):
            return None
        return answer if isinstance(answer, dict) else None

    def identity(self, body: dict) -> dict:
        """The model metadata's parameters (the runtime puts the model and gallery identity there)."""
        params = body.get("parameters")
        return {k: v for k, v in params.items() if k != "content_type"} if isinstance(params, dict) else {}

    def refusal(self, body: dict) -> str:
        return str(body.get("error", ""))


def protocol(name: str, model: str = DEFAULT_V2_MODEL) -> Seldon | OpenInference:
    if name == "seldon":
        return Seldon()
    if name == "v2":
        return OpenInference(model)
    raise ImgsimError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {name!r}")


def json_body(response: Any) -> dict:
    """A response's JSON object, or {} when it has none."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
