"""Bench: the real server for 10 minutes under mixed good and bad traffic at concurrency 4 (loopback only).

python -m bench.soak [--bundle bundles/demo] [--minutes 10] [--max-requests 200000]      (after `make demo`)
First a warm-up of the same mixed traffic (--warmup-seconds, 60 by default; every worker meets every kind of
request, so its caches and allocator arenas are filled), then the measured run. Reports requests and
answers by class, p50/p99 latency and PSS per minute, and PSS growth from the start of the measured run to
its end. Targets: zero 5xx, PSS growth under 5%.
"""

from __future__ import annotations

import argparse
import collections
import random
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import requests
from google.protobuf import json_format
from PIL import Image
from imgsim.serve import seldon_wire

from bench.common import RESULTS, save, table
from bench.hostile import CHART_SETTINGS, DEMO_BUNDLE, b64, demo_bundle, encode, pss_mb
from imgsim.bundle import ServingBundle
from support.servers import start_server

REPO = Path(__file__).resolve().parents[1]
BAD_SHARE = 0.3


def good_requests(images: list[bytes], items: list, size: int, has_root: bool) -> list:
    """(name, protocol, body) makers for well-formed queries."""
    pick = random.choice
    makers = [
        ("binData", "REST", lambda: {"binData": b64(pick(images))}),
        ("json image k=10", "REST", lambda: {"jsonData": {"image": b64(pick(images)), "k": 10}}),
        ("json batch x4", "REST", lambda: {"jsonData": {"images": [b64(pick(images)) for _ in range(4)]}}),
        ("json id", "REST", lambda: {"jsonData": {"id": random.randrange(size)}}),
        ("binData", "gRPC", lambda: seldon_wire.SeldonMessage(binData=pick(images))),
        ("json id", "gRPC", lambda: _grpc_json({"id": random.randrange(size), "k": 3})),
    ]
    if has_root:
        makers.append(("json path", "REST", lambda: {"jsonData": {"path": pick(items).path}}))
    return makers


def bad_requests() -> list:
    truncated = encode(Image.linear_gradient("L"), "PNG")[:200]
    bomb = encode(Image.new("1", (6000, 6000)), "PNG")
    return [
        ("junk bytes", "REST", lambda: {"binData": b64(random.randbytes(random.randrange(1, 4096)))}),
        ("bad base64", "REST", lambda: {"binData": "%%%not base64"}),
        ("k=0", "REST", lambda: {"jsonData": {"id": 0, "k": 0}}),
        ("401-digit k", "REST", lambda: {"jsonData": {"id": 0, "k": 10**400}}),
        ("unknown id", "REST", lambda: {"jsonData": {"id": 10**9}}),
        ("outside path", "REST", lambda: {"jsonData": {"path": "../../etc/passwd"}}),
        ("truncated PNG", "REST", lambda: {"binData": b64(truncated)}),
        ("1-bit 36 MP PNG", "REST", lambda: {"jsonData": {"images": [b64(bomb)] * 16}}),
        ("not an object", "REST", lambda: [1, 2, 3]),
        ("junk bytes", "gRPC", lambda: seldon_wire.SeldonMessage(binData=random.randbytes(512))),
        ("k=-1", "gRPC", lambda: _grpc_json({"id": 0, "k": -1})),
    ]


def _grpc_json(data: dict) -> seldon_wire.SeldonMessage:
    return json_format.ParseDict({"jsonData": data}, seldon_wire.SeldonMessage())


