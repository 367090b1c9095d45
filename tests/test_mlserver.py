"""The Open Inference Protocol server: the real MLServer on model_server/v2 (`serve.py start`, MLServer 1.7 in its own
environment) on loopback ports, answering as the Seldon v1 server does, refusing bad input with 4xx, over REST and
gRPC (the gRPC client runs in MLServer's environment: support/oip_client.py)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from imgsim.serve.search import Filter, Searcher
from support.servers import oip_grpc, start_mlserver
from tests.bundles import pipeline_bundle
from tests.test_fuzz import FUZZ, assert_answered, image_bytes, json_values, numbers, paths, post_json

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(pipeline_run, tmp_path_factory):
    return pipeline_bundle(pipeline_run, tmp_path_factory.mktemp("v2") / "bundle")


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
    metadata = requests.get(f"{server.rest}/v2/models/imgsim", timeout=5).json()
    assert metadata["name"] == "imgsim"
    assert metadata["parameters"]["index_sha256"] == gallery["searcher"].bundle.identity()["index_sha256"]
    for _ in range(3):
        assert infer(server, [images(b"garbage")]).status_code == 400
    item = gallery["searcher"].index.items[0]
    good = infer(server, [{"name": "id", "datatype": "INT64", "shape": [1], "data": [item.id]}])
    assert good.status_code == 200
    assert requests.get(f"{server.metrics}/metrics", timeout=5).status_code == 200


def test_a_bundle_that_appears_after_start_makes_the_model_ready(bundle, tmp_path):
    target = tmp_path / "later"
    srv = start_mlserver({"IMGSIM_MODEL_URI": str(target), "IMGSIM_LOAD_BACKOFF_S": "0.2",
                          "IMGSIM_LOAD_BACKOFF_MAX_S": "0.5"}, tmp_path / "later.log", wait_ready=False)
    try:
        ready = f"{srv.rest}/v2/models/imgsim/ready"
        assert requests.get(ready, timeout=5).status_code != 200
        assert requests.get(f"{srv.rest}/v2/health/ready", timeout=5).status_code != 200
        shutil.copytree(bundle, target)
        deadline = time.monotonic() + 60
        while requests.get(ready, timeout=5).status_code != 200:
            assert time.monotonic() < deadline, srv.logs()
            time.sleep(0.3)
        item = Searcher(bundle).index.items[0]
        assert infer(srv, [{"name": "id", "datatype": "INT64", "shape": [1], "data": [item.id]}]).status_code == 200
    finally:
        srv.stop()


# ---- hostile clients: the v1 server's fuzz properties against this one -----------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


tensors = st.fixed_dictionaries(
    {"name": st.one_of(st.sampled_from(["images", "id", "path", "pixels"]), st.text(max_size=10)),
     "datatype": st.sampled_from(["BYTES", "INT64", "FP32", "BOOL", "UINT8", "X"]),
     "shape": st.one_of(st.lists(st.integers(-2, 50), max_size=3), json_values),
     "data": st.one_of(st.lists(st.one_of(image_bytes.map(_b64), numbers, paths, json_values), max_size=5),
                       json_values)},
    optional={"parameters": st.one_of(st.fixed_dictionaries(
        {}, optional={"content_type": st.sampled_from(["base64", "str", "np", "x"])}), json_values)})
v2_bodies = st.one_of(st.fixed_dictionaries({"inputs": st.lists(tensors, max_size=3)}, optional={
    "parameters": st.one_of(st.fixed_dictionaries({}, optional={
        "k": st.one_of(numbers, json_values), "labels": json_values, "exclude_ids": json_values,
        "format": st.one_of(st.sampled_from(["json", "tensors"]), json_values)}), json_values),
    "id": json_values, "outputs": st.one_of(json_values, st.lists(st.fixed_dictionaries(
        {"name": st.one_of(st.sampled_from(["ids", "scores", "labels", "predicted", "answer"]), json_values)},
        optional={"parameters": st.one_of(st.fixed_dictionaries({"binary_data": json_values}), json_values)}),
        max_size=6))}), json_values)


@FUZZ
@given(body=v2_bodies)
def test_any_json_body_is_answered_200_or_4xx(server, body):
    assert_answered(post_json(f"{server.rest}/v2/models/imgsim/infer", body, timeout=60))


@FUZZ
@given(raw=st.text(max_size=2000).map(str.encode),
       content_type=st.sampled_from(["application/json", "application/octet-stream", "text/plain", ""]))
def test_any_text_body_is_answered_200_or_4xx(server, raw, content_type):
    assert_answered(requests.post(f"{server.rest}/v2/models/imgsim/infer", data=raw, timeout=60,
                                  headers={"Content-Type": content_type} if content_type else {}))


def test_a_body_that_is_not_utf8_is_a_400_not_mlserver_s_500(server):
    """MLServer 1.7.1's handler of a body that is not a JSON object renders it as UTF-8 and fails
    (UnicodeDecodeError, a 500); serve.py's guard refuses such a body first."""
    reply = requests.post(f"{server.rest}/v2/models/imgsim/infer", data=b">\xb4", timeout=60,
                          headers={"Content-Type": "text/plain"})
    assert reply.status_code == 400 and "UTF-8" in reply.json()["error"]


