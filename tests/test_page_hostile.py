"""The search page under hostile clients: bounded bodies on every route and transfer encoding (real gunicorn),
security headers, no internal text relayed, thumbnails through the server's bounded decode path."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from imgsim.serve.page import SECURITY_HEADERS, SMALL_BODY, UiConfig, create_app
from support.servers import free_port, start_page


class _Seldon(http.server.BaseHTTPRequestHandler):
    """A Seldon stand-in that fails the way a real one does when its bundle URI holds credentials."""

    secret = "sqlite:///mlflow.db?password=hunter2"

    def _answer(self, code: int):
        body = json.dumps({"status": {"code": code, "info": f"cannot load models:/imgsim-gallery@serving from "
                                                           f"{self.secret}", "status": "FAILURE"}}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        self._answer(503)

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._answer(500)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def failing_seldon():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Seldon)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture
def gallery(tmp_path):
    root = tmp_path / "gallery"
    (root / "x").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.full((64, 64, 3), i * 40, np.uint8)).save(root / f"{i}.png")
    return root


def test_every_answer_carries_the_security_headers(failing_seldon, gallery):
    page = create_app(UiConfig(url=failing_seldon, gallery_root=str(gallery))).test_client()
    answers = [page.get("/"), page.get("/static/app.js"), page.get("/api/status"), page.get("/thumb/0.png"),
               page.get("/thumb/missing.png"), page.post("/api/more", json={"id": "x"}), page.get("/nowhere")]
    assert [a.status_code for a in answers] == [200, 200, 503, 200, 404, 400, 404]
    for answer in answers:
        assert {k: answer.headers.get(k) for k in SECURITY_HEADERS} == SECURITY_HEADERS
    assert "frame-ancestors 'none'" in SECURITY_HEADERS["Content-Security-Policy"]


def test_internal_text_from_the_server_is_not_relayed(failing_seldon):
    page = create_app(UiConfig(url=failing_seldon)).test_client()
    status, more = page.get("/api/status"), page.post("/api/more", json={"id": 3})
    assert status.status_code == 503 and more.status_code == 502
    for answer in (status, more):
        text = answer.get_data(as_text=True)
        assert "hunter2" not in text and "sqlite" not in text and "models:/" not in text
    assert "not ready" in status.get_json()["message"] and "try again" in more.get_json()["error"]


def test_thumbnail_names_are_normalised_and_the_cache_is_bounded_in_bytes(gallery):
    app = create_app(UiConfig(gallery_root=str(gallery), thumbnail_cache_bytes=600))
    page, cache = app.test_client(), app.extensions["imgsim.thumbnails"]
    same = [page.get(f"/thumb/{name}") for name in ("0.png", "./0.png", "x/../0.png", "0.png/", "x//../0.png")]
    assert {a.status_code for a in same} == {200} and len({a.data for a in same}) == 1
    assert len(cache._entries) == 1
    Image.new("L", (8, 8)).save(gallery.parent / "outside.png")
    assert page.get("/thumb/x/../../outside.png").status_code == 400  # escapes stay escapes
    sizes = [len(page.get(f"/thumb/{i}.png").data) for i in range(6)]
    assert max(sizes) < 600 < sum(sizes)  # a budget of a few thumbnails: older ones are dropped
    assert cache.size_bytes <= 600 and len(cache._entries) < 6


def test_a_thumbnail_over_the_servers_pixel_limit_is_refused(gallery):
    Image.new("1", (4000, 3100)).save(gallery / "bomb.png")  # 12.4 MP in a few kB
    page = create_app(UiConfig(gallery_root=str(gallery))).test_client()
    answer = page.get("/thumb/bomb.png")
    assert answer.status_code == 400 and "over this server's limit of 12000000" in answer.get_json()["error"]


# --- the real page under gunicorn, as `imgsim ui` and the chart run it ---

@pytest.fixture(scope="module")
def page(tmp_path_factory, failing_seldon):
    page = start_page(failing_seldon, tmp_path_factory.mktemp("page") / "page.log")
    yield {"port": page.port, "url": page.url}
    page.stop()


def _read_answer(sock: socket.socket) -> bytes:
    return _read_answer_from(b"", sock)


def _read_answer_from(answer: bytes, sock: socket.socket) -> bytes:
    """One HTTP answer with a Content-Length: headers and body may come in separate packets."""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(4096) or b"\r\n\r\n"
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(next((line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")),
                      b"0"))
    while len(body) < length:
        more = sock.recv(4096)
        if not more:
            break
        body += more
    return head + b"\r\n\r\n" + body


def _send_chunked(port: int, path: str, content_type: str, total: int, chunk: int = 64 * 1024) -> tuple[bytes, int]:
    """POST ``total`` bytes as chunked transfer encoding; stop sending once the server answers. Returns the
    answer's first bytes and how many body bytes were sent."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".encode())
    sock.setblocking(False)
    sent, answer = 0, b""
    try:
        while sent < total:
            try:
                answer = sock.recv(4096)
                if answer:
                    break
            except BlockingIOError:
                pass
            try:
                sock.setblocking(True)
                sock.sendall(f"{chunk:x}\r\n".encode() + b"a" * chunk + b"\r\n")
                sent += chunk
            except (BrokenPipeError, ConnectionResetError):
                break
            finally:
                sock.setblocking(False)
        sock.setblocking(True)
        sock.settimeout(30)
        answer = _read_answer_from(answer, sock)
        try:  # the server reads no more of this connection: it closes it rather than read the body to its end
            for _ in range(64):
                sock.sendall(f"{chunk:x}\r\n".encode() + b"a" * chunk + b"\r\n")
            closed = sock.recv(4096) == b""
        except (BrokenPipeError, ConnectionResetError):
            closed = True
    finally:
        sock.close()
    assert closed, "the server kept reading after its 413"
    return answer, sent


