"""A sharded gallery served by Seldon's graph: embedder TRANSFORMER -> merger COMBINER -> N index-shard MODELs.

The graph test starts every node as a real seldon-core-microservice process and passes each query's messages
between them in the graph's order, which is the role Seldon's executor (the service orchestrator) plays in a
cluster: /transform-input on the embedder, its answer to /predict on every shard, their answers together to
/aggregate on the merger. With an exact index (faiss-flat) the merged answer equals one server's over the whole
bundle: ids, distances and scores.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imgsim.serve import seldon_wire

from imgsim.bundle import ServingBundle
from imgsim.bundle_format import BUNDLE_JSON
from imgsim.errors import BadInput, ImgsimError
from imgsim.index import FAISS_FLAT, GalleryIndex
from imgsim.metrics import exact_topk, recall_at_k
from imgsim.serve.graph import EmbedService, Merger, ShardAnswerError, ShardService
from imgsim.serve.query import Query
from imgsim.serve.search import Filter
from imgsim.serve.settings import ServiceConfig
from imgsim.sharded import part_name
from imgsim.stages.bundle_writer import write_bundle
from imgsim.stages.sharding import shard_bundle
from imgsim.stages.gallery import remove_images
from imgsim.stages.settings import RemoveConfig
from support.servers import run_graph, start_server
from tests.bundles import pipeline_bundle
from tests.test_fuzz import json_values

pytestmark = pytest.mark.slow
SHARDS = 3
MERGER_MAX_REQUEST = 100_000  # the merger's max_request_bytes: its body limit is this times SHARDS


@pytest.fixture(scope="module")
def flat(pipeline_run, tmp_path_factory) -> Path:
    """The pipeline's bundle with its gallery indexed exactly (faiss-flat), so sharded answers can be compared
    with single-server answers value for value."""
    work = tmp_path_factory.mktemp("graph")
    annoy = pipeline_bundle(pipeline_run, work / "annoy")
    whole = ServingBundle.load(annoy)
    whole.index = GalleryIndex.build(np.asarray(whole.index.embeddings), whole.index.items,
                                    n_trees=whole.index.n_trees, next_id=whole.index.next_id, backend=FAISS_FLAT)
    return write_bundle(whole, work / "flat", model_from=annoy)


@pytest.fixture(scope="module")
def sharded(flat, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sharded") / "gallery"
    return out, shard_bundle(flat, out, SHARDS)


def test_shard_bundle_partitions_the_gallery_into_parts_that_each_verify(flat, sharded):
    out, summary = sharded
    whole = ServingBundle.load(flat)
    ids = {item.id for item in whole.index.items}
    assert sorted(p.name for p in out.iterdir()) == ["embedder", *(part_name("shard", i) for i in range(SHARDS))]
    seen: set[int] = set()
    for i in range(SHARDS):
        part = ServingBundle.load(out / part_name("shard", i))  # the probe check of each part
        part_ids = {item.id for item in part.index.items}
        assert part_ids and all(item_id % SHARDS == i for item_id in part_ids) and not part_ids & seen
        seen |= part_ids
        assert part.index.backend == FAISS_FLAT and part.shard.index == i and part.shard.count == SHARDS
        assert summary["shard_items"][i] == len(part_ids)
    assert seen == ids and summary["items"] == len(ids)
    embedder = ServingBundle.load(out / "embedder")
    assert {item.id for item in embedder.index.items} <= set(whole.probes.ids.tolist())
    assert list(embedder.shard.labels) == sorted({item.label for item in whole.index.items})
    assert summary["bytes"] == sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


def _served_recall(bundle: ServingBundle, search_k: int) -> float:
    vectors = np.asarray(bundle.index.embeddings)
    queries = vectors[np.random.default_rng(0).permutation(len(vectors))[:200]]
    served = [bundle.index.search(q, 10, search_k)[0] for q in queries]
    return recall_at_k(served, exact_topk(queries, vectors, 10), 10, queries, vectors)


def test_a_rebuilt_index_is_measured_again_at_the_recall_target_its_bundle_records(pipeline_run, tmp_path):
    # Each shard's index and a gallery change's rebuilt index: tuned and measured as extract does, never the
    # whole's figures copied; a bundle served as given (recall_target 0) keeps its effort.
    annoy = pipeline_bundle(pipeline_run, tmp_path / "annoy")
    whole = ServingBundle.load(annoy)
    whole.index_recall, whole.search_k = 0.5, 10  # figures a rebuilt index must not inherit
    for target in (0.99, 0.0):
        whole.recall_target = target
        weak = write_bundle(whole, tmp_path / f"weak-{target}", model_from=annoy)
        shard_bundle(weak, tmp_path / f"parts-{target}", 2)
        parts = [ServingBundle.load(tmp_path / f"parts-{target}" / part_name("shard", i)) for i in range(2)]
        rebuilt = remove_images(ServingBundle.load(weak), RemoveConfig(bundle="", ids="0", full=True)).bundle
        for part in [*parts, rebuilt]:
            assert part.recall_target == target
            assert _served_recall(part, part.search_k) >= 0.98 if target else part.search_k == 10
        assert all(p.index_recall >= 0.99 for p in parts) if target else all(p.index_recall == 0.5 for p in parts)


def test_bad_sharding_requests_say_what_is_wrong(flat, sharded, tmp_path):
    out, _ = sharded
    with pytest.raises(ImgsimError, match="shards must be an integer between 2 and 256, got 1"):
        shard_bundle(flat, tmp_path / "one", 1)
    with pytest.raises(ImgsimError, match=r"already one part \(shard-1\) of a sharded gallery"):
        shard_bundle(out / "shard-1", tmp_path / "again", 2)
    size = len(ServingBundle.load(flat).index.items)
    with pytest.raises(ImgsimError, match=rf"a gallery of {size} images cannot fill 256 shards .* use fewer shards"):
        shard_bundle(flat, tmp_path / "many", 256)
    assert not (tmp_path / "many").exists()  # nothing half-written
    with pytest.raises(ImgsimError, match="one part of a sharded gallery: change the whole gallery's bundle"):
        remove_images(ServingBundle.load(out / "shard-0"), RemoveConfig(bundle="", ids="0"))


def _service(cls, folder: Path, **settings):
    service = cls(ServiceConfig(model_uri=str(folder), poll_interval_s=0, **settings))
    service.load()
    return service


def test_a_node_is_never_ready_on_a_part_it_was_not_configured_for(flat, sharded):
    out, _ = sharded
    wrong = _service(ShardService, out / "shard-0", shards=SHARDS, shard=1)
    assert not wrong.ready and wrong.load_failed_for_good
    assert "holds part shard-0 of a 3-shard gallery; this node serves shard-1 of 3" in wrong.load_error
    whole = _service(ShardService, flat, shards=SHARDS, shard=0)
    assert not whole.ready and "is a whole bundle, not the shard-0 part" in whole.load_error
    assert "imgsim shard-bundle BUNDLE --shards 3" in whole.load_error
    count = _service(EmbedService, out / "embedder", shards=4)
    assert not count.ready and "set its shards to 3" in count.load_error
    with pytest.raises(ImgsimError, match="needs 'shards'"):
        ShardService(ServiceConfig(model_uri=str(out / "shard-0")))
    with pytest.raises(ImgsimError, match="need 2 <= shards <= 256 and 0 <= shard < shards, got shards=3, shard=3"):
        ServiceConfig(shards=3, shard=3)


@pytest.fixture(scope="module")
def in_process(sharded, pipeline_run) -> dict:
    """The graph's nodes in this process, and one query's real messages between them (as JSON carries them)."""
    out, _ = sharded
    embedder = _service(EmbedService, out / "embedder", shards=SHARDS)
    shards = [_service(ShardService, out / part_name("shard", i), shards=SHARDS, shard=i) for i in range(SHARDS)]
    raw = (pipeline_run["root"] / "circle" / "000.png").read_bytes()
    message = json.loads(json.dumps(embedder.answer(Query(k=4, images=[raw])).body))
    answers = json.loads(json.dumps([s.rank(message).body for s in shards]))
    return {"embedder": embedder, "shards": shards, "image": base64.b64encode(raw).decode(), "raw": raw,
            "message": message, "answers": answers}


def test_the_merger_refuses_a_missing_duplicated_or_foreign_shard(in_process):
    embedder, shards, raw, message, answers = (in_process[key] for key in
                                               ("embedder", "shards", "raw", "message", "answers"))
    merger = Merger(SHARDS)
    assert len(merger.merge(answers)["results"][0]["neighbours"]) == 4
    with pytest.raises(ImgsimError, match=r"shard\(s\) \[2\] of 3 did not answer: the graph must list every shard"):
        merger.merge(answers[:2])
    with pytest.raises(ImgsimError, match="shard 1 answered twice"):
        merger.merge([*answers, answers[1]])
    with pytest.raises(ImgsimError, match="different galleries"):
        merger.merge([answers[0], answers[1], {**answers[2], "gallery": "another"}])
    with pytest.raises(ImgsimError, match="reached a merger of 4 shards"):
        Merger(4).merge(answers)
    with pytest.raises(ImgsimError, match="the embedder serves gallery 'another'.*roll out one sharded gallery"):
        shards[0].rank({**message, "gallery": "another"})
    for bad, reason in [(Query(k=0, images=[raw]), "k must be between 1 and 100"),
                        (Query(id=1), "a sharded gallery answers image queries only"),
                        (Query(images=[raw], filters=Filter(frozenset({"nope"}))), r"unknown label\(s\) \['nope'\]")]:
        with pytest.raises(BadInput, match=reason):
            embedder.answer(bad)
    for bad, reason in [({"image": "aGk="}, "an index shard answers the embedder's message"),
                        ({**message, "results": [{"embedding": [1.0, 2.0]}]}, r"results\[0\].embedding must be a list"),
                        ({**message, "results": [{"embedding": ["x"] * 16}]},
                         r"results\[0\].embedding must be a list")]:
        with pytest.raises(BadInput, match=reason):
            shards[0].rank(bad)


def _first(answers: list, shard: int) -> dict:
    """Shard ``shard``'s nearest neighbour of the first query, to edit in place."""
    return answers[shard]["results"][0]["neighbours"][0]


