"""The Open Inference Protocol server as its clients meet it: NVIDIA's tritonclient (REST in its default binary mode
and in JSON, and gRPC) gets the Seldon v1 server's neighbours; no client can reach MLServer's repository API or the
stream routes; a request waits for a slot or is refused (503 with Retry-After), a stalled body gets 408; the binary
tensor extension is checked as strictly as JSON."""

from __future__ import annotations

import base64
import json
import socket
import struct
import time
from urllib.parse import urlsplit

import pytest
import requests

from imgsim.serve.search import Searcher
from support.servers import in_serve_env, in_v2_env, start_mlserver, start_server, triton
from tests.bundles import pipeline_bundle

pytestmark = pytest.mark.slow
HEADER = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def bundle(pipeline_run, tmp_path_factory):
    return pipeline_bundle(pipeline_run, tmp_path_factory.mktemp("oip") / "bundle")


@pytest.fixture(scope="module")
def gallery(bundle, pipeline_run):
    return {"searcher": Searcher(bundle), "root": pipeline_run["root"]}


@pytest.fixture(scope="module")
def v2(bundle, pipeline_run, tmp_path_factory):
    srv = start_mlserver({"IMGSIM_MODEL_URI": str(bundle), "IMGSIM_GALLERY_ROOT": str(pipeline_run["root"])},
                         tmp_path_factory.mktemp("oip-logs") / "mlserver.log")
    yield srv
    log = srv.logs()
    srv.stop()
    assert "Traceback" not in log, "a request made MLServer log a traceback"


@pytest.fixture(scope="module")
def v1(bundle, tmp_path_factory):
    srv = start_server({"IMGSIM_MODEL_URI": str(bundle)}, tmp_path_factory.mktemp("oip-v1") / "server.log")
    yield srv
    srv.stop()


