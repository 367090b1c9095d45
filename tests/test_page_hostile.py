"""The search page under hostile clients: bounded bodies on every route and transfer encoding (real gunicorn),
a bound on queries held at once and a deadline on their bodies, odd inputs, security headers, no internal text
relayed, thumbnails through the server's bounded decode path."""

from __future__ import annotations

import base64
import http.server
import io
import json
import select
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from imgsim.errors import ImgsimError
from imgsim.serve import bodies, process, protocols
from imgsim.serve.page import QUOTED, SECURITY_HEADERS, SMALL_BODY, UiConfig, create_app
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


def _serving(handler):
    """A stand-in server with ``handler`` on a free loopback port, for a fixture: yields its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture(scope="module")
def failing_seldon():
    yield from _serving(_Seldon)


class _OkSeldon(http.server.BaseHTTPRequestHandler):
    """A Seldon stand-in that answers every query with no neighbours and keeps the last query it was sent."""

    received: list[dict] = []

    def do_GET(self):  # noqa: N802
        self._answer({"jsonData": {"model": "stub"}})

    def do_POST(self):  # noqa: N802
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self._answer({"jsonData": {"results": [{"neighbours": []}]}})

    def _answer(self, payload: dict):
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def ok_seldon():
    yield from _serving(_OkSeldon)


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
    workers = template.split('"--workers", "')[1].split('"')[0]
    assert '{name: IMGSIM_UI_WORKERS, value: "' + workers + '"}' in template  # the in-flight cap's share


# --- what a query's body may hold: the relayed body, the in-flight cap, the body deadline, odd inputs ---

PNG = io.BytesIO()
Image.linear_gradient("L").resize((28, 28)).save(PNG, format="PNG")
PNG = PNG.getvalue()


@pytest.mark.parametrize("proto", [protocols.Seldon(), protocols.OpenInference("m")], ids=["seldon", "v2"])
@pytest.mark.parametrize("size", [0, 1, 2, 3, bodies.ImageJson.CHUNK - 1, bodies.ImageJson.CHUNK * 2 + 1])
def test_the_relayed_body_is_the_protocols_json_with_the_image_held_once(proto, size):
    image = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    tags = {"k": 5, "labels": ["a", base64.b64encode(b"x" * 24).decode()]}  # a label that looks like base64
    body = bodies.ImageJson(image, lambda marker: proto.image_body(marker, tags))
    sent = b"".join(body)
    assert len(sent) == len(body) and json.loads(sent) == proto.image_body(image, tags)


def test_the_in_flight_default_follows_the_memory_limit(tmp_path, monkeypatch):
    cfg = UiConfig(workers=2)
    slots = cfg.in_flight_slots(512 * 2**20)
    assert slots >= 2 and slots * 2 * 2 * (cfg.max_image_bytes + SMALL_BODY) < 512 * 2**20  # room for each
    assert cfg.in_flight_slots(2 * 2**30) > slots and cfg.in_flight_slots(64 * 2**20) == 1
    assert UiConfig(in_flight=3).in_flight_slots(64 * 2**20) == 3
    limit = tmp_path / "memory.max"
    monkeypatch.setattr(process, "CGROUP_LIMITS", (limit, tmp_path / "v1"))
    for text, expected in (("536870912\n", 536870912), ("max\n", None), (str(2**63 - 4096), None)):
        limit.write_text(text)
        assert process.memory_limit() == expected
    limit.unlink()
    (tmp_path / "v1").write_text("1073741824")  # cgroup v1's file, where v2's is absent
    assert process.memory_limit() == 2**30
    (tmp_path / "v1").unlink()
    assert process.memory_limit() is None
    with pytest.raises(ImgsimError, match="body_deadline_s must be above 0"):
        UiConfig(body_deadline_s=float("nan"))


def _multipart(data: bytes, filename: str = "q.png") -> bytes:
    return (f'--b\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + data + b"\r\n--b--\r\n"


def _stall(port: int, length: int, sent: int, path: str = "/api/search",
           content_type: str = "multipart/form-data; boundary=b") -> socket.socket:
    """A client that declares ``length`` bytes of upload, sends ``sent`` of them and stops."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode())
    sock.sendall(_multipart(b"a" * length)[:sent])
    return sock