def _set(shard: int, key: str, value):
    return lambda answers: _first(answers, shard).__setitem__(key, value)


def _repeated(source: int, target: int):
    """Shard ``target``'s last neighbour replaced by shard ``source``'s nearest: one id answered twice."""
    return lambda answers: answers[target]["results"][0]["neighbours"].__setitem__(
        -1, copy.deepcopy(_first(answers, source)))


def _other_shard_s_id(answers: list) -> None:
    _first(answers, 1)["id"] += 1


LONG = "7" * 5000
# A shard's bad answers: (case, the edit, what the merger's error says). Each must be the graph's fault, not the
# client's: a ShardAnswerError (HTTP 502) naming the shard, never echoing much of what it sent.
BAD_ANSWERS = [
    ("negative distance", _set(2, "distance", -0.25), r"shard 2 .*distance must be a number from 0 to 2, got -0.25"),
    ("NaN distance", _set(2, "distance", math.nan), r"shard 2 .*distance must be a number from 0 to 2, got nan"),
    ("distance above 2", _set(0, "distance", 2.5), r"shard 0 .*distance must be a number from 0 to 2, got 2.5"),
    ("infinite distance", _set(1, "distance", math.inf), "distance must be a number from 0 to 2, got inf"),
    ("distance as a string", _set(1, "distance", "0.1"), "distance must be a number from 0 to 2, got '0.1'"),
    ("bool distance", _set(1, "distance", False), "distance must be a number from 0 to 2, got False"),
    ("Infinity id", _set(1, "id", math.inf), r"shard 1 .*id must be a whole number from 0 to 2\*\*53, got inf"),
    ("NaN id", _set(1, "id", math.nan), "id must be a whole number from 0 to 2\\*\\*53, got nan"),
    ("bool id", _set(1, "id", True), "id must be a whole number .*, got True"),
    ("string id", _set(1, "id", "4"), "id must be a whole number .*, got '4'"),
    ("fractional id", _set(1, "id", 4.5), "id must be a whole number .*, got 4.5"),
    ("negative id", _set(0, "id", -3), "id must be a whole number .*, got -3"),
    ("an id past 2**53", _set(0, "id", 2**60 * SHARDS), "id must be a whole number .*, got 3458764513820540928"),
    ("a long string as the id", _set(0, "id", LONG), "id must be a whole number .*, got '7777"),
    ("an id of another shard's part", _other_shard_s_id, "shard 1 .*gallery id .* lives in shard 2"),
    ("one id from two shards", _repeated(0, 2),
     r"shard 2 .*gallery id \d+ in results\[0\] came from shard 0 too: each id is in one shard, once"),
    ("one id twice from a shard", _repeated(1, 1),
     r"shard 1 .*came from shard 1 too"),
    ("a neighbour that is no object", lambda a: a[1]["results"][0]["neighbours"].__setitem__(0, [1, 0.5]),
     r"shard 1 .*a neighbour in results\[0\] is not an object: \[1, 0.5\]"),
    ("no distance", lambda a: _first(a, 0).pop("distance"), "distance must be a number from 0 to 2, got None"),
    ("no path", lambda a: _first(a, 0).pop("path"), "needs 'path' and 'label' strings"),
    ("a label that is no string", _set(0, "label", 7), "needs 'path' and 'label' strings"),
    ("more than k neighbours", lambda a: a[0]["results"][0]["neighbours"].extend(a[0]["results"][0]["neighbours"]),
     r"shard 0 .*results\[0\].neighbours must be a list of at most k=4"),
    ("no neighbours", lambda a: a[2]["results"][0].pop("neighbours"), "shard 2 .*must be a list of at most k=4"),
    ("results that are no list", lambda a: a[1].__setitem__("results", "none"), "shard 1 .*'results' \\(a list\\)"),
    ("fewer results", lambda a: a[1].__setitem__("results", []), "shard 1 .*number of results differs"),
    ("NaN items", lambda a: a[1].__setitem__("items", math.nan), "shard 1 .*'items' must be a whole number, got nan"),
    ("a model version that is no string", lambda a: a[2].__setitem__("model_version", [LONG]),
     "shard 2 .*'model_version' must be a string, got \\['7777"),
    ("a NaN probability",
     lambda a: a[0]["results"][0].__setitem__("predicted", {"label": "x", "probability": math.nan}),
     r"shard 0 .*results\[0\].predicted must be null or a label and a probability"),
    ("an answer that is no object", lambda a: a.__setitem__(1, LONG), "message 1 of 3 is not an index shard's answer"),
    ("a NaN shard number", lambda a: a[1].__setitem__("shard", math.nan), "message 1 of 3 is not an index shard's"),
]


