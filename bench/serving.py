"""Bench 3: REST and gRPC single-image queries at concurrency 1, 4 and 16, side by side in one run, with each
server's idle memory: Seldon's v1 wrapper (an echo model, imgsim on PyTorch, imgsim on ONNX Runtime) and the Open
Inference Protocol server, MLServer (an echo model, imgsim, imgsim with MLServer's adaptive batching).

python -m bench.serving [--bundle bundles/demo]     (after `make demo`, whose bundle it serves)
Every server runs for real on loopback (seldon-core-microservice with the same worker settings; MLServer as the
serve-v2 image runs it, model_server/v2/serve.py, in .venv-serve-v2, whose gRPC load runs there too:
bench/oip_load.py); the load generator shares the same 2 cores, so read the ratios rather than the absolute
numbers.
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import tempfile
import time
from pathlib import Path

import google.protobuf
import grpc
import requests
from google.protobuf.internal import api_implementation
from imgsim.serve import seldon_wire

from bench.common import RESULTS, save, table
from bench.hostile import DEMO_BUNDLE, demo_bundle, encode, pss_mb
from bench.load import load
from imgsim.bundle import ServingBundle
from support.servers import REPO, Server, start_mlserver, start_server, v2_python

SETTINGS = {"GUNICORN_WORKERS": "2", "GUNICORN_THREADS": "2", "GRPC_WORKERS": "2", "GRPC_THREADS": "2",
            "IMGSIM_THREADS": "1", "OMP_NUM_THREADS": "1"}
V2_SETTINGS = {"IMGSIM_THREADS": "1", "OMP_NUM_THREADS": "1"}  # MLServer's own settings.json: one process
# MLServer's adaptive batching: up to 8 queued requests, or what came within 2 ms, in one predict call.
V2_BATCHING = {"MLSERVER_MODEL_MAX_BATCH_SIZE": "8", "MLSERVER_MODEL_MAX_BATCH_TIME": "0.002"}
REQUESTS = {1: 400, 4: 800, 16: 1600}


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
    stub = seldon_wire.ModelStub(channel)
    message = seldon_wire.SeldonMessage(binData=image)
    if compact:  # the answer comes back as a JSON string in strData
        message.meta.tags["format"].string_value = "compact"

    def call():
        try:
            stub.Predict(message, timeout=30)
            return True
        except grpc.RpcError:
            return False
    return call


def v2_body(image: bytes) -> dict:
    """A v2 query for one image: an ``images`` tensor, typed tensors back (no JSON answer)."""
    return {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image).decode()],
                        "parameters": {"content_type": "base64"}}]}


def v2_rest_client(url: str, model: str, image: bytes):
    session = requests.Session()
    body = v2_body(image)

    def call():
        reply = session.post(f"{url}/v2/models/{model}/infer", json=body, timeout=30)
        reply.json()
        return reply.status_code == 200
    return call


def v2_grpc_load(server: Server, model: str, image: Path, concurrency: int, total: int) -> dict:
    """The same closed loop over the Open Inference Protocol's gRPC, run in MLServer's environment."""
    out = subprocess.run([str(v2_python()), "-m", "bench.oip_load", "--grpc", server.grpc, "--model", model,
                          "--image", str(image), "--concurrency", str(concurrency), "--total", str(total)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"bench.oip_load failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_v1(bundle: Path, image: bytes, rows: list, memory: list) -> None:
    body = {"binData": base64.b64encode(image).decode()}
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
                    rows.append({"server": f"v1 {name}", "protocol": protocol, "concurrency": concurrency,
                                 **load(make, concurrency, total)})
                    print(rows[-1], flush=True)
            time.sleep(2)  # every worker has answered: its model and index are in memory
            memory.append({"server": f"v1 {name}", "idle_pss_mb": pss_mb(server.proc.pid)})
        finally:
            server.stop()


def run_v2(bundle: Path, image: bytes, rows: list, memory: list, query: Path) -> None:
    query.write_bytes(image)  # for the gRPC load, which runs in its own process
    imgsim = V2_SETTINGS | {"IMGSIM_MODEL_URI": str(bundle)}
    for name, env, model, folder in (
            ("echo", {}, "echo", Path(__file__).resolve().parent / "v2_echo"),
            ("imgsim", imgsim, "imgsim", REPO / "model_server" / "v2"),
            ("imgsim batched", imgsim | V2_BATCHING, "imgsim", REPO / "model_server" / "v2")):
        server = start_mlserver(env, RESULTS / f"mlserver-{name.replace(' ', '-')}.log", folder=folder)
        try:
            for concurrency, total in REQUESTS.items():
                rows.append({"server": f"v2 {name}", "protocol": "REST", "concurrency": concurrency,
                             **load(lambda: v2_rest_client(server.rest, model, image), concurrency, total)})
                print(rows[-1], flush=True)
                rows.append({"server": f"v2 {name}", "protocol": "gRPC", "concurrency": concurrency,
                             **v2_grpc_load(server, model, query, concurrency, total)})
                print(rows[-1], flush=True)
            time.sleep(2)
            memory.append({"server": f"v2 {name}", "idle_pss_mb": pss_mb(server.proc.pid)})
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=DEMO_BUNDLE)
    bundle = demo_bundle(parser.parse_args().bundle)
    image = query_image(bundle)
    rows, memory = [], []
    run_v1(bundle, image, rows, memory)
    with tempfile.TemporaryDirectory() as tmp:
        run_v2(bundle, image, rows, memory, Path(tmp) / "query.png")
    # Each protocol family against its own echo model; the v2 imgsim rows against v1's ONNX server too.
    echo = {(r["server"].split()[0], r["protocol"], r["concurrency"]): r["rps"] for r in rows if "echo" in r["server"]}
    v1 = {(r["protocol"].split()[0], r["concurrency"]): r["rps"] for r in rows
          if r["server"] == "v1 imgsim onnx" and r["protocol"] != "gRPC compact"}
    for r in rows:
        r["of_echo"] = r["rps"] / echo[(r["server"].split()[0], r["protocol"], r["concurrency"])]
        r["of_v1_onnx"] = r["rps"] / v1[(r["protocol"], r["concurrency"])] if r["server"].startswith("v2 imgsim") \
            else None
    print(table(rows, ["server", "protocol", "concurrency", "requests", "errors", "rps", "p50_ms", "p99_ms", "of_echo",
                       "of_v1_onnx"]))
    print(table(memory, ["server", "idle_pss_mb"]))
    # seldon-core 1.18 pins protobuf<4, which has no compiled module for Python 3.11: every gRPC message is
    # built, serialised and parsed in pure Python, on both ends. MLServer's environment has protobuf 6 (upb).
    protobuf = f"{google.protobuf.__version__} ({api_implementation.Type()} implementation)"
    print(f"protobuf {protobuf} (v1)")
    saved = save("serving", {"settings": SETTINGS, "v2_settings": V2_SETTINGS, "v2_batching": V2_BATCHING,
                             "protobuf": protobuf, "rows": rows, "memory": memory})
    print(f"wrote {saved}")


if __name__ == "__main__":
    main()