def v1_answer(server, images: list[bytes], k: int) -> list[dict]:
    body = {"jsonData": {"images": [base64.b64encode(i).decode() for i in images], "k": k}}
    reply = requests.post(f"{server.rest}/api/v1.0/predictions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["jsonData"]["results"]


def test_tritonclient_gets_the_v1_servers_neighbours_in_binary_and_json_rest_and_over_grpc(v1, v2, gallery):
    picked = gallery["searcher"].index.items[10:13]
    files = [str(gallery["root"] / item.path) for item in picked]
    want = v1_answer(v1, [open(f, "rb").read() for f in files], 5)
    ids = [n["id"] for r in want for n in r["neighbours"]]
    labels = [n["label"] for r in want for n in r["neighbours"]]
    for mode in ("binary", "json", "grpc"):
        got = triton(mode, v2, "--image", *files, "--k", "5")
        assert "error" not in got, (mode, got)
        assert got["ids"] == ids and got["labels"] == labels, mode
        assert got["predicted"] == [r["predicted"]["label"] for r in want], mode
        assert got["scores"] == pytest.approx([n["score"] for r in want for n in r["neighbours"]], abs=1e-5), mode


def test_tritonclient_asks_for_some_outputs_and_queries_by_id(v2, gallery):
    item = gallery["searcher"].index.items[5]
    want = [n.id for n in gallery["searcher"].search_id(item.id, 4).neighbours]
    for mode in ("binary", "json", "grpc"):
        got = triton(mode, v2, "--id", str(item.id), "--k", "4", "--outputs", "ids,labels")
        assert set(got) == {"ids", "labels"} and got["ids"] == want, (mode, got)
    unknown = triton("binary", v2, "--id", str(item.id), "--outputs", "ids,embedding")
    assert "unknown output 'embedding'" in unknown["error"]


@pytest.mark.parametrize("mode", ["json", "grpc"])
def test_the_metadata_declares_every_input_and_output(v2, mode):
    meta = triton(mode, v2, "--metadata")
    tensors = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"] + meta["outputs"]}
    assert tensors == {"images": ("BYTES", [-1]), "id": ("INT64", [1]), "path": ("BYTES", [1]),
                       "ids": ("INT64", [-1, -1]), "scores": ("FP32", [-1, -1]), "labels": ("BYTES", [-1, -1]),
                       "predicted": ("BYTES", [-1]), "answer": ("BYTES", [1])}


def binary_request(header: dict, data: bytes) -> tuple[bytes, dict]:
    text = json.dumps(header).encode()
    return text + data, {HEADER: str(len(text)), "Content-Type": "application/octet-stream"}


def element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def test_a_hand_made_binary_request_is_answered_in_binary(v2, gallery):
    item = gallery["searcher"].index.items[2]
    image = (gallery["root"] / item.path).read_bytes()
    body, headers = binary_request({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                                "parameters": {"binary_data_size": len(element(image))}}],
                                    "outputs": [{"name": "ids", "parameters": {"binary_data": True}},
                                                {"name": "labels"}], "parameters": {"k": 3}}, element(image))
    reply = requests.post(f"{v2.rest}/v2/models/imgsim/infer", data=body, headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text
    size = int(reply.headers[HEADER])
    head = json.loads(reply.content[:size])
    (ids, labels) = head["outputs"]
    assert ids["name"] == "ids" and ids["parameters"]["binary_data_size"] == 24 and "data" not in ids
    got = list(struct.unpack("<3q", reply.content[size:]))
    want = gallery["searcher"].search_bytes([image], 3)[0].neighbours
    assert got == [n.id for n in want] and labels["data"] == [n.label for n in want]


@pytest.mark.parametrize("header, data, message", [
    ({"inputs": [{"name": "id", "datatype": "INT64", "shape": [1], "parameters": {"binary_data_size": 8}}]},
     b"\x01" * 7, "binary_data_size"),
    ({"inputs": [{"name": "id", "datatype": "INT64", "shape": [1], "parameters": {"binary_data_size": 4}}]},
     b"\x01" * 4, "4 bytes of data for 1 INT64"),
    ({"inputs": [{"name": "id", "datatype": "INT64", "shape": [1], "parameters": {"binary_data_size": 8}}]},
     b"\x01" * 9, "bytes after"),
    ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 9}}]},
     element(b"abcde"), "2 elements, the data 1"),
    ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}]},
     struct.pack("<I", 99) + b"ab", "longer than the data left"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]},
     struct.pack("<f", float("nan")), "non-finite"),
    ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [10 ** 9], "parameters": {"binary_data_size": 0}}]},
     b"", "more than"),
])
def test_binary_requests_that_do_not_add_up_are_a_short_400(v2, gallery, header, data, message):
    body, headers = binary_request(header, data)
    reply = requests.post(f"{v2.rest}/v2/models/imgsim/infer", data=body, headers=headers, timeout=30)
    assert reply.status_code == 400 and message in reply.json()["error"], reply.text
    for length in ("0", "x", str(len(body) + 1), "-3"):
        reply = requests.post(f"{v2.rest}/v2/models/imgsim/infer", data=body, headers={HEADER: length}, timeout=30)
        assert reply.status_code == 400 and HEADER.lower() in reply.json()["error"], reply.text
    nested, headers = binary_request({"inputs": []}, b"")
    nested = b"[" * 100_000 + nested[2:]
    headers[HEADER] = str(len(nested))
    reply = requests.post(f"{v2.rest}/v2/models/imgsim/infer", data=nested, headers=headers, timeout=30)
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]
    _serves(v2, gallery)


def _serves(server, gallery) -> None:
    assert requests.get(f"{server.rest}/v2/models/imgsim/ready", timeout=5).status_code == 200
    item = gallery["searcher"].index.items[0]
    body = {"inputs": [{"name": "id", "datatype": "INT64", "shape": [1], "data": [item.id]}]}
    assert requests.post(f"{server.rest}/v2/models/imgsim/infer", json=body, timeout=30).status_code == 200


# ---- nothing a client sends switches the server off ------------------------------------------------------