@pytest.mark.parametrize("case, edit, reason", BAD_ANSWERS, ids=[case[0] for case in BAD_ANSWERS])
def test_a_shard_s_bad_answer_is_the_graph_s_fault_said_briefly(in_process, case, edit, reason):
    answers = copy.deepcopy(in_process["answers"])
    edit(answers)
    with pytest.raises(ShardAnswerError, match=reason) as refused:
        Merger(SHARDS).merge(answers)
    assert not isinstance(refused.value, BadInput) and len(str(refused.value)) < 250


def test_the_merger_takes_the_edges_of_what_a_shard_may_send(in_process):
    answers = copy.deepcopy(in_process["answers"])
    top = _first(answers, 0)
    top["distance"], top["id"] = 0, float(top["id"])  # a JSON 0, and an id as gRPC carries it (a double)
    _first(answers, 1)["distance"] = 2.0
    _first(answers, 2)["distance"] = 2.0 + 1e-7  # Annoy's float32 rounding past 2
    merged = Merger(SHARDS).merge(answers)["results"][0]["neighbours"]
    assert merged[0]["id"] == int(top["id"]) and isinstance(merged[0]["id"], int) and merged[0]["distance"] == 0.0
    assert max(n["distance"] for n in merged) <= 2.0 and min(n["score"] for n in merged) >= -1.0


