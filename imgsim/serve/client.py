"""Query a running imgsim server over REST or gRPC, print a neighbour table, optionally draw the result."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import requests

from imgsim.errors import ImgsimError
from imgsim.serve.protocols import OpenInference, Seldon, json_body


def wait_ready(url: str, timeout_s: float = 120.0, pid: int | None = None, log: str = "",
               proto: Seldon | OpenInference = Seldon()) -> float:
    """Poll the server's readiness (``/health/status``, or the v2 model's ``ready``) until it answers 200;
    returns the seconds waited. Stops early with an error if ``pid`` (the server process) has exited, pointing
    at ``log``."""
    see = f"; see {log}" if log else ""
    start = time.monotonic()
    while True:
        if pid is not None and not _alive(pid):
            raise ImgsimError(f"the server (pid {pid}) exited before it was ready{see}")
        try:
            if requests.get(f"{url.rstrip('/')}{proto.ready_path}", timeout=2).status_code == 200:
                return time.monotonic() - start
        except requests.RequestException:
            pass  # not listening yet
        if time.monotonic() - start > timeout_s:
            raise ImgsimError(f"the server at {url} was not ready after {timeout_s:g} s{see}")
        time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, alive
    try:  # an exited child its shell has not reaped yet is a zombie: gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc (macOS): kill's answer stands


def filter_tags(labels: str | None, exclude_ids: str | None) -> dict:
    """The request tags of a filter given on the command line as comma-separated lists."""
    tags: dict = {}
    if labels:
        tags["labels"] = [label.strip() for label in labels.split(",") if label.strip()]
    if exclude_ids:
        try:
            tags["exclude_ids"] = [int(i) for i in exclude_ids.split(",") if i.strip()]
        except ValueError:
            raise ImgsimError(f"--exclude-ids must be comma-separated gallery ids, got {exclude_ids!r}") from None
    return tags


def query_rest(url: str, image: bytes, k: int, where: dict | None = None, timeout: float = 30.0,
               proto: Seldon | OpenInference = Seldon()) -> dict:
    """POST the image with ``k`` (and a filter's ``labels`` / ``exclude_ids``, see :func:`filter_tags`) in
    either protocol (Seldon's multipart ``binData`` and ``meta.tags``, or a v2 ``images`` tensor and
    parameters); returns the JSON answer, the same from both."""
    try:
        response = requests.post(f"{url.rstrip('/')}{proto.predict_path}", timeout=timeout,
                                 **proto.upload(image, {"k": k, **(where or {})}))
    except requests.RequestException as exc:
        raise ImgsimError(f"cannot reach the server at {url}: {exc}") from None
    body = json_body(response)
    answer = proto.answer(body) if response.status_code == 200 else None
    if answer is None:
        info = proto.refusal(body) or response.text[:200]
        raise ImgsimError(f"server answered {response.status_code}: {info}")
    return answer


def query_grpc(address: str, image: bytes, k: int, where: dict | None = None, timeout: float = 30.0) -> dict:
    """Call ``seldon.protos.Model/Predict`` with ``binData``, asking for the compact answer (a JSON string in
    strData, cheap to parse); returns the answer as jsonData would carry it."""
    import grpc
    from imgsim.serve import seldon_wire

    message = seldon_wire.SeldonMessage(binData=image)
    message.meta.tags["k"].number_value = k
    message.meta.tags["format"].string_value = "compact"
    for key, values in (where or {}).items():
        message.meta.tags[key].list_value.extend(values)
    with grpc.insecure_channel(address) as channel:
        try:
            reply = seldon_wire.ModelStub(channel).Predict(message, timeout=timeout)
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
