"""The real seldon-core-microservice serving a real bundle over REST and gRPC, good and bad requests."""

from __future__ import annotations

import ast
import base64
import concurrent.futures
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import mlflow
import numpy as np
import pytest
import requests
from google.protobuf import json_format
from PIL import Image
from imgsim.serve import seldon_wire

from imgsim import atomic
from imgsim.serve import process
from imgsim.serve.search import Searcher
from imgsim.serve.settings import ServiceConfig
from support.store import mlflow_store
from tests.bundles import other_model_bundle, pipeline_bundle, rerecord_checksums
from support import servers
from support.servers import SERVE_VENV, start_server, venv_bin

pytestmark = pytest.mark.slow
MAX_REQUEST = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def bundle(pipeline_run, tmp_path_factory):
    return pipeline_bundle(pipeline_run, tmp_path_factory.mktemp("serve") / "bundle")


@pytest.fixture(scope="module")
def server(bundle, pipeline_run, tmp_path_factory):
    # Parameters the way a SeldonDeployment passes them; limits from the environment.
    params = [{"name": "model_uri", "value": str(bundle), "type": "STRING"},
              {"name": "default_k", "value": "4", "type": "INT"},
              {"name": "max_k", "value": "20", "type": "INT"}]
    env = {"PREDICTIVE_UNIT_PARAMETERS": json.dumps(params), "IMGSIM_GALLERY_ROOT": str(pipeline_run["root"]),
           "IMGSIM_MAX_REQUEST_BYTES": str(MAX_REQUEST), "GUNICORN_WORKERS": "2", "GUNICORN_THREADS": "2"}
    srv = start_server(env, tmp_path_factory.mktemp("logs") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def gallery(bundle, pipeline_run):
    searcher = Searcher(bundle)
    # The most distinctive gallery item: the one whose nearest other item is farthest, so "finds itself" is
    # not decided by float noise between near-duplicate embeddings.
    similarity = searcher.index.embeddings @ searcher.index.embeddings.T
    np.fill_diagonal(similarity, -1.0)
    item = searcher.index.items[int(np.argmin(similarity.max(axis=1)))]
    return {"searcher": searcher, "item": item, "bytes": (pipeline_run["root"] / item.path).read_bytes(),
            "root": pipeline_run["root"]}


def rest(server, body, **kw):
    return requests.post(f"{server.rest}/api/v1.0/predictions", json=body, timeout=30, **kw)


def grpc_predict(server, message):
    with grpc.insecure_channel(server.grpc) as channel:
        reply = seldon_wire.ModelStub(channel).Predict(message, timeout=30)
    return json_format.MessageToDict(reply)


def grpc_json(server, data, tags=None):
    message = json_format.ParseDict({"jsonData": data, "meta": {"tags": tags or {}}}, seldon_wire.SeldonMessage())
    return grpc_predict(server, message)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def ids(answer) -> list[int]:
    return [int(n["id"]) for n in answer["results"][0]["neighbours"]]


def finds_itself(result: dict, item_id: int, tie: float = 1e-3) -> bool:
    """The queried gallery item ranks first, or level with the first: a model trained for one epoch on a tiny
    folder maps near-identical pictures to embeddings that differ only by float noise, so ties are real."""
    distances = {int(n["id"]): n["distance"] for n in result["neighbours"]}
    return item_id in distances and distances[item_id] <= result["neighbours"][0]["distance"] + tie


# ---- every request form, over both protocols -------------------------------------------------------------

def test_bin_data_rest_json_and_multipart(server, gallery):
    answer = rest(server, {"binData": b64(gallery["bytes"])}).json()["jsonData"]
    assert len(ids(answer)) == 4 and finds_itself(answer["results"][0], gallery["item"].id)  # default_k from params
    assert answer["model_name"] == "imgsim" and answer["model_version"] == "1" and answer["index_sha256"]
    first = answer["results"][0]["neighbours"][0]
    assert set(first) == {"rank", "id", "path", "label", "distance", "score"}
    assert first["path"] == gallery["searcher"].index.items[first["id"]].path
    assert answer["results"][0]["predicted"]["label"] in ("circle", "square", "stripes")
    multipart = requests.post(f"{server.rest}/api/v1.0/predictions", files={"binData": ("q.png", gallery["bytes"])},
                              data={"meta": json.dumps({"tags": {"k": 3}})}, timeout=30)
    assert multipart.status_code == 200 and ids(multipart.json()["jsonData"]) == ids(answer)[:3]


def test_json_image_batch_id_and_path_over_rest(server, gallery):
    item = gallery["item"]
    single = rest(server, {"jsonData": {"image": b64(gallery["bytes"]), "k": 2}}).json()["jsonData"]
    batch = rest(server, {"jsonData": {"images": [b64(gallery["bytes"])] * 3, "k": 2}}).json()["jsonData"]
    by_id = rest(server, {"jsonData": {"id": item.id, "k": 2}}).json()["jsonData"]
    by_path = rest(server, {"jsonData": {"path": item.path, "k": 2}}).json()["jsonData"]
    assert finds_itself(single["results"][0], item.id) and len(batch["results"]) == 3
    assert all(finds_itself(r, item.id) for r in batch["results"])
    assert finds_itself(by_id["results"][0], item.id) and ids(by_path) == ids(single)


def test_every_form_over_grpc(server, gallery):
    item = gallery["item"]
    message = seldon_wire.SeldonMessage(binData=gallery["bytes"])
    message.meta.tags["k"].number_value = 3
    assert finds_itself(grpc_predict(server, message)["jsonData"]["results"][0], item.id)
    for data in ({"image": b64(gallery["bytes"])}, {"id": item.id}, {"path": item.path},
                 {"images": [b64(gallery["bytes"])] * 2}):
        answer = grpc_json(server, data, {"k": 2})["jsonData"]
        assert all(finds_itself(result, item.id) for result in answer["results"]), data


def test_compact_answers_carry_the_same_answer_as_a_json_string(server, gallery):
    message = seldon_wire.SeldonMessage(binData=gallery["bytes"])
    message.meta.tags["k"].number_value = 3
    full = grpc_predict(server, message)
    message.meta.tags["format"].string_value = "compact"
    with grpc.insecure_channel(server.grpc) as channel:
        compact = seldon_wire.ModelStub(channel).Predict(message, timeout=30)
    assert compact.WhichOneof("data_oneof") == "strData" and json.loads(compact.strData) == full["jsonData"]
    assert json.loads(compact.strData)["model_version"] == "1" and not compact.meta.tags  # identity in the answer
    over_rest = rest(server, {"binData": b64(gallery["bytes"]), "meta": {"tags": {"k": 3, "format": "compact"}}})
    assert json.loads(over_rest.json()["strData"]) == full["jsonData"]
    wrong = rest(server, {"binData": b64(gallery["bytes"]), "meta": {"tags": {"format": "xml"}}})
    assert wrong.status_code == 400 and "'json' or 'compact'" in wrong.json()["status"]["info"]


def test_the_query_client_gets_the_same_answer_over_rest_and_compact_grpc(server, gallery, tmp_path):
    from imgsim.serve import client
    over_rest = client.query_rest(server.rest, gallery["bytes"], 3)
    over_grpc = client.query_grpc(server.grpc, gallery["bytes"], 3)
    assert over_rest == over_grpc and finds_itself(over_grpc["results"][0], gallery["item"].id)
    query = tmp_path / "query.png"
    query.write_bytes(gallery["bytes"])
    cli = subprocess.run([sys.executable, "-m", "imgsim.cli", "query", str(query), "--url", server.rest, "--grpc",
                          server.grpc, "-k", "3"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.count(gallery["item"].path) >= 2  # in the REST table and in the gRPC one


def test_filtered_queries_over_rest_grpc_and_the_client_equal_in_process_search(server, gallery, tmp_path):
    from imgsim.serve import client
    from imgsim.serve.search import Filter
    searcher, item = gallery["searcher"], gallery["item"]
    other = sorted({i.label for i in searcher.index.items} - {item.label})[0]
    where = Filter(frozenset([other]), frozenset([searcher.index.items[1].id]))
    expected = [n.id for n in searcher.search_bytes([gallery["bytes"]], 4, where)[0].neighbours]
    tags = {"labels": [other], "exclude_ids": [searcher.index.items[1].id]}
    assert len(expected) == 4 and item.id not in expected
    by_id = rest(server, {"jsonData": {"id": item.id, "k": 4, **tags}}).json()["jsonData"]
    assert {n["label"] for n in by_id["results"][0]["neighbours"]} == {other} and len(ids(by_id)) == 4
    assert ids(rest(server, {"binData": b64(gallery["bytes"]), "meta": {"tags": {"k": 4, **tags}}}).json()["jsonData"]) \
        == expected
    assert ids(client.query_rest(server.rest, gallery["bytes"], 4, tags)) == expected
    assert ids(client.query_grpc(server.grpc, gallery["bytes"], 4, tags)) == expected
    query = tmp_path / "query.png"
    query.write_bytes(gallery["bytes"])
    cli = subprocess.run([sys.executable, "-m", "imgsim.cli", "query", str(query), "--url", server.rest, "-k", "4",
                          "--labels", other, "--exclude-ids", str(searcher.index.items[1].id)],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and item.path not in cli.stdout and cli.stdout.count(f" {other} ") == 4, cli.stdout


def test_answers_equal_in_process_search(server, gallery):
    searcher, root = gallery["searcher"], gallery["root"]
    for item in searcher.index.items[:5]:
        data = (root / item.path).read_bytes()
        expected = searcher.search_bytes([data], 5)[0]
        got = rest(server, {"binData": b64(data), "meta": {"tags": {"k": 5}}}).json()["jsonData"]["results"][0]
        assert [n["id"] for n in got["neighbours"]] == [n.id for n in expected.neighbours]
        assert np.allclose([n["distance"] for n in got["neighbours"]], [n.distance for n in expected.neighbours],
                           atol=1e-5)


# ---- bad input: 4xx with a message, never a crash ----------------------------------------------------------

def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


BAD_REQUESTS = [
    ({"binData": "!!!not base64!!!"}, "not valid base64"),
    ({"binData": b64(b"plain text, not an image")}, "not an image"),
    ({"binData": b64(_png(Image.new("L", (64, 64), 3))[:50])}, "corrupt or truncated"),
    ({"binData": b64(_png(Image.new("1", (9000, 9000))))}, "decompression bomb"),
    ({"binData": b64(_png(Image.new("L", (4000, 3500))))}, "over this server's limit of 12000000"),
    ({"jsonData": {"images": [b64(_png(Image.new("L", (3000, 3000))))] * 6}}, "add up to more than 48000000 pixels"),
    ({"jsonData": {"image": "%%%"}}, "not valid base64"),
    ({"jsonData": {"id": 0, "k": 0}}, "k must be between 1 and 20"),
    ({"jsonData": {"id": 0, "k": 21}}, "k must be between 1 and 20"),
    ({"jsonData": {"id": 0, "k": "5"}}, "k must be an integer"),
    ({"jsonData": {"id": 0, "k": 2.5}}, "k must be an integer"),
    ({"jsonData": {"id": 10**9}}, "unknown gallery id"),
    ({"jsonData": {"id": "seven"}}, "id must be an integer"),
    ({"jsonData": {"images": "not-a-list"}}, "must be a non-empty list"),
    ({"jsonData": {"images": [b64(b"x")] * 40}}, "at most 32 per request"),
    ({"jsonData": {"path": 42}}, "'path' must be a non-empty string"),
    ({"jsonData": {"path": None}}, "'path' must be a non-empty string"),
    ({"jsonData": {"path": "../images-outside.png"}}, "outside the gallery root"),
    ({"jsonData": {"path": "/etc/passwd"}}, "outside the gallery root"),
    ({"jsonData": {"path": "stripes/outside.png"}}, "outside the gallery root"),  # symlink escaping the root
    ({"jsonData": {"path": "square/nested"}}, "not a regular file"),
    ({"jsonData": {"path": "circle/notes.txt"}}, "not an image"),
    ({"jsonData": {"path": "circle/nope.png"}}, "does not exist"),
    ({"jsonData": {"image": "aGk=", "id": 1}}, "exactly one of"),
    ({"jsonData": {"id": 0, "labels": "circle"}}, "'labels' must be a non-empty list of label strings"),
    ({"jsonData": {"id": 0, "labels": ["hexagon"]}}, "unknown label(s) ['hexagon'] in 'labels'"),
    ({"jsonData": {"id": 0, "exclude_ids": 3}}, "'exclude_ids' must be a list of gallery ids"),
    ({"jsonData": {"id": 0, "exclude_ids": ["x"]}}, "exclude_ids[] must be an integer"),
    ({"jsonData": {"id": 0, "exclude_ids": list(range(1001))}}, "at most 1000 per query"),
    ({"jsonData": [1, 2]}, "send an image as binData"),
    ({"strData": "hello"}, "send an image as binData"),
    ({"binData": 12}, "binData must be a base64 string"),
]


@pytest.mark.parametrize("body, message", BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_bad_rest_requests_get_400_with_a_message(server, body, message):
    response = rest(server, body)
    assert response.status_code == 400, response.text
    status = response.json()["status"]
    assert message in status["info"] and "Traceback" not in response.text


@pytest.mark.parametrize("field, message", [("k", "k must be between 1 and 20"), ("id", "unknown gallery id")])
def test_numbers_beyond_any_range_are_400_not_500(server, field, message):
    # A 401-digit integer once reached math.isfinite, whose OverflowError became a 500.
    body = '{"jsonData": {"id": 0, "%s": 1%s}}' % (field, "0" * 400)
    response = requests.post(f"{server.rest}/api/v1.0/predictions", data=body, timeout=30,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert message in response.json()["status"]["info"] and len(response.text) < 2000


@pytest.mark.parametrize("body, message", [b for b in BAD_REQUESTS if "jsonData" in b[0] and isinstance(b[0]["jsonData"], dict)],
                         ids=[m for b, m in BAD_REQUESTS if "jsonData" in b and isinstance(b["jsonData"], dict)])
def test_bad_grpc_requests_get_invalid_argument(server, body, message):
    with pytest.raises(grpc.RpcError) as err:
        grpc_json(server, body["jsonData"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()


def test_bad_grpc_bin_data(server):
    with pytest.raises(grpc.RpcError) as err:
        grpc_predict(server, seldon_wire.SeldonMessage(binData=b"GIF89a truncated"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_oversized_bodies_and_wrong_methods_are_4xx_json(server):
    big = rest(server, {"binData": b64(b"\0" * MAX_REQUEST)})
    assert big.status_code == 413 and big.json()["status"]["code"] == 413
    url, headers = f"{server.rest}/api/v1.0/predictions", {"Content-Type": "application/json"}
    chunks = (b"x" * 65536 for _ in range(MAX_REQUEST // 65536 + 2))  # a generator: sent chunked, no length
    chunked = requests.post(url, data=chunks, headers=headers, timeout=30)
    assert chunked.status_code == 413 and chunked.json()["status"]["code"] == 413
    small = json.dumps({"jsonData": {"id": 0, "k": 2}}).encode()
    ok = requests.post(url, data=iter([small[:10], small[10:]]), headers=headers, timeout=30)
    assert ok.status_code == 200 and len(ids(ok.json()["jsonData"])) == 2
    wrong = requests.put(f"{server.rest}/api/v1.0/predictions", timeout=10)
    assert 400 <= wrong.status_code < 500 and "Traceback" not in wrong.text
    not_json = requests.post(f"{server.rest}/api/v1.0/predictions", data="{oops", timeout=10,
                             headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400


def test_still_correct_after_bad_requests(server, gallery):
    for body, _ in BAD_REQUESTS:
        rest(server, body)
    answer = rest(server, {"binData": b64(gallery["bytes"])}).json()["jsonData"]
    assert finds_itself(answer["results"][0], gallery["item"].id)


# ---- health, metadata, metrics, concurrency -----------------------------------------------------------------

def test_health_metadata_and_prometheus_metrics(server, gallery):
    assert requests.get(f"{server.rest}/health/ping", timeout=5).text.strip().strip('"') == "pong"
    status = requests.get(f"{server.rest}/health/status", timeout=5)
    assert status.status_code == 200 and status.json()["jsonData"]["ready"] is True
    metadata = requests.get(f"{server.rest}/api/v1.0/metadata", timeout=5).json()
    assert {i["messagetype"] for i in metadata["inputs"]} == {"binData", "jsonData"}
    rest(server, {"binData": b64(b"junk")})
    rest(server, {"binData": b64(gallery["bytes"])})
    for _ in range(4):  # both workers see a health check, which flushes their rejected-request counters
        requests.get(f"{server.rest}/health/status", timeout=5)
    text = requests.get(f"{server.metrics}/metrics", timeout=5).text
    for name in ("imgsim_queries_total", "imgsim_decode_seconds_count", "imgsim_embed_seconds_count",
                 "imgsim_search_seconds_count", "imgsim_index_size", "imgsim_rejected_requests_total"):
        assert name in text, name


def test_concurrent_clients_get_identical_answers(server, gallery):
    searcher, root = gallery["searcher"], gallery["root"]
    items = searcher.index.items[:8]
    payloads = [(root / item.path).read_bytes() for item in items]
    expected = [[n.id for n in searcher.search_bytes([p], 5)[0].neighbours] for p in payloads]

    def client(worker: int) -> int:
        errors = 0
        for i in range(50):
            j = (worker + i) % len(payloads)
            if (worker + i) % 2:
                got = rest(server, {"binData": b64(payloads[j]), "meta": {"tags": {"k": 5}}})
                answer = got.json()["jsonData"] if got.ok else None
            else:
                message = seldon_wire.SeldonMessage(binData=payloads[j])
                message.meta.tags["k"].number_value = 5
                answer = grpc_predict(server, message)["jsonData"]
            errors += answer is None or ids(answer) != expected[j]
        return errors

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(client, range(8))) == 0


# ---- ports: what the tests' servers start on -----------------------------------------------------------------

def test_free_ports_are_distinct_and_never_handed_out_twice():
    first, second = servers.free_ports(40), servers.free_ports(40)
    assert len(set(first)) == 40 and len(set(second)) == 40 and not set(first) & set(second)


def test_a_server_whose_port_another_process_took_starts_again_on_new_ports(bundle, tmp_path, monkeypatch):
    # Another process binds the REST port between the pick and the server's own bind: gunicorn cannot listen, and
    # the server starts again on ports picked afresh instead of waiting out its timeout (as CI once saw).
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        picks = iter([[taken, *servers.free_ports(2)]])
        real = servers.free_ports
        monkeypatch.setattr(servers, "free_ports", lambda count: next(picks, None) or real(count))
        srv = start_server({"IMGSIM_MODEL_URI": str(bundle)}, tmp_path / "server.log")
    try:
        assert srv.rest != f"http://127.0.0.1:{taken}" and next(picks, None) is None
        assert requests.get(f"{srv.rest}/health/status", timeout=5).ok
        assert "Connection in use" not in srv.log.read_text(errors="replace")  # the log is the second start's
    finally:
        srv.stop()


# ---- loading: consistency checks and MLflow URIs ------------------------------------------------------------

def test_mismatched_bundle_stays_not_ready_and_is_not_retried(bundle, tmp_path, pipeline_run):
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    embeddings = np.load(broken / "embeddings.npy")
    np.save(broken / "embeddings.npy", embeddings[:, : embeddings.shape[1] // 2])
    srv = start_server({"IMGSIM_MODEL_URI": str(broken), "IMGSIM_LOAD_BACKOFF_S": "0.2"}, tmp_path / "broken.log",
                       wait_ready=False)
    try:
        status = requests.get(f"{srv.rest}/health/status", timeout=5)
        assert status.status_code == 503 and "embeddings.npy does not match" in status.json()["status"]["info"]
        assert "not retried" in status.json()["status"]["info"]
        answer = rest(srv, {"jsonData": {"id": 0}})
        assert answer.status_code == 503
        for malformed in ({"id": "seven"}, {"id": 0, "k": 0}, {}):  # not ready wins over what is wrong with a query
            assert rest(srv, {"jsonData": malformed}).status_code == 503, malformed
        with pytest.raises(grpc.RpcError) as err:
            grpc_json(srv, {"id": 0})
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        time.sleep(1.0)  # five backoff periods: a transient failure would have been tried again by now
        log = srv.log.read_text(errors="replace")
        assert "load attempt 2" not in log and "load attempt 1 failed" in log
    finally:
        srv.stop()


def test_a_bundle_of_model_a_with_the_index_of_model_b_never_becomes_ready(bundle, tmp_path):
    mixed = Path(shutil.copytree(other_model_bundle(bundle, tmp_path / "b"), tmp_path / "mixed"))
    for name in ("model.json", "weights.pt", "model.onnx"):
        shutil.copy(bundle / name, mixed / name)
    rerecord_checksums(mixed)
    srv = start_server({"IMGSIM_MODEL_URI": str(mixed)}, tmp_path / "mixed.log", wait_ready=False)
    try:
        status = requests.get(f"{srv.rest}/health/status", timeout=5)
        assert status.status_code == 503
        assert "model.onnx is not the model that built this index" in status.json()["status"]["info"]
    finally:
        srv.stop()


def test_load_is_retried_until_the_bundle_appears_then_metadata_names_it(bundle, tmp_path):
    # The volume is mounted before the bundle is exported onto it: the server waits for it instead of
    # staying unready for ever.
    target = tmp_path / "pvc" / "bundle"
    srv = start_server({"IMGSIM_MODEL_URI": str(target), "IMGSIM_LOAD_BACKOFF_S": "0.2",
                        "IMGSIM_LOAD_BACKOFF_MAX_S": "0.5"}, tmp_path / "retry.log", wait_ready=False)
    try:
        status = requests.get(f"{srv.rest}/health/status", timeout=5)
        assert status.status_code == 503 and "does not exist" in status.json()["status"]["info"]
        assert "next try in" in status.json()["status"]["info"]
        before = requests.get(f"{srv.rest}/api/v1.0/metadata", timeout=5).json()
        assert before["custom"]["ready"] == "false" and before["versions"] == ["not-loaded"]
        with atomic.atomic_dir(target) as tmp:
            shutil.copytree(bundle, tmp, dirs_exist_ok=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not requests.get(f"{srv.rest}/health/status", timeout=5).ok:
            time.sleep(0.2)
        assert requests.get(f"{srv.rest}/health/status", timeout=5).ok, srv.logs()
        log = srv.log.read_text(errors="replace")  # all of it: logs() keeps only the tail
        assert "load attempt 1 failed" in log and re.search(r"model on ONNX Runtime \(attempt ([2-9]|\d\d+)\)", log)
        identity = rest(srv, {"jsonData": {"id": 0}}).json()["jsonData"]
        metadata = requests.get(f"{srv.rest}/api/v1.0/metadata", timeout=5).json()
        assert metadata["name"] == "imgsim" and metadata["versions"] == [identity["model_version"]] == ["1"]
        assert metadata["custom"]["index_sha256"] == identity["index_sha256"] and metadata["custom"]["ready"] == "true"
        assert metadata["custom"]["runtime"] == "onnx"
        # The gRPC worker is its own process with its own retry clock: it may load a moment after REST's.
        with grpc.insecure_channel(srv.grpc) as channel:
            stub, grpc_deadline = seldon_wire.ModelStub(channel), time.monotonic() + 30
            while True:
                over_grpc = json_format.MessageToDict(stub.Metadata(seldon_wire.SeldonMessage(), timeout=10))
                if over_grpc["custom"]["ready"] == "true" or time.monotonic() > grpc_deadline:
                    break
                time.sleep(0.2)
        assert over_grpc["versions"] == ["1"] and over_grpc["custom"]["index_sha256"] == identity["index_sha256"]
    finally:
        srv.stop()


def test_serves_from_a_registry_alias(pipeline_run, registry_server, tmp_path):
    with mlflow_store(pipeline_run["work"]):
        mlflow.tracking.MlflowClient().set_registered_model_alias("imgsim", "champion", "1")
        env = {"IMGSIM_MODEL_URI": "models:/imgsim@champion", "MLFLOW_TRACKING_URI": registry_server}
        srv = start_server(env, tmp_path / "alias.log")
    try:
        status = requests.get(f"{srv.rest}/health/status", timeout=5).json()["jsonData"]
        assert status["model_version"] == "1" and int(status["index_size"]) > 0
    finally:
        srv.stop()


def test_an_unexpected_load_failure_leaves_the_service_not_ready(monkeypatch, bundle):
    # No real part fails this way on demand, so the searcher is made to raise what a library bug would.
    import imgsim.serve.service as service_module

    def broken(*args, **kwargs):
        raise RuntimeError("simulated library bug")

    monkeypatch.setattr(service_module, "Searcher", broken)
    service = service_module.SimilarityService(ServiceConfig(model_uri=str(bundle)))
    service.load()
    assert not service.ready and service.versions() == {}
    assert "unexpected error while loading" in service.load_error and "simulated library bug" in service.load_error


def test_an_unreadable_bundle_says_which_file_and_which_user(monkeypatch, bundle):
    # The tests run as root, who reads any file; the searcher raises what a uid without read access gets.
    import imgsim.serve.service as service_module

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(bundle / "embeddings.npy"))

    monkeypatch.setattr(service_module, "Searcher", unreadable)
    service = service_module.SimilarityService(ServiceConfig(model_uri=str(bundle)))
    service.load()
    assert not service.ready and "embeddings.npy" in service.load_error and "readable" in service.load_error


def test_registry_downloads_do_not_pile_up_on_disk(pipeline_run, monkeypatch, tmp_path):
    # A server following a gallery downloads every version and retries failed loads: each download replaces the
    # last, a failed one is deleted, and folders left by killed server processes are swept at the next load.
    import tempfile

    import imgsim.serve.service as service_module

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    area = tmp_path / process.DOWNLOADS
    area.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (area / f"{gone.pid}-killed").mkdir()
    (area / f"{gone.pid}-killed" / "index.ann").write_bytes(b"0" * 1024)
    (area / f"{os.getppid()}-running").mkdir()  # a live process's download is left alone
    ours = lambda: sorted(p.name for p in area.glob(f"{os.getpid()}-*"))  # noqa: E731

    with mlflow_store(pipeline_run["work"]):
        service = service_module.SimilarityService(ServiceConfig(model_uri="models:/imgsim/1"))
        real = service_module.Searcher

        def broken(*args, **kwargs):
            raise RuntimeError("simulated library bug")

        monkeypatch.setattr(service_module, "Searcher", broken)
        assert not service._try_load(1) and ours() == []
        assert sorted(p.name for p in area.iterdir()) == [f"{os.getppid()}-running"]
        monkeypatch.setattr(service_module, "Searcher", real)
        assert service._try_load(2) and len(first := ours()) == 1
        assert service._try_load(0, swap=True) and len(second := ours()) == 1 and second != first
    process._remove_own_downloads()
    assert ours() == [] and (area / f"{os.getppid()}-running").exists()


def test_docs_compact_grpc_client_runs_as_written(server, gallery, tmp_path):
    from tests.doc_commands import runnable_blocks
    code = runnable_blocks()["compact-grpc-client"]
    assert '"127.0.0.1:5000"' in code  # the documented default port, pointed at this test's server
    (tmp_path / "query.png").write_bytes(gallery["bytes"])
    # A client with seldon-core installed, as the page shows it: the Seldon wrapper's own environment.
    out = subprocess.run([str(venv_bin(SERVE_VENV, "python")), "-c", code.replace('"127.0.0.1:5000"', repr(server.grpc))],
                         cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    version, neighbour = out.stdout.split(" ", 1)
    assert ast.literal_eval(neighbour)["id"] == gallery["item"].id  # the query image finds itself first