class Recorder:
    """Answers by class and latencies, bucketed by the minute they completed in."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.minutes: dict[int, dict] = collections.defaultdict(lambda: {"latencies": [], "classes": collections.Counter()})
        self.kinds = collections.Counter()

    def add(self, minute: int, kind: str, cls: str, ms: float) -> None:
        with self.lock:
            self.minutes[minute]["latencies"].append(ms)
            self.minutes[minute]["classes"][cls] += 1
            self.kinds[(kind, cls)] += 1


def client(server, makers_good, makers_bad, recorder: Recorder, started: float, deadline: float, budget: list,
           seed: int) -> None:
    last_minute = max(0, int(-(-(deadline - started) // 60)) - 1)
    random.seed(seed)
    session = requests.Session()
    channel = grpc.insecure_channel(server.grpc)
    stub = seldon_wire.ModelStub(channel)
    while time.monotonic() < deadline:
        with recorder.lock:
            if budget[0] <= 0:
                break
            budget[0] -= 1
        bad = random.random() < BAD_SHARE
        name, protocol, make = random.choice(makers_bad if bad else makers_good)
        body = make()
        t0 = time.monotonic()
        if protocol == "REST":
            code = session.post(f"{server.rest}/api/v1.0/predictions", json=body, timeout=60).status_code
            cls = f"{code // 100}xx"
        else:
            try:
                stub.Predict(body, timeout=60)
                cls = "2xx"
            except grpc.RpcError as exc:
                cls = "4xx" if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else "5xx"
        t1 = time.monotonic()
        minute = min(int((t1 - started) // 60), last_minute)  # a request still in flight at the end counts in the last
        recorder.add(minute, f"{'bad' if bad else 'good'} {protocol} {name}", cls, (t1 - t0) * 1000)
    channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=DEMO_BUNDLE)
    parser.add_argument("--gallery-root", type=Path, default=REPO / "data" / "fashion-mnist")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-requests", type=int, default=300_000, help="a bound on the count as well as the time")
    parser.add_argument("--warmup-seconds", type=float, default=60.0)
    args = parser.parse_args()
    bundle = demo_bundle(args.bundle)
    items = ServingBundle.load(bundle).index.items
    has_root = args.gallery_root.is_dir()
    rng = random.Random(0)
    sample = rng.sample(items, 200)
    images = [(args.gallery_root / it.path).read_bytes() for it in sample] if has_root else \
        [encode(Image.fromarray(np.random.default_rng(i).integers(0, 255, (28, 28), dtype=np.uint8)), "PNG")
         for i in range(200)]
    env = CHART_SETTINGS | {"IMGSIM_MODEL_URI": str(bundle)} | (
        {"IMGSIM_GALLERY_ROOT": str(args.gallery_root)} if has_root else {})
    server = start_server(env, RESULTS / "server-soak.log")
    recorder = Recorder()
    try:
        good, bad = good_requests(images, sample, len(items), has_root), bad_requests()
        warm = time.monotonic()
        warmup = [threading.Thread(target=client, args=(server, good, bad, Recorder(), warm, warm + args.warmup_seconds,
                                                        [args.max_requests], 100 + seed)) for seed in range(args.concurrency)]
        for t in warmup:
            t.start()
        for t in warmup:
            t.join()
        time.sleep(2)
        pss_start = pss_mb(server.proc.pid)
        per_minute_pss = []
        started = time.monotonic()
        deadline = started + args.minutes * 60
        budget = [args.max_requests]
        threads = [threading.Thread(target=client, args=(server, good, bad, recorder, started, deadline, budget, seed))
                   for seed in range(args.concurrency)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(1)
            minute = int((time.monotonic() - started) // 60)
            if minute >= len(per_minute_pss):
                per_minute_pss.append(pss_mb(server.proc.pid))
        for t in threads:
            t.join()
        time.sleep(2)
        pss_end = pss_mb(server.proc.pid)
        ready = requests.get(f"{server.rest}/health/status", timeout=10).ok
    finally:
        server.stop()
    rows = []
    for minute, data in sorted(recorder.minutes.items()):
        lat = np.asarray(data["latencies"])
        rows.append({"minute": minute + 1, "requests": len(lat), "2xx": data["classes"]["2xx"],
                     "4xx": data["classes"]["4xx"], "5xx": data["classes"]["5xx"],
                     "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                     "pss_mb": per_minute_pss[minute] if minute < len(per_minute_pss) else pss_end})
    total = {cls: sum(r[cls] for r in rows) for cls in ("2xx", "4xx", "5xx")}
    summary = {"minutes": args.minutes, "warmup_seconds": args.warmup_seconds, "concurrency": args.concurrency, "requests": sum(r["requests"] for r in rows),
               **total, "pss_start_mb": pss_start, "pss_end_mb": pss_end,
               "pss_growth_pct": 100 * (pss_end - pss_start) / pss_start, "ready_after": ready}
    print(table(rows, ["minute", "requests", "2xx", "4xx", "5xx", "p50_ms", "p99_ms", "pss_mb"]))
    print(table([summary], list(summary)))
    kinds = [{"kind": k, "answer": c, "count": n} for (k, c), n in sorted(recorder.kinds.items())]
    print(table(kinds, ["kind", "answer", "count"]))
    print(f"wrote {save('soak', {'settings': CHART_SETTINGS, 'summary': summary, 'minutes': rows, 'kinds': kinds})}")


if __name__ == "__main__":
    main()
