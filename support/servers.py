"""Run the real seldon-core-microservice on free loopback ports for tests and benchmarks."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]  # the checkout: servers run its model_server/


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """End a server started in its own session and every worker it forked (gunicorn, gRPC): SIGTERM to the
    process group, SIGKILL if it has not ended within ``timeout`` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclasses.dataclass
class Server:
    proc: subprocess.Popen
    rest: str
    grpc: str
    metrics: str
    log: Path

    def stop(self) -> None:
        stop_group(self.proc)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def start_server(env: dict[str, str], log: Path, *, interface: str = "ModelServer", wait_ready: bool = True,
                 timeout: float = 120, cwd: Path = REPO / "model_server", service_type: str = "MODEL") -> Server:
    """Start the wrapper with ``env`` added as a ``service_type`` node (MODEL, TRANSFORMER, COMBINER); wait until
    /health/ping answers (and /health/status is 200)."""
    rest, grpc_port, metrics = free_port(), free_port(), free_port()
    full_env = os.environ | {
        "PREDICTIVE_UNIT_HTTP_SERVICE_PORT": str(rest), "PREDICTIVE_UNIT_GRPC_SERVICE_PORT": str(grpc_port),
        "PREDICTIVE_UNIT_METRICS_SERVICE_PORT": str(metrics), "PYTHONPATH": str(REPO)} | env
    binary = Path(sys.executable).parent / "seldon-core-microservice"
    handle = open(log, "wb")
    proc = subprocess.Popen([str(binary), interface, "--service-type", service_type], cwd=cwd,
                            env=full_env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(proc, f"http://127.0.0.1:{rest}", f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics}", log)
    return _wait_up(server, lambda: requests.get(f"{server.rest}/health/ping", timeout=1).ok and (
        not wait_ready or requests.get(f"{server.rest}/health/status", timeout=5).ok), timeout, "server", "up")


def _wait_up(server: Server, up, timeout: float, what: str, state: str) -> Server:
    """``server`` once ``up()`` holds and its gRPC port accepts; stopped, with its log, if it exits or the
    ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {server.proc.returncode}:\n{server.logs()}")
        try:
            if up() and _grpc_up(server.grpc):
                return server
        except requests.RequestException:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"{what} not {state} within {timeout}s:\n{server.logs()}")


# MLServer's environment (scripts/setup.sh creates it): the Open Inference Protocol server and its gRPC client.
V2_VENV = Path(os.environ.get("V2_VENV", REPO / ".venv-serve-v2"))


def v2_python() -> Path:
    python = V2_VENV if V2_VENV.is_absolute() else REPO / V2_VENV
    python = python / "bin" / "python"
    if not python.exists():
        raise RuntimeError(f"{python} is missing: run `bash scripts/setup.sh` (it creates the MLServer environment)")
    return python


def start_mlserver(env: dict[str, str], log: Path, *, timeout: float = 120, wait_ready: bool = True) -> Server:
    """`mlserver start model_server/v2` (the Open Inference Protocol server) with ``env`` added, on free loopback
    ports; waits until /v2/health/ready answers 200 (every model loaded and verified), or with ``wait_ready``
    False until /v2/health/live does."""
    rest, grpc_port, metrics = free_port(), free_port(), free_port()
    full_env = os.environ | {"MLSERVER_HOST": "127.0.0.1", "MLSERVER_HTTP_PORT": str(rest),
                             "MLSERVER_GRPC_PORT": str(grpc_port), "MLSERVER_METRICS_PORT": str(metrics),
                             "PYTHONPATH": str(REPO)} | env
    proc = subprocess.Popen([str(v2_python().parent / "mlserver"), "start", "."], cwd=REPO / "model_server" / "v2",
                            env=full_env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(proc, f"http://127.0.0.1:{rest}", f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics}", log)
    probe = "/v2/health/ready" if wait_ready else "/v2/health/live"
    return _wait_up(server, lambda: requests.get(f"{server.rest}{probe}", timeout=1).ok, timeout, "mlserver",
                    "ready")


def oip_grpc(server: Server, *args: str) -> dict:
    """One Open Inference Protocol gRPC call through support/oip_client.py in MLServer's environment."""
    out = subprocess.run([str(v2_python()), str(REPO / "support" / "oip_client.py"), "--grpc", server.grpc, *args],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"oip_client failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_graph(body: dict, embedder: str, shards: list[str], merger: str) -> requests.Response:
    """One query through a sharded gallery's graph over REST, in the graph's order: what Seldon's executor does in
    a cluster. Each node's answer becomes the next one's request; the first refusal is returned as it is."""
    message = requests.post(f"{embedder}/transform-input", json=body, timeout=30)
    if not message.ok:
        return message
    answers = [requests.post(f"{shard}/predict", json=message.json(), timeout=30) for shard in shards]
    refused = next((answer for answer in answers if not answer.ok), None)
    if refused is not None:
        return refused
    return requests.post(f"{merger}/aggregate", json={"seldonMessages": [a.json() for a in answers]}, timeout=30)


def _grpc_up(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, int(port))) == 0


@dataclasses.dataclass
class Page:
    proc: subprocess.Popen
    url: str
    port: int
    log: Path

    def stop(self) -> None:
        stop_group(self.proc)


def start_page(seldon_url: str, log: Path, gallery_root: Path | None = None, env: dict[str, str] | None = None,
               timeout: float = 60) -> Page:
    """`imgsim ui` (gunicorn, as users run it) on a free loopback port, in its own session; waits for its page."""
    port = free_port()
    args = [sys.executable, "-m", "imgsim.cli", "ui", "--url", seldon_url, "--port", str(port)]
    args += ["--gallery-root", str(gallery_root)] if gallery_root else []
    proc = subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
                            env=os.environ | (env or {}))
    page = Page(proc, f"http://127.0.0.1:{port}", port, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"imgsim ui exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if requests.get(page.url + "/", timeout=1).ok:
                return page
        except requests.RequestException:
            time.sleep(0.2)
    page.stop()
    raise RuntimeError(f"imgsim ui not up within {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")