GRPC_REPOSITORY = """
import json, sys, grpc
from mlserver.grpc import dataplane_pb2 as pb, dataplane_pb2_grpc, model_repository_pb2 as mpb, model_repository_pb2_grpc
channel = grpc.insecure_channel(sys.argv[1])
data, repo = dataplane_pb2_grpc.GRPCInferenceServiceStub(channel), model_repository_pb2_grpc.ModelRepositoryServiceStub(channel)
calls = {"index": lambda: data.RepositoryIndex(pb.RepositoryIndexRequest()),
         "unload": lambda: data.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="imgsim")),
         "load": lambda: data.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="imgsim")),
         "repository-unload": lambda: repo.RepositoryModelUnload(mpb.RepositoryModelUnloadRequest(model_name="imgsim")),
         "repository-index": lambda: repo.RepositoryIndex(mpb.RepositoryIndexRequest()),
         "stream": lambda: list(data.ModelStreamInfer(iter([pb.ModelInferRequest(model_name="imgsim")])))}
codes = {}
for name, call in calls.items():
    try:
        call()
        codes[name] = "OK"
    except grpc.RpcError as exc:
        codes[name] = exc.code().name
codes["ready"] = data.ModelReady(pb.ModelReadyRequest(name="imgsim")).ready
print(json.dumps(codes))
"""


def test_the_repository_api_and_the_streams_are_closed_and_the_model_stays_ready(v2, gallery):
    for path in ("/v2/repository/index", "/v2/repository/models/imgsim/unload", "/v2/repository/models/imgsim/load",
                 "/v2/models/imgsim/infer_stream", "/v2/models/imgsim/generate_stream",
                 "/v2/models/imgsim/versions/1/infer_stream"):
        for method in ("POST", "GET"):
            reply = requests.request(method, v2.rest + path, json={}, timeout=10)
            assert reply.status_code == 404, (method, path, reply.status_code, reply.text[:200])
    codes = in_v2_env(GRPC_REPOSITORY, v2.grpc)
    assert codes == {"index": "UNIMPLEMENTED", "unload": "UNIMPLEMENTED", "load": "UNIMPLEMENTED",
                     "repository-unload": "UNIMPLEMENTED", "repository-index": "UNIMPLEMENTED",
                     "stream": "UNIMPLEMENTED", "ready": True}
    _serves(v2, gallery)


SELDON_ROUTES = """
import json, sys
sys.path.insert(0, "model_server")
from seldon_core.wrapper import get_rest_microservice
from seldon_core.metrics import SeldonMetrics
from ModelServer import ModelServer
server = ModelServer(model_uri="/nonexistent", poll_interval_s=0)  # its routes only: never loaded
app = get_rest_microservice(server, SeldonMetrics())
print(json.dumps(sorted(rule.rule for rule in app.url_map.iter_rules())))
"""
# Seldon's data plane: predict and its graph siblings, feedback (answered 400 here: no learning), health, metadata.
SELDON_DATA_PLANE = {"/predict", "/api/v0.1/predictions", "/api/v1.0/predictions", "/transform-input",
                     "/api/v0.1/transform-input", "/api/v1.0/transform-input", "/transform-output",
                     "/api/v0.1/transform-output", "/api/v1.0/transform-output", "/route", "/api/v0.1/route",
                     "/api/v1.0/route", "/aggregate", "/api/v0.1/aggregate", "/api/v1.0/aggregate",
                     "/send-feedback", "/api/v0.1/feedback", "/api/v1.0/feedback", "/health/ping",
                     "/health/status", "/api/v1.0/health/status", "/metadata", "/api/v1.0/metadata", "/seldon.json",
                     "/<path:filename>"}  # (Flask's static files: Seldon's OpenAPI page)


def test_the_v1_wrapper_has_no_route_that_loads_or_unloads():
    routes = set(in_serve_env(SELDON_ROUTES))
    assert routes and routes <= SELDON_DATA_PLANE, sorted(routes - SELDON_DATA_PLANE)


# ---- bounded in flight ----------------------------------------------------------------------------------

@pytest.fixture()
def tight(bundle, tmp_path):
    """A server that answers 1 request at a time, holds 1 MB of large bodies (a 200 kB body counts 600 kB) and gives
    a body 2 s."""
    srv = start_mlserver({"IMGSIM_MODEL_URI": str(bundle), "IMGSIM_MAX_INFLIGHT_REQUESTS": "1",
                          "IMGSIM_MAX_INFLIGHT_BYTES": "1000000", "IMGSIM_BODY_TIMEOUT_S": "2",
                          "IMGSIM_POLL_INTERVAL_S": "0"}, tmp_path / "tight.log")
    yield srv
    srv.stop()


