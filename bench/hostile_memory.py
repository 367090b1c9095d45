"""Bench: the server's memory under a hostile image mix at 4 concurrent clients, bounded defaults vs split's limits,
for the Seldon v1 server and the Open Inference Protocol server (MLServer).

python -m bench.hostile_memory [--bundle bundles/demo] [--rounds 3]      (after `make demo`)
Each client sends every hostile kind as a REST JSON batch of 16 copies, as one REST image and over gRPC (v1:
binData; v2: an images tensor, from support/oip_client.py in MLServer's environment); PSS (all server processes,
shared pages once) is sampled every 50 ms. Target: peak <= idle + 300 MB, no 5xx.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
import requests
from PIL import Image
from imgsim.serve import seldon_wire

from bench.common import RESULTS, save, table
from bench.hostile import (CHART_SETTINGS, DEMO_BUNDLE, PeakSampler, b64, demo_bundle, encode,
                           hostile_payloads, pss_mb)
from support.servers import REPO, start_mlserver, start_server, v2_python

CONFIGS = {
    "bounded (serving defaults)": {},
    "bounded, 2 decodes per worker": {"IMGSIM_MAX_CONCURRENT_DECODES": "2"},
    # What the server did before: split's 40 MP per image, no request budget, no decode cap.
    "split's limits, no caps": {"IMGSIM_MAX_PIXELS": "40000000", "IMGSIM_MAX_REQUEST_PIXELS": str(10**12),
                                "IMGSIM_MAX_CONCURRENT_DECODES": "64"},
}
V2_CONFIG = "v2 (MLServer), serving defaults"
V2_SETTINGS = {"IMGSIM_THREADS": "1", "OMP_NUM_THREADS": "1"}
FORMS = ("REST batch x16", "REST one image", "gRPC")


def status_class(code: int) -> str:
    return f"{code // 100}xx"


def grpc_class(code: grpc.StatusCode) -> str:
    client = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE}
    return "2xx" if code == grpc.StatusCode.OK else "4xx" if code in client else "5xx"


def send(server, kind: str, data: bytes, form: str) -> tuple[str, str, str]:
    if form == "gRPC":
        with grpc.insecure_channel(server.grpc, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            try:
                seldon_wire.ModelStub(channel).Predict(seldon_wire.SeldonMessage(binData=data), timeout=120)
                return kind, form, "2xx"
            except grpc.RpcError as exc:
                return kind, form, grpc_class(exc.code())
    body = {"jsonData": {"images": [b64(data)] * 16}} if form == "REST batch x16" else {"binData": b64(data)}
    reply = requests.post(f"{server.rest}/api/v1.0/predictions", json=body, timeout=120)
    return kind, form, status_class(reply.status_code)


def send_v2(server, kind: str, data: bytes, form: str, files: dict[str, Path]) -> tuple[str, str, str]:
    if form == "gRPC":
        out = subprocess.run([str(v2_python()), str(REPO / "support" / "oip_client.py"), "--grpc", server.grpc,
                              "--image", str(files[kind])], capture_output=True, text=True, timeout=180)
        code = json.loads(out.stdout.strip().splitlines()[-1]).get("code", "OK") if out.returncode == 0 else "UNKNOWN"
        return kind, form, grpc_class(getattr(grpc.StatusCode, code, grpc.StatusCode.UNKNOWN))
    copies = 16 if form == "REST batch x16" else 1
    images = {"name": "images", "datatype": "BYTES", "shape": [copies], "data": [b64(data)] * copies,
              "parameters": {"content_type": "base64"}}
    reply = requests.post(f"{server.rest}/v2/models/imgsim/infer", json={"inputs": [images]}, timeout=120)
    return kind, form, status_class(reply.status_code)


def warm_up(server, image: bytes, v2: bool) -> float:
    """Good queries until every worker has loaded and answered, then the idle PSS (median of 5 samples)."""
    for _ in range(40):
        kind, form, cls = (send_v2(server, "good", image, "REST one image", {}) if v2 else
                           send(server, "good", image, "REST one image"))
        if cls != "2xx":
            raise RuntimeError(f"a good image got {cls} while warming up; see {server.log}")
        if not v2:
            send(server, "good", image, "gRPC")
    time.sleep(2)
    samples = []
    for _ in range(5):
        samples.append(pss_mb(server.proc.pid))
        time.sleep(0.2)
    return sorted(samples)[2]


def run(config: str, env: dict, bundle: Path, payloads: dict[str, bytes], good: bytes, rounds: int):
    v2 = config == V2_CONFIG
    if v2:
        server = start_mlserver(V2_SETTINGS | {"IMGSIM_MODEL_URI": str(bundle)} | env,
                                RESULTS / "mlserver-hostile.log")
    else:
        server = start_server(CHART_SETTINGS | {"IMGSIM_MODEL_URI": str(bundle)} | env, RESULTS / "server-hostile.log")
    try:
        idle = warm_up(server, good, v2)
        jobs = [(kind, data, form) for _ in range(rounds) for kind, data in payloads.items() for form in FORMS]
        answers = collections.Counter()
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp, PeakSampler(server.proc.pid) as sampler, \
                concurrent.futures.ThreadPoolExecutor(4) as pool:
            files = {kind: Path(tmp) / f"{i}.img" for i, kind in enumerate(payloads)}
            for kind, path in files.items():
                path.write_bytes(payloads[kind])
            ask = (lambda job: send_v2(server, *job, files)) if v2 else (lambda job: send(server, *job))
            for kind, form, cls in pool.map(ask, jobs):
                answers[(kind, form, cls)] += 1
        seconds = time.perf_counter() - started
        alive = requests.get(f"{server.rest}{'/v2/health/ready' if v2 else '/health/status'}", timeout=10).ok
    finally:
        server.stop()
    by_class = collections.Counter()
    for (_, _, cls), n in answers.items():
        by_class[cls] += n
    row = {"config": config, "idle_pss_mb": idle, "peak_pss_mb": sampler.peak, "growth_mb": sampler.peak - idle,
           "requests": sum(answers.values()), "2xx": by_class["2xx"], "4xx": by_class["4xx"], "5xx": by_class["5xx"],
           "seconds": seconds, "ready_after": alive}
    kinds = [{"config": config, "kind": kind, "form": form, "answer": cls, "count": n}
             for (kind, form, cls), n in sorted(answers.items())]
    return row, kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=DEMO_BUNDLE)
    parser.add_argument("--rounds", type=int, default=3, help="times each client sends the whole mix")
    args = parser.parse_args()
    bundle = demo_bundle(args.bundle)
    payloads = hostile_payloads()
    print(table([{"kind": k, "bytes": len(v)} for k, v in payloads.items()], ["kind", "bytes"]))
    good = encode(Image.linear_gradient("L").resize((28, 28)), "PNG")
    rows, kinds = [], []
    for config, env in {**CONFIGS, V2_CONFIG: {}}.items():
        row, per_kind = run(config, env, bundle, payloads, good, args.rounds)
        rows.append(row)
        kinds += per_kind
        print(row, flush=True)
    print(table(rows, ["config", "idle_pss_mb", "peak_pss_mb", "growth_mb", "requests", "2xx", "4xx", "5xx",
                       "seconds", "ready_after"]))
    for config in (rows[0]["config"], V2_CONFIG):
        print(table([k for k in kinds if k["config"] == config], ["config", "kind", "form", "answer", "count"]))
    print(f"wrote {save('hostile_memory', {'settings': CHART_SETTINGS, 'configs': CONFIGS, 'rows': rows, 'kinds': kinds, 'payload_bytes': {k: len(v) for k, v in payloads.items()}})}")


if __name__ == "__main__":
    main()
