"""The protocol-free serving core: a Query's own checks, the one error-to-status mapping, the one body limit, the one
metrics helper; and the v1 and v2 adapters over it (each run in its own environment: seldon-core and MLServer are
not in this one)."""

from __future__ import annotations

import ast
import dataclasses
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from imgsim.errors import BadInput, ImgsimError
from imgsim.serve.graph import EmbedService, ShardAnswerError, ShardService
from imgsim.serve.inputs import read_gallery_file
from imgsim.serve.limits import SMALL_BODY, body_limit, too_large, upload_limit
from imgsim.serve.query import (COUNTER, TIMER, Answer, Encoded, Metric, NotFound, Query, UpstreamError, identity_of,
                                is_rejection, metrics_of, status_for)
from imgsim.serve.search import Filter
from imgsim.serve.service import SimilarityService
from imgsim.serve.settings import ServiceConfig
from support.servers import in_serve_env, in_v2_env

REPO = Path(__file__).resolve().parents[1]


# ---- Query ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    ({}, "exactly one of images, id or path, got none"),
    ({"images": [b"x"], "id": 1}, "got images and id"),
    ({"id": 1, "path": "a.png"}, "got id and path"),
    ({"id": True}, "id must be an integer, got True"),
    ({"id": 1.0}, "id must be an integer, got 1.0"),
    ({"id": 1, "k": "5"}, "k must be an integer, got '5'"),
    ({"images": []}, "images must be a non-empty sequence"),
    ({"images": b"\x89PNG"}, "images must be a non-empty sequence"),  # one image's bytes, not a list of images
    ({"images": (b for b in [b"x"])}, "images must be a non-empty sequence"),  # no length: the batch limit needs one
    ({"id": 1, "filters": {"labels": ["a"]}}, "filters must be a Filter"),
])
def test_a_query_refuses_what_no_adapter_may_build(fields, message):
    with pytest.raises(BadInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        Query(**fields)


def test_a_query_is_frozen_and_takes_each_form():
    where = Filter(frozenset({"circle"}), frozenset({3}))
    by_id, by_path, by_images = Query(k=4, filters=where, id=0), Query(path="circle/000.png"), Query(images=[b"x"])
    assert (by_id.k, by_id.filters, by_id.id, by_id.images) == (4, where, 0, None)
    assert by_path.k is None and by_path.path == "circle/000.png" and by_images.images == [b"x"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        by_id.k = 5


def test_encoded_images_are_decoded_one_at_a_time_as_read():
    decoded = []

    def decode(element, i):
        decoded.append(i)
        return element.encode()

    images = Encoded(["a", "b", "c"], decode)
    query = Query(images=images)
    assert len(query.images) == 3 and decoded == []  # counting them decodes nothing
    walk = iter(query.images)
    assert next(walk) == b"a" and decoded == [0]
    assert list(walk) == [b"b", b"c"] and decoded == [0, 1, 2]
    assert images[2] == b"c"


def test_a_query_takes_its_path_as_sent_so_the_server_says_what_is_wrong_with_it(tmp_path):
    # HEAD's words on the wire: a server without gallery_root refuses any path query as disabled; one with it
    # refuses a path that is no string (null included: v1 sends it as "") in read_gallery_file's words.
    closed = SimilarityService(ServiceConfig(model_uri="/nonexistent", poll_interval_s=0))
    rooted = SimilarityService(ServiceConfig(model_uri="/nonexistent", gallery_root=str(tmp_path), poll_interval_s=0))
    for path in (42, "", ["a.png"]):
        with pytest.raises(BadInput, match="path queries are disabled"):
            closed.images(Query(path=path))
        with pytest.raises(BadInput, match="^'path' must be a non-empty string$"):
            rooted.images(Query(path=path))


def test_an_answer_names_its_identity_and_counts_its_queries():
    body = {"results": [{"neighbours": []}, {"neighbours": []}], "model_version": "3", "index_size": "10",
            "shards": 3}
    answer = Answer(body, {"search": 1.5})
    assert answer.identity == identity_of(body) == {"model_version": "3", "index_size": "10"} and answer.queries == 2
    assert not hasattr(answer, "tags")  # (Seldon's meta.tags is the v1 adapter's word for it)


# ---- status_for ----------------------------------------------------------------------------------------------

def test_status_for_maps_each_kind_of_failure_once():
    assert status_for(BadInput("k must be between 1 and 20, got 0")) == (400, "k must be between 1 and 20, got 0")
    assert status_for(ShardAnswerError("shard 1 sent an answer")) == (502, "shard 1 sent an answer")
    assert status_for(UpstreamError("a node's answer")) == (502, "a node's answer")
    assert status_for(ImgsimError("not ready: still loading")) == (503, "not ready: still loading")
    assert status_for(NotFound("path 'a.png' does not exist in the gallery")) == (
        404, "path 'a.png' does not exist in the gallery")
    assert issubclass(ShardAnswerError, UpstreamError) and issubclass(NotFound, BadInput)


def test_a_missing_gallery_file_is_404_where_the_url_names_it_and_400_where_a_query_does(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(NotFound) as thumbnail:  # the page's /thumb/<path>
        read_gallery_file(tmp_path, "nope.png", 100, missing=NotFound)
    with pytest.raises(BadInput) as query:  # a server's path query: the query is what is wrong
        read_gallery_file(tmp_path, "nope.png", 100)
    assert status_for(thumbnail.value) == (404, "path 'nope.png' does not exist in the gallery")
    assert status_for(query.value) == (400, "path 'nope.png' does not exist in the gallery")
    with pytest.raises(BadInput) as escape:
        read_gallery_file(tmp_path, "../a.png", 100, missing=NotFound)
    assert status_for(escape.value)[0] == 400  # (outside the root: never told whether it exists)


def test_an_unexpected_failure_is_a_500_whose_trace_goes_to_the_log_only(caplog):
    try:
        raise RuntimeError("secret detail at /srv/bundle")
    except RuntimeError as caught:
        exc = caught
        with caplog.at_level(logging.ERROR, logger="imgsim.serve.query"):
            code, message = status_for(exc)
            merger = status_for(exc, "the merger's log")
    assert (code, message) == (500, "internal error; see the server log") and "secret" not in message
    assert merger == (500, "internal error; see the merger's log")
    records = [r for r in caplog.records if r.name == "imgsim.serve.query"]
    assert len(records) == 2 and all(r.exc_info and r.exc_info[1] is exc for r in records)  # the trace: logged


def test_a_service_that_is_not_ready_answers_503_through_status_for():
    service = SimilarityService(ServiceConfig(model_uri="/nonexistent", poll_interval_s=0))  # never loaded
    with pytest.raises(ImgsimError) as err:
        service.answer(Query(id=0))
    assert status_for(err.value) == (503, "not ready: still loading")


# ---- one metrics helper --------------------------------------------------------------------------------------

def test_an_answer_s_metrics_have_the_same_names_on_every_server():
    answer = Answer({"results": [{}, {}, {}]}, {"decode": 4.0, "embed": 2.0, "search": 0.5})
    assert metrics_of(answer) == [Metric(TIMER, "imgsim_decode_seconds", 4.0), Metric(TIMER, "imgsim_embed_seconds", 2.0),
                                  Metric(TIMER, "imgsim_search_seconds", 0.5), Metric(COUNTER, "imgsim_queries", 3)]
    assert [is_rejection(code) for code in (400, 404, 500, 502, 503)] == [True, True, False, False, False]


def test_the_adapters_turn_answers_into_metrics_through_the_one_helper():
    for path in ("model_server/ModelServer.py", "model_server/v2/imgsim_v2.py", "model_server/v2/imgsim_v2_metrics.py"):
        tree = ast.parse((REPO / path).read_text())
        read = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        compared = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Compare) and any(
            isinstance(c, ast.Constant) and c.value == 400 for c in [n.left, *n.comparators])]
        assert "timings" not in read and compared == [], f"{path} reads timings or compares a status with 400"


# ---- the server's limits on a query ---------------------------------------------------------------------------

def test_the_service_checks_k_and_the_batch_against_its_settings():
    service = SimilarityService(ServiceConfig(model_uri="/nonexistent", max_k=20, default_k=5, max_batch=2,
                                              poll_interval_s=0))
    gallery = SimpleNamespace(gallery_size=8)
    assert service.k_within(None, gallery) == 5 and service.k_within(20, gallery) == 8  # at most the gallery
    for k in (0, 21):
        with pytest.raises(BadInput, match=f"k must be between 1 and 20, got {k}"):
            service.k_within(k, gallery)
    assert list(service.images(Query(images=[b"a", b"b"]))) == [b"a", b"b"]
    with pytest.raises(BadInput, match="'images' has 3 entries; at most 2 per request"):
        service.images(Query(images=Encoded(["a", "b", "c"], lambda e, i: pytest.fail("decoded past the limit"))))
    with pytest.raises(BadInput, match="path queries are disabled"):
        service.images(Query(path="a.png"))


def test_the_embedder_answers_through_the_service_s_one_path_and_a_shard_refuses_a_query():
    assert EmbedService.answer is SimilarityService.answer  # (only what it does with the embeddings differs)
    with pytest.raises(BadInput, match="image queries only"):
        EmbedService.answer_id(None, 0, None, 5, None)
    shard = ShardService(ServiceConfig(model_uri="/nonexistent", shards=2, shard=1, poll_interval_s=0))
    shard.searcher = SimpleNamespace(gallery_size=10)  # serving: still, a query would search one part only
    with pytest.raises(BadInput, match="an index shard answers the embedder's message"):
        shard.answer(Query(images=[b"x"]))


# ---- one body limit ------------------------------------------------------------------------------------------

def test_the_body_limit_is_max_request_bytes_per_message():
    cfg = ServiceConfig(max_request_bytes=1000, shards=3)
    assert body_limit(cfg) == 1000 and body_limit(cfg, messages=cfg.shards) == 3000
    assert too_large(1000) == "the request body is larger than 1000 bytes"


# Where a server reads a request body: each takes its limit from imgsim.serve.limits, none computes its own.
SERVERS = ["model_server/ModelServer.py", "model_server/ShardMerger.py", "model_server/v2/serve.py",
           "model_server/v2/imgsim_v2.py", *(str(p.relative_to(REPO)) for p in sorted((REPO / "imgsim/serve").glob("*.py"))
                                            if p.name not in ("limits.py", "settings.py"))]


def _operands(node: ast.BinOp) -> set[str]:
    """The names a sum or product adds or multiplies directly (``a.max_image_bytes + SMALL_BODY``: both)."""
    return {side.id if isinstance(side, ast.Name) else side.attr for side in (node.left, node.right)
            if isinstance(side, (ast.Name, ast.Attribute))}


def _calls(source: str) -> set[str]:
    """The functions ``source`` calls, by name (``f(...)`` and ``module.f(...)``): comments and strings do not count."""
    tree = ast.parse(source)
    return {n.func.id if isinstance(n.func, ast.Name) else n.func.attr for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute))}