HOSTILE = st.one_of(json_values, st.sampled_from([math.nan, math.inf, -math.inf, -0.0, -1e-9, 2.001, 2**53, 2**63, -1,
                                                   True, False, 1.5, "1", None, [], {}, LONG]))


def _mutated(data: st.DataObject, answers: list) -> list:
    """``answers`` with one to three edits: a value replaced by a hostile one, a key or list entry removed, or a list
    entry copied over another (an id twice, a shard twice); half of them within one shard's neighbours."""
    answers = copy.deepcopy(answers)
    for _ in range(data.draw(st.integers(1, 3))):
        node = _where_to_edit(data, answers)
        while True:
            keys = list(range(len(node))) if isinstance(node, list) else sorted(node)
            if not keys:
                break
            key = data.draw(st.sampled_from(keys))
            child = node[key]
            if isinstance(child, (list, dict)) and child and data.draw(st.integers(0, 4)):
                node = child  # mostly deeper, where the numbers are
                continue
            action = data.draw(st.sampled_from(["replace", "delete", "copy"]))
            if action == "delete":
                del node[key]
            elif action == "copy" and isinstance(node, list):
                node[data.draw(st.sampled_from(keys))] = copy.deepcopy(child)
            else:
                node[key] = data.draw(HOSTILE)
            break
    return answers