def _reads_no_more(sock: socket.socket) -> bool:
    """Whether the page has stopped reading this connection (it closes it rather than read on)."""
    try:
        for _ in range(256):
            sock.sendall(b"a" * 64 * 1024)
        return sock.recv(4096) == b""
    except (BrokenPipeError, ConnectionResetError):
        return True


def _search(url: str, **fields) -> requests.Response:
    return requests.post(url + "/api/search", files={"image": ("q.png", PNG)}, data=fields, timeout=60)


def _until(answer, wanted: int, seconds: float = 60):
    """``answer()`` until its status is ``wanted`` (the page notices a connection's state in its own time)."""
    end = time.monotonic() + seconds
    while True:
        response = answer()
        if response.status_code == wanted or time.monotonic() > end:
            return response
        time.sleep(0.2)


@pytest.fixture(scope="module")
def capped_page(tmp_path_factory, ok_seldon):
    log = tmp_path_factory.mktemp("capped") / "page.log"
    page = start_page(ok_seldon, log, env={"IMGSIM_UI_IN_FLIGHT": "2", "IMGSIM_UI_BODY_DEADLINE_S": "600"})
    yield {"port": page.port, "url": page.url, "log": log}
    page.stop()


def test_queries_past_the_in_flight_cap_are_refused_unread_and_the_page_recovers(capped_page):
    url, port = capped_page["url"], capped_page["port"]
    length = UiConfig().max_image_bytes + SMALL_BODY
    stalled = [_stall(port, length, length - 1) for _ in range(2)]
    try:
        big = PNG + b"\0" * 100_000  # over 64 KiB: an upload that needs one of the N slots
        busy = _until(lambda: requests.post(url + "/api/search", files={"image": ("q.png", big)}, timeout=60), 503)
        assert busy.status_code == 503 and busy.headers["Retry-After"].isdigit()
        assert "try again" in busy.json()["error"] and busy.headers["X-Frame-Options"] == "DENY"
        assert requests.get(url + "/", timeout=60).ok  # a query without a body needs no slot
        # A small body (more like this, a small image) has slots of its own: stalled uploads cannot lock it out.
        assert requests.post(url + "/api/more", json={"id": 1}, timeout=60).status_code == 200
        assert _search(url).status_code == 200
        third = _stall(port, length, 0)  # the N+1th stalled upload: refused from its headers alone
        answer = _read_answer(third)
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: " in answer
        assert _reads_no_more(third)
        third.close()
    finally:
        for sock in stalled:
            sock.close()
    answer = _until(lambda: _search(url, k="3"), 200)  # the stallers gone, their slots are free again
    assert answer.status_code == 200 and answer.json() == {"results": [{"neighbours": []}]}
    assert base64.b64decode(_OkSeldon.received[-1]["binData"]) == PNG
    assert _OkSeldon.received[-1]["meta"]["tags"] == {"k": 3}


@pytest.fixture(scope="module")
def deadline_page(tmp_path_factory, ok_seldon):
    log = tmp_path_factory.mktemp("deadline") / "page.log"
    page = start_page(ok_seldon, log, env={"IMGSIM_UI_IN_FLIGHT": "1", "IMGSIM_UI_BODY_DEADLINE_S": "2"})
    yield {"port": page.port, "url": page.url, "log": log}
    page.stop()