@pytest.mark.parametrize("path", SERVERS)
def test_no_server_computes_a_body_limit_of_its_own(path):
    tree = ast.parse((REPO / path).read_text())
    own = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "max_request_bytes"]
    assert own == [], f"{path} reads max_request_bytes at line(s) {own}: use imgsim.serve.limits.body_limit"
    small = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "SMALL_BODY" for t in node.targets)]
    assert small == [], f"{path} defines its own SMALL_BODY at line(s) {small}"
    # The page's upload limit (an image and SMALL_BODY beside it) is limits.upload_limit's arithmetic, not its own.
    sums = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.BinOp) and isinstance(
        node.op, (ast.Add, ast.Mult)) and _operands(node) & {"SMALL_BODY", "max_image_bytes", "max_request_bytes"}]
    assert sums == [], f"{path} computes a limit from SMALL_BODY or max_image_bytes at line(s) {sums}"


def test_a_limit_check_finds_calls_not_text():
    assert _calls("limit = limits.body_limit(cfg)\nother = upload_limit(1)\n") == {"body_limit", "upload_limit"}
    assert _calls("# body_limit(cfg)\nlimit = 'body_limit(cfg)'\nbody_limit\n") == set()


def test_the_body_readers_use_the_one_limit():
    for path in ("model_server/ModelServer.py", "model_server/ShardMerger.py", "model_server/v2/serve.py"):
        assert "body_limit" in _calls((REPO / path).read_text()), path
    assert "upload_limit" in _calls((REPO / "imgsim/serve/page.py").read_text())
    from imgsim.serve import page

    assert page.SMALL_BODY is SMALL_BODY  # (the page's routes: SMALL_BODY, and one image beside it for uploads)
    app = page.create_app(page.UiConfig(url="http://127.0.0.1:9", in_flight=2, max_image_bytes=1000))
    assert app.config["MAX_CONTENT_LENGTH"] == upload_limit(1000) == 1000 + SMALL_BODY