def _where_to_edit(data: st.DataObject, answers: list):
    """The whole list of answers, or (half the time, while it is there) one shard's neighbours of the first query."""
    if not answers or not data.draw(st.booleans()):
        return answers
    try:
        neighbours = answers[data.draw(st.integers(0, len(answers) - 1))]["results"][0]["neighbours"]
    except (KeyError, IndexError, TypeError):  # an earlier edit removed or replaced it
        return answers
    return neighbours if isinstance(neighbours, list) and neighbours else answers


def _assert_valid_answer(answer: dict) -> None:
    """A merged answer a client can use: strict JSON, each query's ranks in order, each id once, distances in
    [0, 2] ascending."""
    json.dumps(answer, allow_nan=False)
    for result in answer["results"]:
        neighbours = result["neighbours"]
        ids, distances = [n["id"] for n in neighbours], [n["distance"] for n in neighbours]
        assert len(set(ids)) == len(ids) and [n["rank"] for n in neighbours] == list(range(1, len(ids) + 1))
        assert distances == sorted(distances) and all(0 <= d <= 2 for d in distances)


MERGER_FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@MERGER_FUZZ
@given(data=st.data())
def test_any_shard_answers_merge_or_fail_as_the_graph_s_fault(in_process, data):
    answers = _mutated(data, in_process["answers"])
    try:
        merged = Merger(SHARDS).merge(answers)
    except ImgsimError as exc:  # ShardAnswerError (502) or the deployment's fault (503); never BadInput (400)
        assert not isinstance(exc, BadInput) and len(str(exc)) < 300, str(exc)
        return
    _assert_valid_answer(merged)


def _start(tmp_path: Path, name: str, interface: str, service_type: str, **settings) -> object:
    env = {f"IMGSIM_{key.upper()}": str(value) for key, value in settings.items()}
    return start_server({**env, "IMGSIM_POLL_INTERVAL_S": "0", "GUNICORN_WORKERS": "1", "GUNICORN_THREADS": "2"},
                        tmp_path / f"{name}.log", interface=interface, service_type=service_type)


