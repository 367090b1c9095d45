"""Query a running imgsim server over REST or gRPC, print a neighbour table, optionally draw the result."""

from __future__ import annotations

import json
from pathlib import Path

import requests

from imgsim.errors import ImgsimError


def query_rest(url: str, image: bytes, k: int, timeout: float = 30.0) -> dict:
    """POST the raw image as Seldon ``binData`` (multipart) with ``k`` in ``meta.tags``; returns jsonData."""
    try:
        response = requests.post(f"{url.rstrip('/')}/api/v1.0/predictions", timeout=timeout,
                                 files={"binData": ("query", image)}, data={"meta": f'{{"tags": {{"k": {k}}}}}'})
    except requests.RequestException as exc:
        raise ImgsimError(f"cannot reach the server at {url}: {exc}") from None
    body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    if response.status_code != 200:
        info = body.get("status", {}).get("info", response.text[:200])
        raise ImgsimError(f"server answered {response.status_code}: {info}")
    return body["jsonData"]


def query_grpc(address: str, image: bytes, k: int, timeout: float = 30.0) -> dict:
    """Call ``seldon.protos.Model/Predict`` with ``binData``, asking for the compact answer (a JSON string in
    strData, cheap to parse); returns the answer as jsonData would carry it."""
    import grpc
    from seldon_core.proto import prediction_pb2, prediction_pb2_grpc

    message = prediction_pb2.SeldonMessage(binData=image)
    message.meta.tags["k"].number_value = k
    message.meta.tags["format"].string_value = "compact"
    with grpc.insecure_channel(address) as channel:
        try:
            reply = prediction_pb2_grpc.ModelStub(channel).Predict(message, timeout=timeout)
        except grpc.RpcError as exc:
            raise ImgsimError(f"gRPC {exc.code().name} from {address}: {exc.details()}") from None
    return json.loads(reply.strData)


def format_table(name: str, answer: dict) -> str:
    """A readable neighbour table for one query."""
    result = answer["results"][0]
    predicted = result.get("predicted")
    guess = f"predicted {predicted['label']} (p={predicted['probability']:.3f})" if predicted else "no classes"
    lines = [f"{name}: {guess}; "
             f"model {answer.get('model_name', '?')} v{answer.get('model_version', '?')}, "
             f"index of {answer.get('index_size', '?')} images",
             f"  {'rank':>4}  {'id':>7}  {'label':<14} {'score':>7}  path"]
    lines += [f"  {n['rank']:>4}  {n['id']:>7}  {n['label']:<14} {n['score']:>7.4f}  {n['path']}"
              for n in result["neighbours"]]
    return "\n".join(lines)


def draw(query: bytes, answer: dict, gallery_root: str | None, out: Path) -> Path:
    """The query beside its neighbours (neighbour images need the gallery folder on this machine)."""
    from PIL import Image

    from imgsim import plots
    from imgsim.images import decode_image

    result = answer["results"][0]
    neighbours = []
    for n in result["neighbours"]:
        path = Path(gallery_root or "") / n["path"]
        img = decode_image(path.read_bytes()) if gallery_root and path.is_file() else Image.new("L", (28, 28), 128)
        neighbours.append((img, n["label"], n["distance"]))
    label = (result.get("predicted") or {}).get("label", "query")
    return plots.neighbour_grid([(decode_image(query), label, neighbours)], out)