def test_the_page_refuses_a_body_past_the_limit_in_the_shared_words(tmp_path):
    from imgsim.serve.page import UiConfig, create_app

    client = create_app(UiConfig(url="http://127.0.0.1:9", in_flight=2)).test_client()
    reply = client.post("/api/more", data=b"x" * (SMALL_BODY + 1), content_type="application/json")
    assert reply.status_code == 413 and reply.get_json() == {"error": too_large(SMALL_BODY)}


def test_the_page_maps_a_thumbnail_s_failure_through_status_for(tmp_path):
    from imgsim.serve.page import UiConfig, create_app

    (tmp_path / "a.png").write_bytes(b"not an image")
    client = create_app(UiConfig(url="http://127.0.0.1:9", gallery_root=str(tmp_path), in_flight=2)).test_client()
    missing, escape, broken = (client.get(f"/thumb/{name}") for name in ("nope.png", "../x.png", "a.png"))
    assert (missing.status_code, missing.get_json()) == (404, {"error": "path 'nope.png' does not exist in the gallery"})
    assert escape.status_code == 400 and "outside the gallery root" in escape.get_json()["error"]
    assert broken.status_code == 400
    assert '"does not exist"' not in (REPO / "imgsim/serve/page.py").read_text()  # no status read from a message


def test_the_page_imports_the_core_without_the_search_stack():
    code = "import sys, imgsim.serve.page; print(sorted(m for m in ('imgsim.serve.search', 'imgsim.bundle') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