def test_a_body_over_the_request_limit_is_a_413_and_the_server_keeps_serving(bundle, gallery, tmp_path):
    srv = start_mlserver({"IMGSIM_MODEL_URI": str(bundle), "IMGSIM_MAX_REQUEST_BYTES": "4096"},
                         tmp_path / "limited.log")
    try:
        url = f"{srv.rest}/v2/models/imgsim/infer"
        big = json.dumps({"inputs": [images(b"x" * 8000)]}).encode()
        declared = requests.post(url, data=big, headers={"Content-Type": "application/json"}, timeout=30)
        streamed = requests.post(url, data=iter([big[:3000], big[3000:]]), timeout=30,  # chunked: no length
                                 headers={"Content-Type": "application/json"})
        for reply in (declared, streamed):
            assert reply.status_code == 413 and "IMGSIM_MAX_REQUEST_BYTES" in reply.json()["error"], reply.text
        item = gallery["searcher"].index.items[0]
        small = infer(srv, [{"name": "id", "datatype": "INT64", "shape": [1], "data": [item.id]}])
        assert small.status_code == 200 and requests.get(f"{srv.rest}/v2/health/ready", timeout=5).ok
    finally:
        srv.stop()


def test_client_errors_are_logged_in_one_line_and_nothing_in_imgsim_s_code_failed_unexpectedly(server, gallery):
    """MLServer logs each error a model raises with its trace, a client's bad input included, as an ERROR;
    serve.py logs a client error as a one-line WARNING. So the log has the messages of the bad requests this module
    sent (fuzz included), and a trace through imgsim's code would be an unexpected failure: there is none."""
    bad = oip_grpc(server, "--raw", "not an image")
    assert bad["code"] == "INVALID_ARGUMENT"
    item = gallery["searcher"].index.items[0]
    assert infer(server, [{"name": "id", "datatype": "INT64", "shape": [1], "data": [item.id]}]).status_code == 200
    log = server.log.read_text(errors="replace")
    said = [line for line in log.splitlines() if bad["details"] in line]
    assert said and all("WARNING" in line and "ERROR" not in line for line in said), said
    assert [block for block in log.split("Traceback (most recent call last):")[1:] if "imgsim" in block] == []
    assert "unexpected failure while answering" not in log


