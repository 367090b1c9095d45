"""The real servers follow a living gallery: v1 -> v2 (add) -> v3 (remove) under load, by polling and on SIGHUP;
the Seldon wrapper, and the Open Inference Protocol server (MLServer) reading the registry over HTTP."""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time

import grpc
import mlflow
import pytest
import requests
from imgsim.serve import seldon_wire

from imgsim.serve.client import query_rest
from imgsim.serve.process import DOWNLOADS
from imgsim.serve.protocols import OpenInference
from support.servers import start_mlserver, start_server, start_tracking_server
from support.store import mlflow_store
from tests.galleries import add, load_version, new_images, remove

pytestmark = pytest.mark.slow


def _rest(server, data: bytes, k: int) -> dict:
    response = requests.post(f"{server.rest}/api/v1.0/predictions", json={
        "jsonData": {"image": base64.b64encode(data).decode(), "k": k}}, timeout=30)
    response.raise_for_status()
    return response.json()["jsonData"]


def _grpc(stub, data: bytes, k: int) -> dict:
    message = seldon_wire.SeldonMessage(binData=data)
    message.meta.tags["k"].number_value = k
    message.meta.tags["format"].string_value = "compact"
    return json.loads(stub.Predict(message, timeout=30).strData)


def _v2(server, data: bytes, k: int) -> dict:
    """The v2 server's JSON answer to one image, as `imgsim query --protocol v2` asks."""
    return query_rest(server.rest, data, k, proto=OpenInference())


class Clients:
    """Client threads querying continuously; each answer recorded as (time, version, ids), each failure kept.
    Against the Seldon wrapper half the threads ask over REST and half over gRPC; with ``v2``, all over v2 REST."""

    def __init__(self, server, data: bytes, k: int, threads: int = 4, v2: bool = False) -> None:
        self.server, self.data, self.k, self.v2 = server, data, k, v2
        self.answers: list[tuple[float, str, frozenset[int]]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i % 2 == 0,), daemon=True) for i in range(threads)]

    def _run(self, use_rest: bool) -> None:
        channel = grpc.insecure_channel(self.server.grpc)
        stub = seldon_wire.ModelStub(channel)
        while not self.stop.is_set():
            try:
                if self.v2:
                    answer = _v2(self.server, self.data, self.k)
                else:
                    answer = _rest(self.server, self.data, self.k) if use_rest else _grpc(stub, self.data, self.k)
                ids = frozenset(n["id"] for n in answer["results"][0]["neighbours"])
                with self.lock:
                    self.answers.append((time.monotonic(), answer["bundle_version"], ids))
            except Exception as exc:  # noqa: BLE001 - any failure is what this test counts
                with self.lock:
                    self.errors.append(repr(exc)[:300])
        channel.close()

    def __enter__(self) -> "Clients":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def wait_for(self, version: str, timeout: float = 90.0) -> float:
        """Wait until the last 20 answers all come from ``version``; returns when the first of them came."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                recent = self.answers[-20:]
            if len(recent) == 20 and all(v == version for _, v, _ in recent):
                return recent[0][0]
            time.sleep(0.2)
        raise AssertionError(f"clients never settled on version {version}: {[v for _, v, _ in self.answers[-20:]]}")


@pytest.fixture
def living(living, registry_server):
    """conftest's living gallery, with the tracking server the Seldon servers read it through."""
    return living | {"registry": registry_server}


def _server(living, tmp_path, poll: float, wait_ready: bool = True):
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {"TMPDIR": str(tmp_path / "tmp"), "IMGSIM_MODEL_URI": living["uri"], "MLFLOW_TRACKING_URI": living["registry"],
           "IMGSIM_POLL_INTERVAL_S": str(poll), "IMGSIM_MAX_K": "100", "GUNICORN_WORKERS": "2",
           "GUNICORN_THREADS": "2", "GRPC_WORKERS": "1"}
    return start_server(env, tmp_path / "server.log", wait_ready=wait_ready, every_process=wait_ready)


def test_four_clients_see_v1_v2_v3_with_no_error_and_never_a_removed_image(living, tmp_path):
    with mlflow_store(living["work"]):
        v1 = load_version(living["uri"])
        query = v1.index.items[0]
        data = (living["root"] / query.path).read_bytes()
        k = len(v1.index.items) + 8  # the whole gallery: every answer shows exactly which version answered
        srv = _server(living, tmp_path, poll=0.5)
        try:
            with Clients(srv, data, k) as clients:
                clients.wait_for("1")
                add(living, paths=",".join(new_images(living["incoming"], 5)))
                clients.wait_for("2")
                gone = [query.id, v1.index.items[1].id]
                remove(living, ids=",".join(map(str, gone)))
                switched = clients.wait_for("3")
                time.sleep(2.0)
            versions = {v: frozenset(i.id for i in load_version(f"models:/{living['name']}/{v}").index.items)
                        for v in ("1", "2", "3")}
            log = srv.log.read_text(errors="replace")  # before stopping: shutdown has noise of its own
            downloads = sorted(p.name for p in (tmp_path / "tmp" / DOWNLOADS).iterdir())
        finally:
            srv.stop()
    # Three versions loaded by each worker process, only the one it serves is on disk, and nothing after it stops.
    assert downloads and len(downloads) == len({name.split("-")[0] for name in downloads})
    assert not list((tmp_path / "tmp" / DOWNLOADS).iterdir())
    assert clients.errors == []
    assert len(clients.answers) > 100
    seen = {version for _, version, _ in clients.answers}
    assert seen == {"1", "2", "3"}
    for _, version, ids in clients.answers:  # every answer is exactly its version's gallery, never a mix
        assert ids == versions[version], f"an answer tagged version {version} holds other ids"
    after = [(version, ids) for t, version, ids in clients.answers if t >= switched]
    assert after and all(version == "3" and not ids & set(gone) for version, ids in after)
    assert "Traceback" not in log
    assert "switched from 2 to 3" in log
    assert "linked from" in log and "the same version already here: not downloaded" in log  # v1's files, v2 and v3