def test_a_chunked_body_is_refused_once_it_passes_the_limit(page):
    answer, sent = _send_chunked(page["port"], "/api/more", "application/json", 40 * 2**20)
    assert answer.startswith(b"HTTP/1.1 413") and b"larger than 65536 bytes" in answer
    assert sent < 40 * 2**20 // 4  # refused early, not read to the end
    answer, sent = _send_chunked(page["port"], "/api/search", "multipart/form-data; boundary=xx", 40 * 2**20)
    assert answer.startswith(b"HTTP/1.1 413") and sent < 40 * 2**20 // 2


def test_a_declared_oversize_body_is_refused_before_it_is_sent(page):
    sock = socket.create_connection(("127.0.0.1", page["port"]), timeout=30)
    sock.sendall(f"POST /api/more HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {SMALL_BODY + 1}\r\n\r\n".encode())
    answer = _read_answer(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413") and b"larger than" in answer
    assert requests.get(page["url"] + "/", timeout=30).ok  # and it keeps serving


def test_slow_and_idle_clients_do_not_freeze_the_page(page):
    # 32 clients that trickle their headers and 8 that send nothing: with gunicorn's threaded worker (8
    # threads) every normal request waited behind them. The checks here are answers, not times.
    slow = [socket.create_connection(("127.0.0.1", page["port"]), timeout=30) for _ in range(40)]
    try:
        for sock in slow[:32]:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        answers = []
        for _ in range(12):
            for sock in slow[:32]:
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    pass  # already closed by the server: what it should do to a client this slow
            answers.append(requests.get(page["url"] + "/", timeout=20).status_code)
        assert answers == [200] * 12
        time.sleep(6)  # past the page's header timeout (gunicorn keepalive, 5 s)
        for sock in slow:  # every slow connection has been closed by the server
            sock.settimeout(20)
            try:
                assert sock.recv(4096) == b""
            except ConnectionResetError:
                pass
    finally:
        for sock in slow:
            sock.close()


def test_the_chart_runs_the_page_with_the_same_worker_settings():
    template = (Path(__file__).resolve().parents[1] / "charts" / "imgsim" / "templates" / "ui.yaml").read_text()
    from imgsim.serve.page import GUNICORN
    for flag, value in (("--worker-class", GUNICORN["worker_class"]),
                        ("--worker-connections", GUNICORN["worker_connections"]), ("--keep-alive", GUNICORN["keepalive"])):
        assert f'"{flag}", "{value}"' in template