@pytest.fixture(scope="module")
def nodes(flat, sharded, tmp_path_factory):
    """Every node of the graph as a real seldon-core-microservice, and one server on the whole bundle."""
    out, _ = sharded
    logs = tmp_path_factory.mktemp("graph-logs")
    settings_of = [("single", "ModelServer", "MODEL", {"model_uri": flat}),
                   ("embedder", "Embedder", "TRANSFORMER", {"model_uri": out / "embedder", "shards": SHARDS}),
                   ("merger", "ShardMerger", "COMBINER", {"shards": SHARDS, "max_request_bytes": MERGER_MAX_REQUEST}),
                   *((f"shard-{i}", "IndexShard", "MODEL", {"model_uri": out / f"shard-{i}", "shards": SHARDS,
                                                            "shard": i}) for i in range(SHARDS))]
    with ThreadPoolExecutor(len(settings_of)) as pool:  # start the six processes at once
        started = list(pool.map(lambda node: _start(logs, node[0], node[1], node[2], **node[3]), settings_of))
    servers = {node[0]: server for node, server in zip(settings_of, started)}
    yield servers
    merger_log = servers["merger"].log.read_text(errors="replace")  # before stopping: Seldon logs noise on SIGTERM
    for server in servers.values():
        server.stop()
    assert "Traceback" not in merger_log, "a shard's answer made the merger log a traceback"