def _trickle(port: int) -> socket.socket:
    """A chunked upload that sends one byte every 0.3 s until it is answered: every read gets data."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(b"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    end = time.monotonic() + 60
    while time.monotonic() < end and not select.select([sock], [], [], 0.3)[0]:
        try:
            sock.sendall(b"1\r\na\r\n")
        except OSError:
            break
    return sock


@pytest.mark.parametrize("client", ["stalled upload", "stalled JSON", "trickling upload"])
def test_a_body_that_does_not_arrive_in_time_is_answered_408_and_gives_its_slot_back(deadline_page, client):
    url, port, length = deadline_page["url"], deadline_page["port"], 2**20
    start = time.monotonic()
    sock = {"stalled upload": lambda: _stall(port, length, length - 1),
            "stalled JSON": lambda: _stall(port, 1000, 10, "/api/more", "application/json"),
            "trickling upload": lambda: _trickle(port)}[client]()
    try:
        answer = _read_answer(sock)  # within the socket's 60 s: the deadline (2 s) plus ample slack
        waited = time.monotonic() - start
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in answer
        assert waited >= 1.5  # the deadline, not an early refusal
        assert _reads_no_more(sock)
    finally:
        sock.close()
    assert _until(lambda: _search(url), 200).status_code == 200  # the one slot is free again (in_flight 1)


ODD_MORE = [  # (body, status, the k the server is asked for)
    (b'{"id": 1, "k": 1e999}', 200, 50), (b'{"id": 1, "k": -1e999}', 200, 1), (b'{"id": 1, "k": NaN}', 200, 5),
    (b'{"id": 1, "k": "1e999"}', 200, 5), (b'{"id": 1, "k": 123456789012345678901234567890}', 200, 50),
    (b'{"id": 1, "k": [3]}', 200, 5), (b'{"id": 1, "k": true, "labels": ["a"]}', 200, 1),
    (b'{"id": 1e999}', 400, None), (b'{"id": NaN}', 400, None), (b'{"id": 123456789012345678901234567890}', 400, None),
    (b'{"id": 1, "k": ' + b"9" * 5000 + b"}", 400, None), (b"[" * 30000 + b"]" * 30000, 400, None),
    (b'{"id": ' * 5000 + b"1" + b"}" * 5000, 400, None), (b'{"id": {"id": 1}}', 400, None),
    (b"\xff\xfe{", 400, None), (b'{"id": 1', 400, None), (b'"' + b"x" * 60000 + b'"', 400, None),
]


@pytest.mark.parametrize("body,status,k", ODD_MORE, ids=range(len(ODD_MORE)))
def test_odd_json_is_a_short_400_or_a_query_with_a_sane_k(capped_page, body, status, k):
    answer = requests.post(capped_page["url"] + "/api/more", data=body, timeout=60,
                           headers={"Content-Type": "application/json"})
    assert answer.status_code == status
    if status == 200:
        assert _OkSeldon.received[-1]["jsonData"] == {"id": 1, "k": k}
    else:
        assert answer.json()["error"] == "'id' must be a gallery id (an integer)"


def test_odd_uploads_are_short_400s_or_queries_with_a_sane_k(capped_page):
    url = capped_page["url"]
    for k, asked in (("1e999", 5), ("inf", 5), ("nan", 5), ("9" * 5000, 5), ("-3", 1), ("7", 7)):
        assert _search(url, k=k).status_code == 200 and _OkSeldon.received[-1]["meta"]["tags"] == {"k": asked}
    long_name = "n" * 5000 + ".png"
    empty = requests.post(url + "/api/search", files={"image": (long_name, b"")}, timeout=60)
    assert empty.status_code == 400 and len(empty.json()["error"]) <= QUOTED + 20
    assert empty.json()["error"].endswith("... is empty")
    for data, content_type in ((_multipart(PNG), "multipart/form-data"),  # no boundary
                               (b"--b\r\nno headers at all", "multipart/form-data; boundary=b"),
                               (PNG, "image/png"), (b"k=3", "application/x-www-form-urlencoded")):
        answer = requests.post(url + "/api/search", data=data, headers={"Content-Type": content_type}, timeout=60)
        assert answer.status_code == 400 and answer.json() == {"error": "choose an image file to search with"}


def test_no_client_mistake_left_a_trace_and_the_page_still_serves(capped_page, deadline_page):
    for page in (capped_page, deadline_page):
        assert _search(page["url"]).status_code == 200
        assert "Traceback" not in page["log"].read_text(errors="replace")
