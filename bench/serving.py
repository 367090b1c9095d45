"""Bench 3: REST and gRPC single-image binData queries at concurrency 1 and 4: an echo model, imgsim on
PyTorch and imgsim on ONNX Runtime, side by side in one run, with each server's idle memory.

python -m bench.serving [--bundle bundles/demo]     (after `make demo`, whose bundle it serves)
Every server runs the real seldon-core-microservice with the same worker settings on loopback; the load
generator shares the same 2 cores, so read the ratios rather than the absolute numbers.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import threading
import time
from pathlib import Path

import google.protobuf
import grpc
import numpy as np
import requests
from google.protobuf.internal import api_implementation
from seldon_core.proto import prediction_pb2, prediction_pb2_grpc

from bench.common import RESULTS, save, table
from bench.hostile import DEMO_BUNDLE, demo_bundle, encode, pss_mb
from imgsim.bundle import ServingBundle
from support.servers import start_server

SETTINGS = {"GUNICORN_WORKERS": "2", "GUNICORN_THREADS": "2", "GRPC_WORKERS": "2", "GRPC_THREADS": "2",
            "IMGSIM_THREADS": "1", "OMP_NUM_THREADS": "1"}
REQUESTS = {1: 400, 4: 800}
WARMUP = 20


def query_image(bundle: Path) -> bytes:
    """A probe image of the bundle as a PNG: a real gallery picture, whatever the data folder."""
    from PIL import Image
    probe = ServingBundle.load(bundle).probes.inputs[0]
    return encode(Image.fromarray(probe[0] if probe.shape[0] == 1 else probe.transpose(1, 2, 0)), "PNG")


def rest_client(url: str, body: dict):
    session = requests.Session()

    def call():
        reply = session.post(f"{url}/api/v1.0/predictions", json=body, timeout=30)
        reply.json()  # a client reads the answer, as the gRPC stub parses its reply
        return reply.status_code == 200
    return call


def grpc_client(address: str, image: bytes, compact: bool = False):
    channel = grpc.insecure_channel(address)
    stub = prediction_pb2_grpc.ModelStub(channel)
    message = prediction_pb2.SeldonMessage(binData=image)
    if compact:  # the answer comes back as a JSON string in strData
        message.meta.tags["format"].string_value = "compact"

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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=DEMO_BUNDLE)
    bundle = demo_bundle(parser.parse_args().bundle)
    image = query_image(bundle)
    body = {"binData": base64.b64encode(image).decode()}
    rows, memory = [], []
    for name, env, interface, cwd in (
            ("echo", {}, "EchoModel", Path(__file__).resolve().parent),
            ("imgsim torch", {"IMGSIM_MODEL_URI": str(bundle), "IMGSIM_RUNTIME": "torch"}, "ModelServer", None),
            ("imgsim onnx", {"IMGSIM_MODEL_URI": str(bundle), "IMGSIM_RUNTIME": "onnx"}, "ModelServer", None)):
        log = RESULTS / f"server-{name.replace(' ', '-')}.log"
        kwargs = {"cwd": cwd} if cwd else {}
        server = start_server(SETTINGS | env, log, interface=interface, **kwargs)
        try:
            for protocol, make in (("REST", lambda: rest_client(server.rest, body)),
                                   ("gRPC", lambda: grpc_client(server.grpc, image)),
                                   ("gRPC compact", lambda: grpc_client(server.grpc, image, compact=True))):
                for concurrency, total in REQUESTS.items():
                    rows.append({"server": name, "protocol": protocol, "concurrency": concurrency,
                                 **load(make, concurrency, total)})
                    print(rows[-1], flush=True)
            time.sleep(2)  # every worker has answered: its model and index are in memory
            memory.append({"server": name, "idle_pss_mb": pss_mb(server.proc.pid)})
        finally:
            server.stop()
    echo = {(r["protocol"], r["concurrency"]): r["rps"] for r in rows if r["server"] == "echo"}
    for r in rows:
        r["of_echo"] = r["rps"] / echo[(r["protocol"], r["concurrency"])]
    print(table(rows, ["server", "protocol", "concurrency", "requests", "errors", "rps", "p50_ms", "p99_ms", "of_echo"]))
    print(table(memory, ["server", "idle_pss_mb"]))
    # seldon-core 1.18 pins protobuf<4, which has no compiled module for Python 3.11: every gRPC message is
    # built, serialised and parsed in pure Python, on both ends.
    protobuf = f"{google.protobuf.__version__} ({api_implementation.Type()} implementation)"
    print(f"protobuf {protobuf}")
    print(f"wrote {save('serving', {'settings': SETTINGS, 'protobuf': protobuf, 'rows': rows, 'memory': memory})}")


if __name__ == "__main__":
    main()
