"""A sharded gallery served by Seldon's graph: embedder TRANSFORMER -> merger COMBINER -> N index-shard MODELs.

The graph test starts every node as a real seldon-core-microservice process and passes each query's messages
between them in the graph's order, which is the role Seldon's executor (the service orchestrator) plays in a
cluster: /transform-input on the embedder, its answer to /predict on every shard, their answers together to
/aggregate on the merger. With an exact index (faiss-flat) the merged answer equals one server's over the whole
bundle: ids, distances and scores.
"""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from google.protobuf import json_format
from imgsim.serve import seldon_wire

from imgsim.bundle import BUNDLE_JSON, ServingBundle
from imgsim.errors import BadInput, ImgsimError
from imgsim.index import FAISS_FLAT, IndexBundle
from imgsim.serve.graph import EmbedService, Merger, ShardService
from imgsim.serve.settings import ServiceConfig
from imgsim.sharded import part_name, shard_bundle
from imgsim.stages.gallery import remove_images
from imgsim.stages.settings import RemoveConfig
from support.servers import run_graph, start_server
from tests.bundles import pipeline_bundle

pytestmark = pytest.mark.slow
SHARDS = 3


@pytest.fixture(scope="module")
def flat(pipeline_run, tmp_path_factory) -> Path:
    """The pipeline's bundle with its gallery indexed exactly (faiss-flat), so sharded answers can be compared
    with single-server answers value for value."""
    work = tmp_path_factory.mktemp("graph")
    annoy = pipeline_bundle(pipeline_run, work / "annoy")
    whole = ServingBundle.load(annoy)
    whole.index = IndexBundle.build(np.asarray(whole.index.embeddings), whole.index.items,
                                    n_trees=whole.index.n_trees, next_id=whole.index.next_id, backend=FAISS_FLAT)
    return whole.save(work / "flat", model_from=annoy)


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
        assert part.index.backend == FAISS_FLAT and part.shard["index"] == i and part.shard["count"] == SHARDS
        assert summary["shard_items"][i] == len(part_ids)
    assert seen == ids and summary["items"] == len(ids)
    embedder = ServingBundle.load(out / "embedder")
    assert {item.id for item in embedder.index.items} <= set(whole.probes.ids.tolist())
    assert embedder.shard["labels"] == sorted({item.label for item in whole.index.items})
    assert summary["bytes"] == sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


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


def _graph_answer(embedder: ShardService, shards: list[ShardService], merger: Merger, query: dict) -> dict:
    message, _ = embedder.handle(query, None, {})
    message = json.loads(json.dumps(message))  # what travels between the nodes
    return merger.merge([json.loads(json.dumps(s.handle(message, None, {})[0])) for s in shards])


def test_the_merger_refuses_a_missing_duplicated_or_foreign_shard(sharded, pipeline_run):
    out, _ = sharded
    embedder = _service(EmbedService, out / "embedder", shards=SHARDS)
    shards = [_service(ShardService, out / part_name("shard", i), shards=SHARDS, shard=i) for i in range(SHARDS)]
    image = base64.b64encode((pipeline_run["root"] / "circle" / "000.png").read_bytes()).decode()
    message = json.loads(json.dumps(embedder.handle({"image": image, "k": 4}, None, {})[0]))
    answers = [s.handle(message, None, {})[0] for s in shards]
    merger = Merger(SHARDS)
    assert len(merger.merge(answers)["results"][0]["neighbours"]) == 4
    with pytest.raises(ImgsimError, match=r"shard\(s\) \[2\] of 3 did not answer: the graph must list every shard"):
        merger.merge(answers[:2])
    with pytest.raises(ImgsimError, match="shard 1 answered twice"):
        merger.merge([*answers, answers[1]])
    with pytest.raises(ImgsimError, match="different galleries"):
        merger.merge([answers[0], answers[1], {**answers[2], "gallery": "another"}])
    with pytest.raises(BadInput, match="a shard's answer is malformed"):
        merger.merge([answers[0], answers[1], {**answers[2], "results": [{"neighbours": [{"id": "x"}]}]}])
    with pytest.raises(ImgsimError, match="reached a merger of 4 shards"):
        Merger(4).merge(answers)
    with pytest.raises(ImgsimError, match="the embedder serves gallery 'another'.*roll out one sharded gallery"):
        shards[0].handle({**message, "gallery": "another"}, None, {})
    for bad, reason in [({"image": image, "k": 0}, "k must be between 1 and 100"),
                        ({"id": 1}, "a sharded gallery answers image queries only"),
                        ({"image": image, "labels": ["nope"]}, r"unknown label\(s\) \['nope'\]")]:
        with pytest.raises(BadInput, match=reason):
            embedder.handle(bad, None, {})
    for bad, reason in [({"image": image}, "an index shard answers the embedder's message"),
                        ({**message, "results": [{"embedding": [1.0, 2.0]}]}, r"results\[0\].embedding must be a list"),
                        ({**message, "results": [{"embedding": ["x"] * 16}]},
                         r"results\[0\].embedding must be a list")]:
        with pytest.raises(BadInput, match=reason):
            shards[0].handle(bad, None, {})


def _start(tmp_path: Path, name: str, interface: str, service_type: str, **settings) -> object:
    env = {f"IMGSIM_{key.upper()}": str(value) for key, value in settings.items()}
    return start_server({**env, "IMGSIM_POLL_INTERVAL_S": "0", "GUNICORN_WORKERS": "1", "GUNICORN_THREADS": "2"},
                        tmp_path / f"{name}.log", interface=interface, service_type=service_type)


def test_the_sharded_graph_answers_exactly_like_one_server(flat, sharded, pipeline_run, tmp_path):
    out, _ = sharded
    nodes = [("single", "ModelServer", "MODEL", {"model_uri": flat}),
             ("embedder", "Embedder", "TRANSFORMER", {"model_uri": out / "embedder", "shards": SHARDS}),
             ("merger", "ShardMerger", "COMBINER", {"shards": SHARDS}),
             *((f"shard-{i}", "IndexShard", "MODEL", {"model_uri": out / f"shard-{i}", "shards": SHARDS, "shard": i})
               for i in range(SHARDS))]
    with ThreadPoolExecutor(len(nodes)) as pool:  # start the six processes at once
        started = list(pool.map(lambda node: _start(tmp_path, node[0], node[1], node[2], **node[3]), nodes))
    servers = {node[0]: server for node, server in zip(nodes, started)}
    try:
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
    finally:
        for server in servers.values():
            server.stop()


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
