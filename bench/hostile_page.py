"""Bench: the search page under hostile clients, as `imgsim ui` runs it (gunicorn), in front of the real server.

python -m bench.hostile_page [--bundle bundles/demo]      (after `make demo`)
Phases: oversized and chunked bodies on every body route; 32 trickling + 8 silent connections while one
client sends normal requests (page, thumbnail, search); 4 clients viewing palette-bomb thumbnails. PSS of
all page processes is sampled every 50 ms. Targets: no 5xx, normal requests answered within 2 s under the
slow connections, peak <= idle + 150 MB.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from bench.common import save, table
from bench.hostile import DEMO_BUNDLE, PeakSampler, demo_bundle, encode, pss_mb
from support.servers import start_page, start_server

MiB = 2**20


def gallery(root: Path) -> dict[str, str]:
    """A few normal images and palette bombs: transparent palette PNGs of a few kB that expand to many MB."""
    root.mkdir(parents=True, exist_ok=True)
    Image.linear_gradient("L").resize((96, 96)).save(root / "normal.png")
    bombs = {}
    for i, (w, h) in enumerate([(4000, 2990), (3990, 3000), (3000, 3990), (7300, 5470)]):
        img = Image.new("P", (w, h), 0)
        img.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
        img.paste(1, (w // 4, h // 4, w // 2, h // 2))
        name = f"bomb-{i}.png"
        img.save(root / name, transparency=0)
        bombs[name] = f"{w}x{h} palette PNG, {os.path.getsize(root / name)} bytes"
    return bombs


def chunked(port: int, path: str, content_type: str, total: int) -> tuple[str, int]:
    """POST ``total`` bytes chunked; stop once the page answers. (status, body bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".encode())
    sent, chunk = 0, 64 * 1024
    sock.setblocking(False)
    answer = b""
    try:
        while sent < total and not answer:
            try:
                answer = sock.recv(4096)
            except BlockingIOError:
                sock.setblocking(True)
                try:
                    sock.sendall(f"{chunk:x}\r\n".encode() + b"a" * chunk + b"\r\n")
                    sent += chunk
                except OSError:
                    break
                sock.setblocking(False)
        sock.setblocking(True)
        if not answer:
            answer = sock.recv(4096)
    except OSError:
        pass
    finally:
        sock.close()
    return (answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/") else "closed"), sent


def declared(port: int, path: str, length: int) -> str:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode())
    answer = sock.recv(4096)
    sock.close()
    return answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/") else "closed"


def bodies(port: int) -> list[dict]:
    cases = [("chunked 40 MiB JSON", lambda: chunked(port, "/api/more", "application/json", 40 * MiB)),
             ("chunked 40 MiB upload", lambda: chunked(port, "/api/search", "multipart/form-data; boundary=b",
                                                       40 * MiB)),
             ("declared 100 MiB upload", lambda: (declared(port, "/api/search", 100 * MiB), 0)),
             ("declared 1 MiB JSON", lambda: (declared(port, "/api/more", MiB), 0))]
    rows = []
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for name, fn in cases:
            results = list(pool.map(lambda _: fn(), range(4)))
            rows.append({"case": name, "clients": 4, "answers": ",".join(sorted({r[0] for r in results})),
                         "max_mib_sent_before_answer": round(max(r[1] for r in results) / MiB, 2)})
    return rows


def normal_request(url: str, query: bytes, i: int) -> tuple[int, float]:
    start = time.perf_counter()
    if i % 3 == 0:
        response = requests.get(url + "/", timeout=30)
    elif i % 3 == 1:
        response = requests.get(url + "/thumb/normal.png", timeout=30)
    else:
        response = requests.post(url + "/api/search", files={"image": ("q.png", query)}, timeout=30)
    return response.status_code, time.perf_counter() - start


def slow_clients(url: str, port: int, query: bytes, requests_n: int) -> dict:
    slow = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(40)]
    for sock in slow[:32]:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    answers, closed = [], 0
    try:
        for i in range(requests_n):
            for sock in slow[:32]:
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    pass
            answers.append(normal_request(url, query, i))
        for sock in slow:
            sock.settimeout(10)
            try:
                closed += sock.recv(1) == b""
            except OSError:
                closed += 1
    finally:
        for sock in slow:
            sock.close()
    seconds = np.array([s for _, s in answers]) * 1000
    codes = [c for c, _ in answers]
    return {"slow_connections": 32, "silent_connections": 8, "normal_requests": len(answers),
            "2xx": sum(200 <= c < 300 for c in codes), "4xx": sum(400 <= c < 500 for c in codes),
            "5xx": sum(c >= 500 for c in codes), "p50_ms": float(np.percentile(seconds, 50)),
            "p99_ms": float(np.percentile(seconds, 99)), "max_ms": float(seconds.max()),
            "slow_closed_by_page": closed}