def test_the_sharded_graph_answers_exactly_like_one_server(flat, pipeline_run, nodes):
    servers = nodes

    def graph(body: dict) -> requests.Response:
        """The executor's part: each node's answer becomes the next one's request, in the graph's order."""
        return run_graph(body, servers["embedder"].rest, [servers[f"shard-{i}"].rest for i in range(SHARDS)],
                         servers["merger"].rest)

    size = ServingBundle.load(flat).index.items.__len__()
    files = sorted(pipeline_run["root"].glob("*/00[0-1].png"))
    assert len(files) >= 6
    compared = 0
    for file in files:
        image = base64.b64encode(file.read_bytes()).decode()
        for extra in ({"k": 5}, {"k": size}, {"k": 3, "labels": ["circle", "square"]},
                      {"k": 4, "exclude_ids": [0, 1]}):
            body = {"jsonData": {"image": image, **extra}}
            want = requests.post(f"{servers['single'].rest}/predict", json=body, timeout=30)
            got = graph(body)
            assert want.status_code == got.status_code == 200, got.text
            w, g = want.json()["jsonData"], got.json()["jsonData"]
            assert [(n["id"], n["distance"], n["score"], n["label"], n["path"]) for n in
                    _canonical(g["results"][0]["neighbours"])] == \
                [(n["id"], n["distance"], n["score"], n["label"], n["path"]) for n in
                 _canonical(w["results"][0]["neighbours"])]
            assert g["results"][0]["predicted"] == w["results"][0]["predicted"]
            assert g["index_size"] == w["index_size"] == str(size) and g["model_sha256"] == w["model_sha256"]
            compared += 1
    assert compared == 4 * len(files)
    # The same graph over gRPC (a SeldonDeployment with transport: grpc): binData in, the same answer out.
    data = files[0].read_bytes()
    query = seldon_wire.SeldonMessage(binData=data)
    query.meta.tags["k"].number_value = 5
    with grpc.insecure_channel(servers["embedder"].grpc) as channel:
        message = seldon_wire.TransformerStub(channel).TransformInput(query, timeout=30)
    replies = []
    for i in range(SHARDS):
        with grpc.insecure_channel(servers[f"shard-{i}"].grpc) as channel:
            replies.append(seldon_wire.ModelStub(channel).Predict(message, timeout=30))
    with grpc.insecure_channel(servers["merger"].grpc) as channel:
        merged = seldon_wire.CombinerStub(channel).Aggregate(
            seldon_wire.SeldonMessageList(seldonMessages=replies), timeout=30)
    over_grpc = json_format.MessageToDict(merged.jsonData)["results"][0]["neighbours"]
    want = requests.post(f"{servers['single'].rest}/predict", json={"binData": base64.b64encode(data).decode(),
                         "meta": {"tags": {"k": 5}}}, timeout=30).json()["jsonData"]["results"][0]["neighbours"]
    assert [(n["id"], n["distance"]) for n in _canonical(over_grpc)] == \
        [(n["id"], n["distance"]) for n in _canonical(want)]
    assert merged.meta.tags["shards"].string_value == str(SHARDS)
    with grpc.insecure_channel(servers["merger"].grpc) as channel, pytest.raises(grpc.RpcError) as refused:
        seldon_wire.CombinerStub(channel).Aggregate(
            seldon_wire.SeldonMessageList(seldonMessages=replies[:2]), timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "[2] of 3" in refused.value.details()
    # A bad query is the embedder's 400, as one server's; the graph keeps answering after it.
    bad = graph({"jsonData": {"image": "not base64!"}})
    assert bad.status_code == 400 and "image" in bad.json()["status"]["info"]
    incomplete = requests.post(f"{servers['merger'].rest}/aggregate", json={"seldonMessages": []}, timeout=30)
    assert incomplete.status_code == 503 and "did not answer" in incomplete.json()["status"]["info"]
    assert graph({"jsonData": {"image": image, "k": 2}}).status_code == 200
    assert requests.get(f"{servers['shard-1'].rest}/health/status", timeout=5).ok
    assert requests.get(f"{servers['merger'].rest}/metadata", timeout=5).json()["versions"] == ["3-shards"]
    # The embedder's health names the whole gallery's size, not its own index of probe items.
    health = requests.get(f"{servers['embedder'].rest}/health/status", timeout=5).json()["jsonData"]
    assert health["index_size"] == str(size)


@pytest.fixture(scope="module")
def wire_answers(nodes, in_process) -> list[dict]:
    """The three shards' jsonData for one query, as the real nodes answered it over REST."""
    message = requests.post(f"{nodes['embedder'].rest}/transform-input",
                            json={"jsonData": {"image": in_process["image"], "k": 4}}, timeout=30)
    assert message.status_code == 200, message.text
    return [requests.post(f"{nodes[f'shard-{i}'].rest}/predict", json=message.json(), timeout=30).json()["jsonData"]
            for i in range(SHARDS)]


def _strict_json(text: str):
    """``text`` parsed as JSON proper: NaN and Infinity are no JSON, and a client's parser need not take them."""
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def _aggregate(merger, answers: list, raw: dict[str, str] | None = None) -> requests.Response:
    """The shards' ``answers`` POSTed to the merger, written by Python's json (NaN and Infinity as such); ``raw``:
    quoted markers replaced by literal JSON text (1e999, which parses as infinity)."""
    body = json.dumps({"seldonMessages": [{"jsonData": answer} for answer in answers]})
    for marker, text in (raw or {}).items():
        body = body.replace(json.dumps(marker), text)
    return requests.post(f"{merger.rest}/aggregate", data=body, headers={"Content-Type": "application/json"},
                         timeout=30)


def test_a_shard_s_bad_answer_is_the_real_merger_s_502_and_it_keeps_serving(nodes, wire_answers):
    merger = nodes["merger"]
    good = _aggregate(merger, wire_answers)
    assert good.status_code == 200, good.text
    _assert_valid_answer(_strict_json(good.text)["jsonData"])
    for case, edit, reason in BAD_ANSWERS:
        answers = copy.deepcopy(wire_answers)
        edit(answers)
        refused = _aggregate(merger, answers)
        status = _strict_json(refused.text)["status"]
        assert (refused.status_code, status["reason"]) == (502, "BAD_GATEWAY"), (case, refused.text[:300])
        assert re.search(reason, status["info"]) and len(status["info"]) < 250, (case, status["info"])
    for key in ("distance", "id"):  # a JSON number past a double's range: Python reads 1e999 as infinity
        answers = copy.deepcopy(wire_answers)
        _first(answers, 1)[key] = "1e999 here"
        refused = _aggregate(merger, answers, raw={"1e999 here": "1e999"})
        assert refused.status_code == 502 and "got inf" in _strict_json(refused.text)["status"]["info"]
    # Over gRPC as well: a NaN cannot even be read as JSON, a negative distance is refused like over REST.
    nan, negative = copy.deepcopy(wire_answers), copy.deepcopy(wire_answers)
    _first(nan, 2)["distance"], _first(negative, 2)["distance"] = math.nan, -0.5
    for answers, says in ((nan, "message 2 of 3 holds a number that is not finite"),
                          (negative, "shard 2 sent an answer the merger cannot use: neighbour")):
        messages = []
        for answer in answers:
            messages.append(seldon_wire.SeldonMessage())
            messages[-1].jsonData.struct_value.update(answer)
        with grpc.insecure_channel(merger.grpc) as channel, pytest.raises(grpc.RpcError) as refused:
            seldon_wire.CombinerStub(channel).Aggregate(seldon_wire.SeldonMessageList(seldonMessages=messages),
                                                        timeout=30)
        assert refused.value.code() != grpc.StatusCode.INVALID_ARGUMENT and says in refused.value.details()
    # Only a body that is no SeldonMessageList at all is the caller's fault.
    for body in ({"messages": []}, [1, 2], {"seldonMessages": "x"}):
        answer = requests.post(f"{merger.rest}/aggregate", json=body, timeout=30)
        assert answer.status_code == 400 and "SeldonMessageList" in answer.json()["status"]["info"]
    assert _aggregate(merger, wire_answers).json()["jsonData"] == good.json()["jsonData"]  # still serving
    log = merger.log.read_text(errors="replace")
    assert "imgsim merger: shard 2 sent an answer the merger cannot use: neighbour" in log
    assert LONG[:100] not in log  # what a shard sent is quoted briefly, in the answer and in the log


def test_the_merger_s_body_limit_grows_with_the_shards(nodes, wire_answers):
    """One body carries every shard's answer: the merger takes SHARDS times what one node takes, and a larger body
    (which the executor wrote from the shards' answers) is a 502, not the client's 413."""
    merger, limit = nodes["merger"], MERGER_MAX_REQUEST * SHARDS

    def padded(size: int) -> bytes:  # each answer with an unused field, the whole body about ``size`` bytes
        pad = (size - len(json.dumps({"seldonMessages": [{"jsonData": a} for a in wire_answers]}))) // SHARDS
        padded_answers = [{"jsonData": {**a, "padding": "x" * pad}} for a in wire_answers]
        return json.dumps({"seldonMessages": padded_answers}).encode()

    fits, too_big = padded(2 * MERGER_MAX_REQUEST), padded(limit + 1000)
    assert MERGER_MAX_REQUEST < len(fits) < limit < len(too_big)
    for body, status in ((fits, 200), (too_big, 502)):
        for data in (body, iter([body])):  # with a Content-Length, and chunked
            answer = requests.post(f"{merger.rest}/aggregate", data=data, timeout=30,
                                   headers={"Content-Type": "application/json"})
            assert answer.status_code == status, answer.text[:300]
            assert status == 200 or f"exceed the merger's limit of {limit} bytes" in answer.json()["status"]["info"]
    assert _aggregate(merger, wire_answers).status_code == 200


@settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_shard_answers_get_200_or_5xx_from_the_real_merger(nodes, wire_answers, data):
    answer = _aggregate(nodes["merger"], _mutated(data, wire_answers))
    assert answer.status_code in (200, 502, 503), (answer.status_code, answer.text[:300])
    body = _strict_json(answer.text)
    if answer.status_code == 200:
        _assert_valid_answer(body["jsonData"])
    else:
        assert len(body["status"]["info"]) < 300 and "Traceback" not in answer.text


def _canonical(neighbours: list[dict]) -> list[dict]:
    """Equal distances may come in either order from one index; the merger breaks such ties by id."""
    return sorted(neighbours, key=lambda n: (n["distance"], n["id"]))


def test_shard_bundle_on_the_command_line(flat, tmp_path, capsys):
    from imgsim.cli import main

    main(["shard-bundle", str(flat), "--shards", "2", "--out", str(tmp_path / "two")])
    printed = capsys.readouterr().out
    assert "in 2 shards" in printed and "serving.shards=2" in printed
    meta = json.loads((tmp_path / "two" / "shard-1" / BUNDLE_JSON).read_text())
    assert meta["shard"]["role"] == "shard" and meta["shard"]["index"] == 1 and meta["shard"]["count"] == 2
