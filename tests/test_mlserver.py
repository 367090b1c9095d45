"""The Open Inference Protocol server: the real `mlserver start model_server/v2` (MLServer 1.7 in its own
environment) on loopback ports, answering as the Seldon v1 server does, refusing bad input with 4xx, over REST and
gRPC (the gRPC client runs in MLServer's environment: support/oip_client.py)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import requests

from imgsim.runs.export import export_bundle
from imgsim.serve.search import Searcher
from support.servers import oip_grpc, start_mlserver
from support.store import mlflow_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(pipeline_run, tmp_path_factory):
    with mlflow_store(pipeline_run["work"]):
        return export_bundle(pipeline_run["result"]["bundle_uri"], tmp_path_factory.mktemp("v2") / "bundle")


@pytest.fixture(scope="module")
def server(bundle, pipeline_run, tmp_path_factory):
    env = {"IMGSIM_MODEL_URI": str(bundle), "IMGSIM_GALLERY_ROOT": str(pipeline_run["root"]),
           "IMGSIM_DEFAULT_K": "4", "IMGSIM_MAX_K": "20"}
    srv = start_mlserver(env, tmp_path_factory.mktemp("logs") / "mlserver.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def gallery(bundle, pipeline_run):
    return {"searcher": Searcher(bundle), "root": pipeline_run["root"]}


def infer(server, inputs: list[dict], **params) -> requests.Response:
    body = {"inputs": inputs, **({"parameters": params} if params else {})}
    return requests.post(f"{server.rest}/v2/models/imgsim/infer", json=body, timeout=30)


def images(*data: bytes) -> dict:
    return {"name": "images", "datatype": "BYTES", "shape": [len(data)],
            "data": [base64.b64encode(d).decode() for d in data]}


def outputs(reply: dict) -> dict:
    return {o["name"]: o for o in reply["outputs"]}


def test_answers_equal_in_process_search_as_typed_tensors_and_as_the_v1_answer(server, gallery):
    searcher, root = gallery["searcher"], gallery["root"]
    picked = searcher.index.items[:5]
    data = [(root / item.path).read_bytes() for item in picked]
    reply = infer(server, [images(*data)], k=5, format="json")
    assert reply.status_code == 200, reply.text
    out = outputs(reply.json())
    assert out["ids"]["shape"] == [5, 5] and out["ids"]["datatype"] == "INT64"
    answer = json.loads(out["answer"]["data"][0])
    for i, expected in enumerate(searcher.search_bytes(data, 5)):
        want = [n.id for n in expected.neighbours]
        assert out["ids"]["data"][5 * i:5 * i + 5] == want
        assert [n["id"] for n in answer["results"][i]["neighbours"]] == want
        assert np.allclose(out["scores"]["data"][5 * i:5 * i + 5], [n.score for n in expected.neighbours], atol=1e-5)
        assert out["labels"]["data"][5 * i:5 * i + 5] == [n.label for n in expected.neighbours]
        assert out["predicted"]["data"][i] == expected.predicted_label
    identity = searcher.bundle.identity()
    assert reply.json()["parameters"]["index_sha256"] == identity["index_sha256"] == answer["index_sha256"]


def test_id_path_filters_and_the_default_k(server, gallery):
    searcher = gallery["searcher"]
    item = searcher.index.items[3]
    by_id = outputs(infer(server, [{"name": "id", "datatype": "INT64", "shape": [1], "data": [item.id]}]).json())
    assert len(by_id["ids"]["data"]) == 4 and "answer" not in by_id  # the server's default_k; typed tensors only
    assert by_id["ids"]["data"] == [r.id for r in searcher.search_id(item.id, 4).neighbours]
    path = {"name": "path", "datatype": "BYTES", "shape": [1], "data": [item.path]}
    by_path = outputs(infer(server, [path], k=3).json())
    assert by_path["ids"]["data"] == [n.id for n in searcher.search_bytes(
        [(gallery["root"] / item.path).read_bytes()], 3)[0].neighbours]
    label = searcher.index.items[0].label
    filtered = outputs(infer(server, [path], k=6, labels=[label], exclude_ids=[searcher.index.items[0].id]).json())
    assert set(filtered["labels"]["data"]) == {label} and searcher.index.items[0].id not in filtered["ids"]["data"]


@pytest.mark.parametrize("inputs, params, message", [
    ([{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}], {}, "is not valid base64"),
    ([images(b"not an image")], {}, "image"),
    ([images(b"x"), {"name": "id", "datatype": "INT64", "shape": [1], "data": [1]}], {}, "exactly one input"),
    ([{"name": "pixels", "datatype": "FP32", "shape": [1], "data": [0.5]}], {}, "exactly one input"),
    ([{"name": "id", "datatype": "INT64", "shape": [1], "data": [10 ** 9]}], {}, "id"),
    ([{"name": "path", "datatype": "BYTES", "shape": [1], "data": ["../../etc/passwd"]}], {}, "gallery"),
    ([images(b"x")], {"k": 0}, "k must be between 1 and 20"),
    ([images(b"x")], {"labels": ["no-such-label"]}, "no-such-label"),
    ([images(*[b"x"] * 40)], {}, "at most"),
    ([images(b"x")], {"format": "xml"}, "'format' must be one of tensors, json"),
])
def test_bad_requests_get_400_with_a_message(server, inputs, params, message):
    reply = infer(server, inputs, **params)
    assert reply.status_code == 400 and message in reply.json()["error"], reply.text


def test_grpc_answers_like_rest_and_refuses_bad_input_with_invalid_argument(server, gallery):
    item = gallery["searcher"].index.items[7]
    path = str(gallery["root"] / item.path)
    over_grpc = oip_grpc(server, "--image", path, "--k", "5", "--format", "json")
    over_rest = outputs(infer(server, [images((gallery["root"] / item.path).read_bytes())], k=5).json())
    assert over_grpc["outputs"]["ids"] == over_rest["ids"]["data"]
    assert over_grpc["answer"]["results"][0]["neighbours"][0]["id"] == over_rest["ids"]["data"][0]
    label = item.label
    filtered = oip_grpc(server, "--image", path, "--k", "3", "--labels", json.dumps([label]))
    assert set(filtered["outputs"]["labels"]) == {label}
    bad = oip_grpc(server, "--raw", "not an image")
    assert bad["code"] == "INVALID_ARGUMENT" and "image" in bad["details"]
    assert oip_grpc(server, "--image", path, "--labels", "[")["code"] == "INVALID_ARGUMENT"


def test_health_metadata_and_still_serving_after_bad_requests(server, gallery):
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/imgsim/ready"):
        assert requests.get(server.rest + path, timeout=5).status_code == 200, path
    assert requests.get(f"{server.rest}/v2/models/imgsim", timeout=5).json()["name"] == "imgsim"
    for _ in range(3):
        assert infer(server, [images(b"garbage")]).status_code == 400
    item = gallery["searcher"].index.items[0]
    good = infer(server, [{"name": "id", "datatype": "INT64", "shape": [1], "data": [item.id]}])
    assert good.status_code == 200
    assert requests.get(f"{server.metrics}/metrics", timeout=5).status_code == 200