def bombs(url: str, names: list[str], rounds: int) -> dict:
    def view(name):
        return [requests.get(f"{url}/thumb/{name}", timeout=120).status_code for _ in range(rounds)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        codes = [c for result in pool.map(view, names) for c in result]
    return {"clients": len(names), "requests": len(codes), "2xx": sum(200 <= c < 300 for c in codes),
            "4xx": sum(400 <= c < 500 for c in codes), "5xx": sum(c >= 500 for c in codes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=DEMO_BUNDLE)
    parser.add_argument("--normal-requests", type=int, default=150)
    args = parser.parse_args()
    bundle = demo_bundle(args.bundle)
    work = Path(tempfile.mkdtemp(prefix="imgsim-bench-page-"))
    described = gallery(work / "gallery")
    seldon = start_server({"IMGSIM_MODEL_URI": str(bundle.resolve())}, work / "server.log")
    page = start_page(seldon.rest, work / "page.log", work / "gallery")
    url, port = page.url, page.port
    query = encode(Image.linear_gradient("L").resize((28, 28)), "PNG")
    try:
        for i in range(6):
            normal_request(url, query, i)
        time.sleep(1)
        idle = pss_mb(page.proc.pid)
        phases = []
        with PeakSampler(page.proc.pid) as sampler:
            body_rows = bodies(port)
        phases.append({"phase": "bodies", "peak_pss_mb": sampler.peak})
        with PeakSampler(page.proc.pid) as sampler:
            slow = slow_clients(url, port, query, args.normal_requests)
        phases.append({"phase": "slow clients", "peak_pss_mb": sampler.peak})
        with PeakSampler(page.proc.pid) as sampler:
            bomb = bombs(url, list(described), rounds=3)
        phases.append({"phase": "palette bombs", "peak_pss_mb": sampler.peak})
        ready = requests.get(url + "/", timeout=30).ok
    finally:
        page.stop()
        seldon.stop()
    for row in phases:
        row |= {"idle_pss_mb": idle, "growth_mb": row["peak_pss_mb"] - idle}
    print(table([{"file": k, "what": v} for k, v in described.items()], ["file", "what"]))
    print(table(body_rows, ["case", "clients", "answers", "max_mib_sent_before_answer"]))
    print(table([slow], ["slow_connections", "silent_connections", "normal_requests", "2xx", "4xx", "5xx",
                         "p50_ms", "p99_ms", "max_ms", "slow_closed_by_page"]))
    print(table([bomb], ["clients", "requests", "2xx", "4xx", "5xx"]))
    print(table(phases, ["phase", "idle_pss_mb", "peak_pss_mb", "growth_mb"]))
    print(f"page still answering afterwards: {ready}")
    print(f"wrote {save('hostile_page', {'bodies': body_rows, 'slow': slow, 'bombs': bomb, 'files': described, 'phases': phases, 'ready_after': ready})}")


if __name__ == "__main__":
    main()