def test_sighup_moves_every_worker_to_the_newest_version(living, tmp_path):
    with mlflow_store(living["work"]):
        item = load_version(living["uri"]).index.items[0]
        data = (living["root"] / item.path).read_bytes()
        srv = _server(living, tmp_path, poll=0)  # no polling: only the signal can move it
        try:
            assert _rest(srv, data, 3)["bundle_version"] == "1"
            add(living, paths=",".join(new_images(living["incoming"], 2)))
            time.sleep(1.0)
            assert _rest(srv, data, 3)["bundle_version"] == "1"  # nothing moves by itself
            os.killpg(srv.proc.pid, signal.SIGHUP)  # the whole group, as `pkill -HUP -f seldon-core-microservice`
            deadline = time.monotonic() + 90
            with grpc.insecure_channel(srv.grpc) as channel:
                stub = seldon_wire.ModelStub(channel)
                while time.monotonic() < deadline:
                    versions = {_rest(srv, data, 3)["bundle_version"] for _ in range(8)}
                    versions |= {_grpc(stub, data, 3)["bundle_version"] for _ in range(4)}
                    if versions == {"2"}:
                        break
                    time.sleep(0.5)
            assert versions == {"2"}
            assert srv.proc.poll() is None and requests.get(f"{srv.rest}/health/status", timeout=5).ok
        finally:
            srv.stop()


def test_a_server_started_on_a_broken_version_recovers_when_the_alias_moves(living, tmp_path):
    from mlflow.tracking import MlflowClient

    from imgsim.modelspec import file_sha256
    from imgsim.runs import tracking
    from imgsim.runs.export import export_bundle

    with mlflow_store(living["work"]):
        broken = export_bundle(living["uri"], tmp_path / "broken")
        (broken / "items.csv").write_text((broken / "items.csv").read_text() + "\n")  # no longer its checksum
        client = MlflowClient()
        # Registered as the pipeline would (its bundle.json vouched for), but one of its files damaged.
        bad = client.create_model_version(living["name"], broken.as_uri(), None, tags={
            tracking.KIND_TAG: "bundle", tracking.BUNDLE_SHA_TAG: file_sha256(broken / "bundle.json")})
        client.set_registered_model_alias(living["name"], "serving", bad.version)
        srv = _server(living, tmp_path, poll=0.5, wait_ready=False)
        try:
            status = requests.get(f"{srv.rest}/health/status", timeout=5)
            assert status.status_code == 503 and "damaged" in status.text
            client.set_registered_model_alias(living["name"], "serving", "1")
            # Each of the two workers polls the alias by itself: one answering ok says nothing of the other (CI
            # once saw the next request reach the other, still on the damaged version). Wait until 8 answers in
            # a row, spread over both, all serve version 1.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                answers = [requests.get(f"{srv.rest}/health/status", timeout=5) for _ in range(8)]
                versions = {r.json()["jsonData"]["bundle_version"] if r.ok else None for r in answers}
                if versions == {"1"}:
                    break
                time.sleep(0.5)
            assert versions == {"1"}
        finally:
            srv.stop()


def test_the_v2_server_follows_the_gallery_under_load_too(living, tmp_path):
    """MLServer on the registry alias, through a real tracking server (as on a cluster): every answer is exactly
    its version's gallery, no request fails, and the version is in every answer."""
    with mlflow_store(living["work"]):
        tracking = start_tracking_server(living["work"], tmp_path / "mlflow.log")
        v1 = load_version(living["uri"])
        query = v1.index.items[0]
        data = (living["root"] / query.path).read_bytes()
        k = len(v1.index.items) + 8
        (tmp_path / "tmp").mkdir()
        srv = start_mlserver({"TMPDIR": str(tmp_path / "tmp"), "IMGSIM_MODEL_URI": living["uri"],
                              "MLFLOW_TRACKING_URI": tracking.rest, "IMGSIM_POLL_INTERVAL_S": "0.5",
                              "IMGSIM_MAX_K": "100"}, tmp_path / "mlserver.log")
        try:
            with Clients(srv, data, k, threads=2, v2=True) as clients:
                clients.wait_for("1")
                add(living, paths=",".join(new_images(living["incoming"], 3)))
                clients.wait_for("2")
                gone = [query.id]
                remove(living, ids=",".join(map(str, gone)))
                switched = clients.wait_for("3")
            versions = {v: frozenset(i.id for i in load_version(f"models:/{living['name']}/{v}").index.items)
                        for v in ("1", "2", "3")}
        finally:
            srv.stop()
            tracking.stop()
    assert clients.errors == [] and {version for _, version, _ in clients.answers} == {"1", "2", "3"}
    for _, version, ids in clients.answers:
        assert ids == versions[version], f"an answer tagged version {version} holds other ids"
    assert all(not ids & set(gone) for t, _, ids in clients.answers if t >= switched)
