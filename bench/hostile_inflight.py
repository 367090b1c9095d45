"""Bench: the Open Inference Protocol server (MLServer behind imgsim's guard) under 100 stalled 16 MiB uploads and
normal traffic at once, guarded (the serving defaults) against unguarded (no in-flight cap, no body deadline).

python -m bench.hostile_inflight [--bundle bundles/demo] [--stallers 100] [--clients 4] [--seconds 40]
Each staller declares a 16 MiB body, sends all of it but the last byte and waits; answered (503, 408) it waits the
Retry-After and starts again. Each client sends a 28x28 demo query (REST JSON, k=5) back to back. PSS (all server
processes, shared pages once) is sampled every 50 ms. Targets (issue 39): no 5xx but the cap's 503s, normal queries
p99 <= 2 s, peak PSS <= idle + 300 MB.
"""

from __future__ import annotations

import argparse
import collections
import json
import select
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import requests

from bench.common import save, table
from bench.hostile import DEMO_BUNDLE, PeakSampler, b64, demo_bundle, pss_mb
from imgsim.index import read_items
from support.servers import start_mlserver

BODY = 16 * 2**20
CONFIGS = {
    "guarded (serving defaults)": {},
    "unguarded (no cap, no deadline)": {"IMGSIM_MAX_INFLIGHT_REQUESTS": "1000000",
                                        "IMGSIM_MAX_INFLIGHT_BYTES": str(10**15), "IMGSIM_BODY_TIMEOUT_S": "80000"},
}
SETTINGS = {"IMGSIM_THREADS": "1", "OMP_NUM_THREADS": "1", "IMGSIM_POLL_INTERVAL_S": "0"}


class Staller(threading.Thread):
    """Uploads 16 MiB but the last byte, again and again; counts the answers it gets."""

    def __init__(self, url: str, stop: threading.Event, answers: collections.Counter) -> None:
        super().__init__(daemon=True)
        self.address, self.stop, self.answers = urlsplit(url), stop, answers

    def run(self) -> None:
        while not self.stop.is_set():
            status, retry = self._once()
            self.answers[status] += 1
            self.stop.wait(retry)

    def _once(self) -> tuple[str, float]:
        try:
            sock = socket.create_connection((self.address.hostname, self.address.port), timeout=5)
        except OSError:
            return "connect failed", 0.5
        with sock:
            sock.setblocking(False)
            data = memoryview(b"POST /v2/models/imgsim/infer HTTP/1.1\r\nHost: bench\r\nContent-Type: "
                              b"application/json\r\nContent-Length: %d\r\n\r\n" % BODY + b" " * (BODY - 1))
            while not self.stop.is_set():
                readable, writable, _ = select.select([sock], [sock] if len(data) else [], [], 0.2)
                if readable:
                    return _status(sock)
                if writable:
                    try:
                        data = data[sock.send(data[:1 << 20]):]
                    except OSError:  # refused and closed before the body was all sent: its answer may be there
                        return _status(sock)
        return "held to the end", 0


def _status(sock: socket.socket) -> tuple[str, float]:
    sock.setblocking(True)
    sock.settimeout(2)
    try:
        head = sock.recv(4096).split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    except OSError:
        return "connection reset", 0.2
    if not head or not head[0]:
        return "connection closed", 0.2
    retry = next((float(h.split(":", 1)[1]) for h in head if h.lower().startswith("retry-after:")), 0.0)
    return head[0].split(" ", 2)[1], retry


def normal_traffic(url: str, body: bytes, stop: threading.Event, latencies: list, statuses: collections.Counter):
    session = requests.Session()
    while not stop.is_set():
        started = time.perf_counter()
        try:
            reply = session.post(f"{url}/v2/models/imgsim/infer", data=body, timeout=30,
                                 headers={"Content-Type": "application/json"})
            statuses[str(reply.status_code)] += 1
        except requests.RequestException as exc:
            statuses[type(exc).__name__] += 1
        latencies.append(time.perf_counter() - started)


def run(config: str, env: dict, bundle: Path, args, body: bytes, log: Path) -> dict:
    server = start_mlserver({"IMGSIM_MODEL_URI": str(bundle), **SETTINGS, **env}, log)
    try:
        for _ in range(20):  # warm: the first queries map the model and the index
            requests.post(f"{server.rest}/v2/models/imgsim/infer", data=body, timeout=30,
                          headers={"Content-Type": "application/json"})
        time.sleep(1)
        idle = pss_mb(server.proc.pid)
        stop, staller_answers, statuses, latencies = threading.Event(), collections.Counter(), collections.Counter(), []
        with PeakSampler(server.proc.pid) as sampler:
            stallers = [Staller(server.rest, stop, staller_answers) for _ in range(args.stallers)]
            clients = [threading.Thread(target=normal_traffic, args=(server.rest, body, stop, latencies, statuses),
                                        daemon=True) for _ in range(args.clients)]
            for thread in stallers + clients:
                thread.start()
            time.sleep(args.seconds)
            stop.set()
            for thread in stallers + clients:
                thread.join(timeout=10)
        ready = requests.get(f"{server.rest}/v2/models/imgsim/ready", timeout=10).status_code
    finally:
        server.stop()
    lat = np.asarray(latencies) * 1000
    five = {s: n for s, n in (statuses + staller_answers).items() if s.startswith("5") and s != "503"}
    return {"config": config, "idle_pss_mb": round(idle), "peak_pss_mb": round(sampler.peak),
            "growth_mb": round(sampler.peak - idle), "queries": len(latencies),
            "query_answers": dict(statuses), "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
            "staller_answers": dict(staller_answers), "5xx_not_cap": sum(five.values()), "ready_after": ready}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=DEMO_BUNDLE)
    parser.add_argument("--stallers", type=int, default=100)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--logs", type=Path, default=Path("/tmp"))
    args = parser.parse_args()
    bundle = demo_bundle(args.bundle)
    item = read_items(bundle / "items.csv")[0]
    root = Path("data/fashion-mnist")  # make demo's gallery; any small image does when it is not there
    image = (root / item.path).read_bytes() if (root / item.path).exists() else _tiny_png()
    body = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [b64(image)]}],
                       "parameters": {"k": 5}}).encode()
    rows = []
    for config, env in CONFIGS.items():
        rows.append(run(config, env, bundle, args, body, args.logs / "hostile-inflight.log"))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows, ["config", "idle_pss_mb", "peak_pss_mb", "growth_mb", "queries", "p50_ms", "p99_ms",
                       "5xx_not_cap", "ready_after"]))
    for row in rows:
        print(f"{row['config']}: queries {row['query_answers']}, stallers {row['staller_answers']}")
    print(f"wrote {save('hostile_inflight', {'args': vars(args) | {'bundle': str(args.bundle), 'logs': str(args.logs)}, 'settings': SETTINGS, 'configs': CONFIGS, 'rows': rows})}")


def _tiny_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.linear_gradient("L").resize((28, 28)).save(buf, format="PNG")
    return buf.getvalue()


if __name__ == "__main__":
    main()