def stalled(server, declared: int) -> socket.socket:
    """A client that declares ``declared`` bytes of body, sends all but the last and waits."""
    address = urlsplit(server.rest)
    sock = socket.create_connection((address.hostname, address.port), timeout=30)
    sock.sendall(f"POST /v2/models/imgsim/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {declared}\r\n\r\n".encode() + b" " * (declared - 1))
    return sock


def answer_of(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_beyond_its_slots_a_request_gets_503_with_retry_after_and_health_still_answers(tight, gallery):
    import concurrent.futures

    root, items = gallery["root"], gallery["searcher"].index.items
    batch = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [32], "data": [
        base64.b64encode((root / item.path).read_bytes()).decode() for item in (items * 32)[:32]]}]}
    statuses, retry = set(), None
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        for _ in range(20):  # rounds of 6 at once, until one was answered while another waited for the slot
            for reply in pool.map(lambda _: requests.post(f"{tight.rest}/v2/models/imgsim/infer", json=batch,
                                                          timeout=60), range(6)):
                statuses.add(reply.status_code)
                retry = reply.headers.get("Retry-After") if reply.status_code == 503 else retry
            if {200, 503} <= statuses:
                break
    assert statuses == {200, 503} and retry == "1", statuses
    assert requests.get(f"{tight.rest}/v2/models/imgsim/ready", timeout=5).status_code == 200


def test_requests_that_send_no_body_hold_no_slot(tight, gallery):
    held = [stalled(tight, 1000) for _ in range(5)]  # small bodies never sent: no slot, no budget
    try:
        time.sleep(0.5)
        _serves(tight, gallery)
    finally:
        for sock in held:
            sock.close()


def test_large_bodies_share_a_byte_budget_small_queries_pass_beside_them(tight, gallery):
    first = stalled(tight, 200_000)
    try:
        time.sleep(0.5)
        second = stalled(tight, 200_000)  # 600 kB held, 600 kB more asked of 1 MB: refused before it is read
        assert b" 503 " in answer_of(second).split(b"\r\n")[0]
        second.close()
        _serves(tight, gallery)  # a small query needs a slot only
    finally:
        first.close()


def test_a_body_that_stalls_gets_408_and_the_server_keeps_serving(tight, gallery):
    sock = stalled(tight, 5000)
    started = time.monotonic()
    status = answer_of(sock).split(b"\r\n")[0]
    waited = time.monotonic() - started
    sock.close()
    assert b" 408 " in status and 1.5 < waited < 15, (status, waited)
    _serves(tight, gallery)


def test_unload_stops_following_the_gallery_and_removes_the_download(bundle, tmp_path):
    import threading

    from imgsim.serve.service import SimilarityService
    from imgsim.serve.settings import ServiceConfig

    service = SimilarityService(ServiceConfig(model_uri=str(bundle), poll_interval_s=0.05))
    before = set(threading.enumerate())  # (other services in this process poll too)
    service.load()
    download = tmp_path / "download"  # where a registry version would have been fetched to
    download.mkdir()
    (download / "model.onnx").write_bytes(b"x")
    service._download = download
    polls = [t for t in set(threading.enumerate()) - before if t.name == "imgsim-poll"]
    assert service.ready and polls
    service.close()
    for thread in polls:
        thread.join(timeout=10)
    assert not any(t.is_alive() for t in polls) and not download.exists()
    assert not service.ready and service.refresh() is False


# ---- what a hostile review found ---------------------------------------------------------------------------

