"""Bench: the server's memory under a hostile image mix at 4 concurrent clients, bounded defaults vs split's limits.

python -m bench.hostile_memory [--bundle bundles/demo] [--rounds 3]      (after `make demo`)
Each client sends every hostile kind as a REST JSON batch of 16 copies, as REST binData and as gRPC binData;
PSS (all server processes, shared pages once) is sampled every 50 ms. Target: peak <= idle + 300 MB, no 5xx.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import time
from pathlib import Path

import grpc
import requests
from PIL import Image
from seldon_core.proto import prediction_pb2, prediction_pb2_grpc

from bench.common import RESULTS, save, table
from bench.hostile import (CHART_SETTINGS, DEMO_BUNDLE, PeakSampler, b64, demo_bundle, encode,
                           hostile_payloads, pss_mb)
from support.servers import start_server

CONFIGS = {
    "bounded (serving defaults)": {},
    "bounded, 2 decodes per worker": {"IMGSIM_MAX_CONCURRENT_DECODES": "2"},
    # What the server did before: split's 40 MP per image, no request budget, no decode cap.
    "split's limits, no caps": {"IMGSIM_MAX_PIXELS": "40000000", "IMGSIM_MAX_REQUEST_PIXELS": str(10**12),
                                "IMGSIM_MAX_CONCURRENT_DECODES": "64"},
}


def status_class(code: int) -> str:
    return f"{code // 100}xx"


def grpc_class(code: grpc.StatusCode) -> str:
    client = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE}
    return "2xx" if code == grpc.StatusCode.OK else "4xx" if code in client else "5xx"


def send(server, kind: str, data: bytes, form: str) -> tuple[str, str, str]:
    if form == "gRPC binData":
        with grpc.insecure_channel(server.grpc, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            try:
                prediction_pb2_grpc.ModelStub(channel).Predict(prediction_pb2.SeldonMessage(binData=data), timeout=120)
                return kind, form, "2xx"
            except grpc.RpcError as exc:
                return kind, form, grpc_class(exc.code())
    body = {"jsonData": {"images": [b64(data)] * 16}} if form == "REST batch x16" else {"binData": b64(data)}
    reply = requests.post(f"{server.rest}/api/v1.0/predictions", json=body, timeout=120)
    return kind, form, status_class(reply.status_code)


def warm_up(server, image: bytes) -> float:
    """Good queries until every worker has loaded and answered, then the idle PSS (median of 5 samples)."""
    for _ in range(40):
        requests.post(f"{server.rest}/api/v1.0/predictions", json={"binData": b64(image)}, timeout=60).raise_for_status()
        with grpc.insecure_channel(server.grpc) as channel:
            prediction_pb2_grpc.ModelStub(channel).Predict(prediction_pb2.SeldonMessage(binData=image), timeout=60)
    time.sleep(2)
    samples = []
    for _ in range(5):
        samples.append(pss_mb(server.proc.pid))
        time.sleep(0.2)
    return sorted(samples)[2]


def run(config: str, env: dict, bundle: Path, payloads: dict[str, bytes], good: bytes, rounds: int):
    server = start_server(CHART_SETTINGS | {"IMGSIM_MODEL_URI": str(bundle)} | env, RESULTS / "server-hostile.log")
    try:
        idle = warm_up(server, good)
        jobs = [(kind, data, form) for _ in range(rounds) for kind, data in payloads.items()
                for form in ("REST batch x16", "REST binData", "gRPC binData")]
        answers = collections.Counter()
        started = time.perf_counter()
        with PeakSampler(server.proc.pid) as sampler, concurrent.futures.ThreadPoolExecutor(4) as pool:
            for kind, form, cls in pool.map(lambda job: send(server, *job), jobs):
                answers[(kind, form, cls)] += 1
        seconds = time.perf_counter() - started
        alive = requests.get(f"{server.rest}/health/status", timeout=10).ok
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
    for config, env in CONFIGS.items():
        row, per_kind = run(config, env, bundle, payloads, good, args.rounds)
        rows.append(row)
        kinds += per_kind
        print(row, flush=True)
    print(table(rows, ["config", "idle_pss_mb", "peak_pss_mb", "growth_mb", "requests", "2xx", "4xx", "5xx",
                       "seconds", "ready_after"]))
    print(table([k for k in kinds if k["config"] == rows[0]["config"]], ["kind", "form", "answer", "count"]))
    print(f"wrote {save('hostile_memory', {'settings': CHART_SETTINGS, 'configs': CONFIGS, 'rows': rows, 'kinds': kinds, 'payload_bytes': {k: len(v) for k, v in payloads.items()}})}")


if __name__ == "__main__":
    main()
