"""Bench: the search page under hostile clients, as `imgsim ui` runs it (gunicorn), in front of the real server.

python -m bench.hostile_page [--bundle bundles/demo]      (after `make demo`)
Phases: oversized and chunked bodies on every body route; 32 trickling + 8 silent connections while one
client sends normal requests (page, thumbnail, search); 4 clients viewing palette-bomb thumbnails. PSS of
all page processes is sampled every 50 ms. Targets: no 5xx, normal requests answered within 2 s under the
slow connections, peak <= idle + 150 MB.

python -m bench.hostile_page --stalls [--stub]      (--stub: a Seldon stand-in instead of the real server)
Phases: 8 clients uploading the largest image the page takes (what one relayed upload holds); 100 clients
that declare the largest upload, send all of it but the last byte and stall, while one client sends normal
requests. Targets: no 5xx but the in-flight cap's 503s, normal p99 <= 2 s, peak <= idle + 150 MB.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import http.server
import json
import multiprocessing
import os
import select
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from bench.common import save, table
from bench.hostile import DEMO_BUNDLE, PeakSampler, demo_bundle, encode, pss_mb
from imgsim.serve.page import SMALL_BODY, UiConfig
from support.servers import free_port, start_page, start_server

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


class _Stub(http.server.BaseHTTPRequestHandler):
    """A Seldon stand-in: checks each query's image is whole base64 and answers no neighbours."""

    def do_GET(self):  # noqa: N802 - the page's readiness check
        self._answer(200, {"jsonData": {"model": "stub"}})

    def do_POST(self):  # noqa: N802
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            image = base64.b64decode(body.get("binData", ""), validate=True)
            self._answer(200, {"jsonData": {"results": [{"neighbours": []}], "image_bytes": len(image)}})
        except ValueError as exc:
            self._answer(400, {"status": {"info": f"bad query: {str(exc)[:80]}"}})

    def _answer(self, code: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def start_stub() -> tuple[multiprocessing.Process, str]:
    """The stand-in in its own process, so its parsing competes with the bench's clients for no lock."""
    port = free_port()
    proc = multiprocessing.get_context("fork").Process(
        target=lambda: http.server.ThreadingHTTPServer(("127.0.0.1", port), _Stub).serve_forever(), daemon=True)
    proc.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            requests.get(url, timeout=1)
            break
        except requests.RequestException:
            time.sleep(0.1)
    return proc, url


def multipart(data: bytes) -> tuple[bytes, str]:
    """A multipart body with ``data`` as the image, and its Content-Type."""
    return (b'--b\r\nContent-Disposition: form-data; name="image"; filename="q.bin"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n--b--\r\n",
            "multipart/form-data; boundary=b")


def full_uploads(url: str, clients: int, rounds: int, size: int) -> dict:
    """``clients`` at once, each uploading ``rounds`` images of ``size`` random bytes (relayed to the server)."""
    body, content_type = multipart(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())

    def upload(_):
        return [requests.post(url + "/api/search", data=body, headers={"Content-Type": content_type},
                              timeout=120).status_code for _ in range(rounds)]
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        codes = [c for result in pool.map(upload, range(clients)) for c in result]
    return {"clients": clients, "uploads": len(codes), "image_mib": round(size / MiB, 2),
            "answers": ",".join(f"{c}x{codes.count(c)}" for c in sorted(set(codes)))}


def stall(port: int, length: int, hold_s: float) -> str:
    """Declare a ``length``-byte upload, send all of it but the last byte, wait for an answer up to ``hold_s``.
    The page's status, or "closed" when it dropped the connection without one."""
    body, content_type = multipart(os.urandom(length - len(multipart(b"")[0])))
    sock = socket.create_connection(("127.0.0.1", port), timeout=hold_s)
    try:
        sock.sendall(f"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {length}\r\n\r\n".encode())
        select.select([sock], [], [], 0.5)  # a refusal comes at once: seen before sending, not lost to a reset
        for start in range(0, length - 1, 256 * 1024):
            if select.select([sock], [], [], 0)[0]:
                break  # answered before the body was sent (the cap's 503)
            sock.sendall(body[start:min(start + 256 * 1024, length - 1)])
        if select.select([sock], [], [], hold_s)[0]:
            answer = sock.recv(64)
            return answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/") else "closed"
        return "still waiting"
    except OSError:
        return "closed"
    finally:
        sock.close()


def stalls(url: str, port: int, query: bytes, clients: int, length: int, seconds: float) -> dict:
    """``clients`` stalled uploads at once while one client sends normal requests for ``seconds``."""
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        stalled = [pool.submit(stall, port, length, seconds + 30) for _ in range(clients)]
        answers, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            answers.append(normal_request(url, query, len(answers)))
        stalled = [f.result() for f in stalled]
    codes = [c for c, _ in answers] + [int(a) for a in stalled if a.isdigit()]
    ms = np.array([s for _, s in answers]) * 1000
    return {"stalled": clients, "stalled_answers": ",".join(f"{a}x{stalled.count(a)}" for a in sorted(set(stalled))),
            "normal_requests": len(answers), "normal_2xx": sum(200 <= c < 300 for c, _ in answers),
            "normal_cap_503": sum(c == 503 for c, _ in answers),
            "5xx_not_cap": sum(c >= 500 and c != 503 for c in codes),
            "normal_p50_ms": float(np.percentile(ms, 50)), "normal_p99_ms": float(np.percentile(ms, 99))}


def main_stalls(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="imgsim-bench-page-"))
    gallery(work / "gallery")
    if args.stub:
        stub, seldon_url = start_stub()
    else:
        seldon = start_server({"IMGSIM_MODEL_URI": str(demo_bundle(args.bundle).resolve())}, work / "server.log")
        seldon_url = seldon.rest
    # One worker, with the cap each worker of the chart's pod gets (2 workers, 512 MiB).
    cfg = UiConfig(in_flight=UiConfig(workers=2).in_flight_slots(512 * MiB))
    page = start_page(seldon_url, work / "page.log", work / "gallery", {"IMGSIM_UI_IN_FLIGHT": str(cfg.in_flight)})
    query = encode(Image.linear_gradient("L").resize((28, 28)), "PNG")
    try:
        for i in range(6):
            normal_request(page.url, query, i)
        time.sleep(1)
        idle = pss_mb(page.proc.pid)
        with PeakSampler(page.proc.pid) as sampler:
            uploads = full_uploads(page.url, 8, 3, cfg.max_image_bytes - 4096)
        uploads |= {"idle_pss_mb": idle, "peak_pss_mb": sampler.peak, "growth_mb": sampler.peak - idle}
        with PeakSampler(page.proc.pid) as sampler:
            stalled = stalls(page.url, page.port, query, 100, cfg.max_image_bytes + SMALL_BODY, args.seconds)
        stalled |= {"in_flight": cfg.in_flight, "deadline_s": cfg.body_deadline_s, "idle_pss_mb": idle,
                    "peak_pss_mb": sampler.peak, "growth_mb": sampler.peak - idle}
        ready = requests.get(page.url + "/", timeout=30).ok
        traces = (work / "page.log").read_text(errors="replace").count("Traceback")
    finally:
        page.stop()
        if args.stub:
            stub.terminate()
        else:
            seldon.stop()
    print(table([uploads], ["clients", "uploads", "image_mib", "answers", "idle_pss_mb", "peak_pss_mb", "growth_mb"]))
    print(table([stalled], ["in_flight", "deadline_s", "stalled", "stalled_answers", "normal_requests",
                            "normal_2xx", "normal_cap_503", "5xx_not_cap", "normal_p50_ms", "normal_p99_ms",
                            "idle_pss_mb", "peak_pss_mb", "growth_mb"]))
    print(f"page still answering afterwards: {ready}; tracebacks in its log: {traces}")
    print(f"wrote {save('hostile_page_stalls', {'uploads': uploads, 'stalls': stalled, 'ready_after': ready})}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=DEMO_BUNDLE)
    parser.add_argument("--normal-requests", type=int, default=150)
    parser.add_argument("--stalls", action="store_true", help="the stalled-uploads bench instead")
    parser.add_argument("--stub", action="store_true", help="with --stalls: a Seldon stand-in, not the server")
    parser.add_argument("--seconds", type=float, default=45.0, help="with --stalls: how long normal requests run")
    args = parser.parse_args()
    if args.stalls:
        return main_stalls(args)
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