# ---- the v1 adapter (model_server/ModelServer.py), in the Seldon wrapper's environment --------------------------

V1 = """
import json, sys
from types import SimpleNamespace
sys.path.insert(0, "model_server")
from seldon_core.flask_utils import SeldonMicroserviceException
from Embedder import Embedder
from ModelServer import ModelServer, query_of
from imgsim.errors import BadInput
from imgsim.serve.query import Answer

def refusal(server, body):
    try:
        server.predict_raw(body)
    except SeldonMicroserviceException as exc:
        return [exc.status_code, exc.message]

def error(run):
    try:
        run()
    except BadInput as exc:
        return str(exc)

def serving(**params):  # ready, with no bundle: a request gets as far as the service's own checks
    server = ModelServer(model_uri="/nonexistent", poll_interval_s=0, **params)
    server.service.searcher = SimpleNamespace(gallery_size=10)
    return server

malformed = [{"jsonData": {"id": "seven"}}, {"jsonData": {"id": 0, "k": "5"}}, {"jsonData": {}}, {"jsonData": [1, 2]},
             {"jsonData": {"images": "not-a-list"}}, {"jsonData": {"id": 0, "labels": "circle"}}]
loading = [ModelServer(model_uri="/nonexistent", poll_interval_s=0),
           Embedder(model_uri="/nonexistent", poll_interval_s=0, shards=2)]
image, tagged = query_of({"image": "%%%"}, None, {}), query_of(None, b"png", {"k": 3.0, "labels": ["circle"]})
ready, counted = serving(), serving()
refusal(counted, {"jsonData": {"id": "seven"}})  # one rejected request, reported with the next answer's metrics
metrics = counted._request_metrics(Answer({"results": [{}, {}]}, {"decode": 1.0, "embed": 2.0, "search": 3.0}))
print(json.dumps({
    "not_ready": [refusal(server, body) for server in loading for body in malformed],
    "no_root": [refusal(ready, {"jsonData": {"path": p}}) for p in (42, None, "a.png")],
    "rooted": [refusal(serving(gallery_root=sys.argv[1]), {"jsonData": {"path": p}}) for p in (42, None)],
    "image_lazy": type(image.images).__name__, "image_read": error(lambda: list(image.images)),
    "tagged": [tagged.k, sorted(tagged.filters.labels), list(tagged.images)[0].decode()],
    "json_k_wins": query_of({"id": 1, "k": 2}, None, {"k": 9}).k,
    "two_forms": error(lambda: query_of({"image": "aGk=", "id": 1}, None, {})),
    "metrics": metrics,
}))
"""