def test_imgsim_query_and_wait_ready_speak_v2(server, gallery, tmp_path):
    searcher, root = gallery["searcher"], gallery["root"]
    item = searcher.index.items[11]
    cli = [str(Path(sys.executable).with_name("imgsim"))]
    waited = subprocess.run([*cli, "wait-ready", "--url", server.rest, "--protocol", "v2", "--timeout-s", "10"],
                            capture_output=True, text=True, timeout=120)
    assert waited.returncode == 0 and "ready after" in waited.stdout, waited.stderr
    label = searcher.index.items[0].label
    out = subprocess.run([*cli, "query", str(root / item.path), "--url", server.rest, "--protocol", "v2", "-k", "3",
                          "--labels", label], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[2:]]
    expected = searcher.search_bytes([(root / item.path).read_bytes()], 3, Filter(labels=frozenset({label})))[0]
    assert [int(r[1]) for r in rows] == [n.id for n in expected.neighbours] and {r[2] for r in rows} == {label}
    (tmp_path / "notes.png").write_text("not an image")
    # A folder is refused here; a file that is no image, by the server (its 400 and message).
    for query, message in ((tmp_path, f"cannot read the image {tmp_path}"), (tmp_path / "notes.png",
                                                                            "server answered 400")):
        refused = subprocess.run([*cli, "query", str(query), "--url", server.rest, "--protocol", "v2"],
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "Traceback" not in refused.stderr and message in refused.stderr, \
            refused.stderr
    grpc = subprocess.run([*cli, "query", str(root / item.path), "--grpc", server.grpc, "--protocol", "v2"],
                          capture_output=True, text=True, timeout=120)
    assert grpc.returncode != 0 and "support/oip_client.py" in grpc.stderr


def test_the_search_page_relays_to_a_v2_server(server, gallery):
    from imgsim.serve.page import UiConfig, create_app

    searcher, root = gallery["searcher"], gallery["root"]
    page = create_app(UiConfig(url=server.rest, protocol="v2", gallery_root=str(root))).test_client()
    status = page.get("/api/status").get_json()
    assert status["ready"] and status["index_sha256"] == searcher.bundle.identity()["index_sha256"]
    item = searcher.index.items[5]
    found = page.post("/api/search", data={"image": (io.BytesIO((root / item.path).read_bytes()), "q.png"), "k": "4"})
    assert found.status_code == 200, found.get_data(as_text=True)
    expected = searcher.search_bytes([(root / item.path).read_bytes()], 4)[0]
    assert [n["id"] for n in found.get_json()["results"][0]["neighbours"]] == [n.id for n in expected.neighbours]
    more = page.post("/api/more", json={"id": item.id, "k": 3})
    assert [n["id"] for n in more.get_json()["results"][0]["neighbours"]] == \
        [n.id for n in searcher.search_id(item.id, 3).neighbours]
    bad = page.post("/api/search", data={"image": (io.BytesIO(b"not an image"), "q.png")})
    assert bad.status_code == 400 and "image" in bad.get_json()["error"]
    unknown = page.post("/api/more", json={"id": 10 ** 9})
    assert unknown.status_code == 400 and "id" in unknown.get_json()["error"]


def test_the_charts_v2_container_runs_as_rendered_and_its_helm_test_passes(bundle, tmp_path):
    """The chart's MLServer container settings (protocol v2) start the real server: its probe paths and metrics
    endpoint answer, and the release's `helm test` script finds k neighbours."""
    from tests.test_deploy import VARIANTS, _container, env_of, of_kind, render

    values = VARIANTS["v2"] | {"tests": {"k": 3}}
    container = _container(values)
    ports = ("MLSERVER_HTTP_PORT", "MLSERVER_GRPC_PORT", "MLSERVER_METRICS_PORT")  # free loopback ones here
    env = {name: value for name, value in env_of(container).items() if name not in ports}
    srv = start_mlserver(env | {"IMGSIM_MODEL_URI": str(bundle)}, tmp_path / "mlserver.log")
    try:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert requests.get(srv.rest + container[probe]["httpGet"]["path"], timeout=5).status_code == 200
        metrics = requests.get(srv.metrics + env["MLSERVER_METRICS_ENDPOINT"], timeout=5)
        assert metrics.status_code == 200 and "model_infer_request" in metrics.text
        (pod,) = [d for d in render(values) if d["kind"] == "Pod"]
        script = pod["spec"]["containers"][0]["args"][0].replace("http://sim-imgsim-default:8000", srv.rest)
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and result.stdout.startswith("3 neighbours"), result.stdout + result.stderr
    finally:
        srv.stop()
    assert of_kind(render(values), "SeldonDeployment")[0]["spec"]["protocol"] == "v2"


def test_imgsim_metrics_are_on_mlserver_s_endpoint(server, gallery):
    def value(text: str, name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and (line[len(name)] in " {"))

    before = requests.get(f"{server.metrics}/metrics", timeout=5).text
    item = gallery["searcher"].index.items[2]
    data = (gallery["root"] / item.path).read_bytes()
    assert infer(server, [images(data, data)]).status_code == 200
    assert infer(server, [images(b"not an image")]).status_code == 400
    after = requests.get(f"{server.metrics}/metrics", timeout=5).text
    assert value(after, "imgsim_queries_total") - value(before, "imgsim_queries_total") == 2
    assert value(after, "imgsim_rejected_requests_total") - value(before, "imgsim_rejected_requests_total") == 1
    assert value(after, "imgsim_index_size") == len(gallery["searcher"].index.items)
    for stage in ("decode", "embed", "search"):  # histograms labelled by model, as MLServer's own metrics
        assert value(after, f"imgsim_{stage}_seconds_count") > value(before, f"imgsim_{stage}_seconds_count")
    assert 'model_name="imgsim"' in after
