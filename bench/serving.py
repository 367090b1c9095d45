"""Bench 3: REST and gRPC single-image binData queries at concurrency 1 and 4, imgsim against an echo model.

python bench/serving.py     (after bench/quality.py, whose model and embeddings make the bundle)
Both servers run the real seldon-core-microservice with the same worker settings on loopback; the load
generator shares the same 2 cores, so read the ratios rather than the absolute numbers.
"""

from __future__ import annotations

import base64
import concurrent.futures
import sys
import threading
import time
from pathlib import Path

import google.protobuf
import grpc
import numpy as np
import requests
from google.protobuf.internal import api_implementation
from seldon_core.proto import prediction_pb2, prediction_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS, protocol_manifest, require, save, table  # noqa: E402
from imgsim.bundle import ServingBundle, build_probes  # noqa: E402
from imgsim.data import ImageFiles  # noqa: E402
from imgsim.index import GalleryItem, IndexBundle  # noqa: E402
from imgsim.model import ModelBundle  # noqa: E402
from tests.servers import start_server  # noqa: E402

SETTINGS = {"GUNICORN_WORKERS": "2", "GUNICORN_THREADS": "2", "GRPC_WORKERS": "2", "GRPC_THREADS": "2",
            "IMGSIM_THREADS": "1", "OMP_NUM_THREADS": "1"}
REQUESTS = {1: 400, 4: 800}
WARMUP = 20


def make_bundle() -> Path:
    require("gallery_embeddings.npy", "model")
    manifest = protocol_manifest()
    gallery_items = [i for i in manifest.items if i.split in ("train", "eval")]
    embeddings = np.load(RESULTS / "gallery_embeddings.npy")
    items = [GalleryItem(i, it.path, it.label, it.split, it.sha256) for i, it in enumerate(gallery_items)]
    index = IndexBundle.build(embeddings, items, n_trees=50)
    model = ModelBundle.load(RESULTS / "model")
    probes = build_probes(model.build(), index, ImageFiles(gallery_items, manifest.root, model.preprocess).read,
                          embeddings)
    return ServingBundle(model.spec, index, probes, {"uri": "bench"}, weights=model).save(RESULTS / "bundle")


def rest_client(url: str, body: dict):
    session = requests.Session()

    def call():
        reply = session.post(f"{url}/api/v1.0/predictions", json=body, timeout=30)
        return reply.status_code == 200
    return call


def grpc_client(address: str, image: bytes):
    channel = grpc.insecure_channel(address)
    stub = prediction_pb2_grpc.ModelStub(channel)
    message = prediction_pb2.SeldonMessage(binData=image)

    def call():
        try:
            stub.Predict(message, timeout=30)
            return True
        except grpc.RpcError:
            return False
    return call


def load(make_client, concurrency: int, total: int) -> dict:
    """``total`` requests from ``concurrency`` threads, each with its own connection; latencies in ms."""
    latencies, errors, lock = [], [0], threading.Lock()
    per_thread = total // concurrency

    def worker():
        call = make_client()
        for _ in range(WARMUP // concurrency + 1):
            call()
        barrier.wait()
        for _ in range(per_thread):
            started = time.perf_counter()
            ok = call()
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                latencies.append(elapsed)
                errors[0] += not ok

    barrier = threading.Barrier(concurrency + 1)
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(worker) for _ in range(concurrency)]
        barrier.wait()
        started = time.perf_counter()
        for f in futures:
            f.result()
        wall = time.perf_counter() - started
    return {"requests": len(latencies), "errors": errors[0], "rps": len(latencies) / wall,
            "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99))}


def main() -> None:
    bundle = make_bundle()
    manifest = protocol_manifest()
    image = (Path(manifest.root) / manifest.split("test")[0].path).read_bytes()
    body = {"binData": base64.b64encode(image).decode()}
    rows = []
    for name, env, interface, cwd in (
            ("echo", {}, "EchoModel", Path(__file__).resolve().parent),
            ("imgsim", {"IMGSIM_MODEL_URI": str(bundle)}, "ModelServer", None)):
        log = RESULTS / f"server-{name}.log"
        kwargs = {"cwd": cwd} if cwd else {}
        server = start_server(SETTINGS | env, log, interface=interface, **kwargs)
        try:
            for protocol, make in (("REST", lambda: rest_client(server.rest, body)),
                                   ("gRPC", lambda: grpc_client(server.grpc, image))):
                for concurrency, total in REQUESTS.items():
                    rows.append({"server": name, "protocol": protocol, "concurrency": concurrency,
                                 **load(make, concurrency, total)})
                    print(rows[-1], flush=True)
        finally:
            server.stop()
    echo = {(r["protocol"], r["concurrency"]): r["rps"] for r in rows if r["server"] == "echo"}
    for r in rows:
        r["of_echo"] = r["rps"] / echo[(r["protocol"], r["concurrency"])]
    print(table(rows, ["server", "protocol", "concurrency", "requests", "errors", "rps", "p50_ms", "p99_ms", "of_echo"]))
    # seldon-core 1.18 pins protobuf<4, which has no compiled module for Python 3.11: every gRPC message is
    # built, serialised and parsed in pure Python, on both ends.
    protobuf = f"{google.protobuf.__version__} ({api_implementation.Type()} implementation)"
    print(f"protobuf {protobuf}")
    print(f"wrote {save('serving', {'settings': SETTINGS, 'protobuf': protobuf, 'rows': rows})}")


if __name__ == "__main__":
    main()