def test_the_v1_adapter_reads_seldon_s_shapes_into_a_query_after_the_readiness_check(tmp_path):
    got = in_serve_env(V1, str(tmp_path))
    # Not ready wins: any request, a malformed one too, is a 503 while the bundle loads (plain server and embedder).
    assert got["not_ready"] == [[503, "not ready: still loading"]] * 12
    disabled = "path queries are disabled on this server (no gallery_root configured); send the image bytes"
    assert got["no_root"] == [[400, disabled]] * 3
    assert got["rooted"] == [[400, "'path' must be a non-empty string"]] * 2
    # jsonData.image is decoded as it is read, inside the service's decode timing (imgsim_decode_seconds).
    assert got["image_lazy"] == "Encoded" and got["image_read"] == "image is not valid base64"
    assert got["tagged"] == [3, ["circle"], "png"] and got["json_k_wins"] == 2
    assert got["two_forms"] == "jsonData needs exactly one of 'image' (base64), 'images' (list of base64), 'path' or 'id'"
    assert got["metrics"] == [{"type": "TIMER", "key": "imgsim_decode_seconds", "value": 1.0},
                              {"type": "TIMER", "key": "imgsim_embed_seconds", "value": 2.0},
                              {"type": "TIMER", "key": "imgsim_search_seconds", "value": 3.0},
                              {"type": "COUNTER", "key": "imgsim_queries_total", "value": 2},
                              {"type": "COUNTER", "key": "imgsim_rejected_requests_total", "value": 1}]


# ---- the v2 adapter (model_server/v2/imgsim_v2.py), in MLServer's environment ----------------------------------

V2 = """
import asyncio, json, sys, threading
from types import SimpleNamespace
sys.path.insert(0, "model_server/v2")
from mlserver.errors import MLServerError
from mlserver.settings import ModelSettings
from mlserver.types import InferenceRequest
from prometheus_client import REGISTRY
import imgsim_v2, imgsim_v2_metrics
from imgsim.errors import BadInput
from imgsim.serve.query import Answer
from imgsim.serve.service import SimilarityService
from imgsim.serve.settings import ServiceConfig

def request(*inputs, **params):
    return InferenceRequest.model_validate({"inputs": list(inputs), "parameters": params})

def tensor(name, data, **params):
    return {"name": name, "datatype": "BYTES", "shape": [len(data)], "data": data, "parameters": params}

def runtime(ready):
    rt = imgsim_v2.ImgsimRuntime(ModelSettings(name="imgsim", implementation=imgsim_v2.ImgsimRuntime))
    rt.service = SimilarityService(ServiceConfig(model_uri="/nonexistent", poll_interval_s=0, max_batch=4))
    if ready:  # ready, with no bundle: a request gets as far as the service's own checks
        rt.service.searcher = SimpleNamespace(gallery_size=10)
    return rt

def refusal(rt, payload):
    try:
        asyncio.run(rt.predict(payload))
    except MLServerError as exc:
        return [exc.status_code, str(exc)]

def error(run):
    try:
        run()
    except BadInput as exc:
        return str(exc)

malformed = [request(tensor("id", ["seven"])), request(tensor("images", ["x"]), k=0),
             request(tensor("images", ["x"]), tensor("id", ["1"])), request(tensor("path", ["a", "b"]))]
threads = []
def spy(payload, params):
    threads.append(threading.current_thread() is threading.main_thread())
    raise BadInput("spied")
loading, ready = runtime(False), runtime(True)
result = {"not_ready": [refusal(loading, p) for p in malformed],
          "batch": refusal(ready, request(tensor("images", ["eA=="] * 5))),
          "id_first": error(lambda: imgsim_v2.query_of(request(tensor("id", ["MQ==", "!!"], content_type="base64")), {})),
          "path_one": imgsim_v2.query_of(request(tensor("path", ["YS5wbmc="], content_type="base64")), {}).path}
imgsim_v2.query_of = spy
result["spied"] = refusal(ready, request(tensor("id", ["1"])))
result["on_the_loop"] = threads
imgsim_v2_metrics.record("m", Answer({"results": [{}, {}]}, {"decode": 1.0, "embed": 2.0, "search": 3.0}))
result["recorded"] = [REGISTRY.get_sample_value(name, {"model_name": "m"}) for name in (
    "imgsim_queries_total", "imgsim_decode_seconds_sum", "imgsim_embed_seconds_sum", "imgsim_search_seconds_sum")]
print(json.dumps(result))
"""


def test_the_v2_adapter_reads_a_tensor_into_a_query_off_the_event_loop_after_the_readiness_check():
    got = in_v2_env(V2)
    assert got["not_ready"] == [[503, "not ready: still loading"]] * 4  # not ready wins over any malformed request
    assert got["batch"] == [400, "'images' has 5 entries; at most 4 per request"]  # the service's one check
    assert got["id_first"] == "input 'id' takes one gallery id"  # refused before any element is decoded
    assert got["path_one"] == "a.png"
    # The query is read in the executor: a large labels list or tensor never holds up the event loop.
    assert got["spied"] == [400, "spied"] and got["on_the_loop"] == [False]
    assert got["recorded"] == [2.0, 0.001, 0.002, 0.003]