@pytest.mark.parametrize("headers, body", [
    ({HEADER: "\u00b2"}, b'{"inputs": []}'),  # a digit to str.isdigit, not to int()
    ({HEADER: "9" * 40}, b'{"inputs": []}'),
    ({"Content-Length": "0" * 5000 + "2"}, b"{}"),
    ({HEADER: "60"}, json.dumps({"inputs": [{"name": "id", "datatype": [], "shape": [1],
                                             "parameters": {"binary_data_size": 8}}]}).encode()[:60] + b"\0" * 8),
])
def test_odd_headers_and_binary_parts_are_short_400s(v2, gallery, headers, body):
    if "Content-Length" in headers:  # requests would write its own: send the bytes as they are
        address = urlsplit(v2.rest)
        with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
            sock.sendall(b"POST /v2/models/imgsim/infer HTTP/1.1\r\nHost: x\r\nContent-Length: " +
                         headers["Content-Length"].encode() + b"\r\n\r\n" + body)
            status = answer_of(sock).split(b"\r\n")[0]
        assert b" 400 " in status, status
    else:
        reply = requests.post(f"{v2.rest}/v2/models/imgsim/infer", data=body, timeout=30,
                              headers={k: v.encode("latin-1") for k, v in headers.items()})
        assert reply.status_code == 400 and len(reply.content) < 400, reply.text[:300]
    _serves(v2, gallery)


def test_outputs_that_are_no_list_beside_binary_data_are_a_400_not_a_500(v2, gallery):
    for outputs in (1, True, "ids", {"name": "ids"}):
        body = {"inputs": [{"name": "id", "datatype": "INT64", "shape": [1], "data": [0]}], "outputs": outputs,
                "parameters": {"binary_data_output": True}}
        reply = requests.post(f"{v2.rest}/v2/models/imgsim/infer", json=body, timeout=30)
        assert reply.status_code in (200, 400, 422), (outputs, reply.status_code, reply.text[:200])


def test_messages_quote_little_of_a_long_model_name_on_every_method_and_over_grpc(v2):
    name = "m" * 60_000
    for method in ("GET", "POST"):
        reply = requests.request(method, f"{v2.rest}/v2/models/{name}/{'ready' if method == 'GET' else 'infer'}",
                                 json={"inputs": []}, timeout=30)
        assert 400 <= reply.status_code < 500 and len(reply.content) < 300, (method, len(reply.content))
    details = in_v2_env("""
import json, sys, grpc
from mlserver.grpc import dataplane_pb2 as pb, dataplane_pb2_grpc
stub = dataplane_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(sys.argv[1]))
try:
    stub.ModelInfer(pb.ModelInferRequest(model_name="m" * 5000))
    print(json.dumps({"code": "OK"}))
except grpc.RpcError as exc:
    print(json.dumps({"code": exc.code().name, "details": exc.details()}))
""", v2.grpc)
    assert details["code"] == "NOT_FOUND" and len(details["details"]) < 200, details


GUARD_UNDER_A_ROOT_PATH = """
import asyncio, json, sys
sys.path.insert(0, "model_server/v2")
from serve import Guard
from imgsim.serve.settings import ServiceConfig

reached = []
async def app(scope, receive, send):
    reached.append(scope["path"])
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})

async def main():
    guard, sent = Guard(app, ServiceConfig()), []
    async def send(message):
        sent.append(message)
    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}
    statuses = {}
    for path in ("/x/v2/repository/index", "/x/v2/repository/models/imgsim/unload", "/x/v2/models/imgsim/infer_stream",
                 "/x/v2/health/ready"):
        sent.clear()
        await guard({"type": "http", "method": "POST", "path": path, "root_path": "/x", "headers": []}, receive, send)
        statuses[path] = sent[0]["status"]
    print(json.dumps({"statuses": statuses, "reached": reached}))

asyncio.run(main())
"""


def test_a_root_path_does_not_open_the_repository_api():
    out = in_v2_env(GUARD_UNDER_A_ROOT_PATH)
    assert out["reached"] == ["/x/v2/health/ready"], out
    assert [s for p, s in out["statuses"].items() if "health" not in p] == [404, 404, 404]


def test_a_shape_of_huge_dimensions_is_refused_before_it_is_multiplied():
    from imgsim.errors import BadInput
    from imgsim.serve import binary_tensors

    header = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2 ** 62] * 60_000,
                                     "parameters": {"binary_data_size": 0}}]}).encode()
    with pytest.raises(BadInput, match="at most 8"):
        binary_tensors.decode_request(header, len(header))
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP16", "shape": [4096],
                                     "parameters": {"binary_data_size": 8192}}] * 2}).encode()
    with pytest.raises(BadInput, match="more than 4096 elements"):
        binary_tensors.decode_request(header + b"\0" * 16384, len(header))
