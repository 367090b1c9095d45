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


_HANDED_OUT: set[int] = set()  # every port free_ports has returned in this process


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports that this process has not handed out before. Each stays bound until
    all are picked, so one server never gets the same port twice (CI once saw a REST port equal to its gRPC port),
    and none goes to a second server while the first has yet to bind it."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket()
            socks.append(sock)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                ports.append(port)
    finally:
        for sock in socks:
            sock.close()
    return ports


def free_port() -> int:
    return free_ports(1)[0]


class PortTaken(RuntimeError):
    """A server could not bind a port picked for it: another process took it between the pick and the bind."""


# What gunicorn (the Seldon wrapper's REST), asyncio (MLServer's uvicorn) and grpcio log, lower-cased, when a port
# is already bound.
_PORT_TAKEN = ("connection in use", "address already in use", "failed to bind to address")


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
                 every_process: bool = False, timeout: float = 120, cwd: Path = REPO / "model_server",
                 service_type: str = "MODEL") -> Server:
    """Start the wrapper with ``env`` added as a ``service_type`` node (MODEL, TRANSFORMER, COMBINER); wait until
    /health/ping answers (and /health/status is 200). ``every_process``: also until each REST worker and gRPC
    process has logged loading its bundle. Each loads on its own, resolving a registry alias when it starts, and
    readiness answers from one of them: a test that moves the alias must not start a late one on the new version."""
    def start() -> Server:
        rest, grpc_port, metrics = free_ports(3)
        full_env = os.environ | {
            "PREDICTIVE_UNIT_HTTP_SERVICE_PORT": str(rest), "PREDICTIVE_UNIT_GRPC_SERVICE_PORT": str(grpc_port),
            "PREDICTIVE_UNIT_METRICS_SERVICE_PORT": str(metrics), "PYTHONPATH": str(REPO)} | env
        binary = venv_bin(SERVE_VENV, "seldon-core-microservice")
        proc = subprocess.Popen([str(binary), interface, "--service-type", service_type], cwd=cwd, env=full_env,
                                stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        server = Server(proc, f"http://127.0.0.1:{rest}", f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics}",
                        log)
        processes = int(full_env.get("GUNICORN_WORKERS", "1")) + int(full_env.get("GRPC_WORKERS", "1"))  # Seldon's
        return _wait_up(server, lambda: requests.get(f"{server.rest}/health/ping", timeout=1).ok and (
            not wait_ready or requests.get(f"{server.rest}/health/status", timeout=5).ok) and (
            not every_process or log.read_text(errors="replace").count("imgsim: loaded ") >= processes), timeout,
            "server", f"loaded in all {processes} processes" if every_process else "up")
    return _on_free_ports(start)


def _on_free_ports(start, attempts: int = 3) -> Server:
    """``start()`` again, on new ports, when another process bound one of its ports first."""
    for _ in range(attempts - 1):
        try:
            return start()
        except PortTaken:
            pass
    return start()


def _wait_up(server: Server, up, timeout: float, what: str, state: str) -> Server:
    """``server`` once ``up()`` holds and its gRPC port (if it has one) accepts; stopped, with its log, if it
    exits or the ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(taken in server.log.read_text(errors="replace").lower() for taken in _PORT_TAKEN):
            server.stop()
            raise PortTaken(f"{what} found a port taken:\n{server.logs()}")
        if server.proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {server.proc.returncode}:\n{server.logs()}")
        try:
            if up() and (not server.grpc or _grpc_up(server.grpc)):
                return server
        except requests.RequestException:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"{what} not {state} within {timeout}s:\n{server.logs()}")


# The serving environments (scripts/setup.sh creates them): the Seldon wrapper's (seldon-core 1.19, Python 3.12)
# and MLServer's (the Open Inference Protocol server and its gRPC client).
SERVE_VENV = Path(os.environ.get("SERVE_VENV", REPO / ".venv-serve"))
V2_VENV = Path(os.environ.get("V2_VENV", REPO / ".venv-serve-v2"))
V2_CLIENT_VENV = Path(os.environ.get("V2_CLIENT_VENV", REPO / ".venv-v2-client"))


def venv_bin(venv: Path, name: str) -> Path:
    """A program of one of the project's environments, or an error saying how to make it."""
    path = (venv if venv.is_absolute() else REPO / venv) / "bin" / name
    if not path.exists():
        raise RuntimeError(f"{path} is missing: run `bash scripts/setup.sh` (it creates every environment)")
    return path


def v2_python() -> Path:
    return venv_bin(V2_VENV, "python")


def in_serve_env(code: str, *args: str, timeout: float = 120, venv: Path = SERVE_VENV):
    """Run ``code`` in the Seldon wrapper's environment (or ``venv``; imgsim from this checkout) and return the JSON
    it prints last: what a test of the pipeline environment needs to know of seldon-core, which it cannot import."""
    out = subprocess.run([str(venv_bin(venv, "python")), "-c", code, *args], capture_output=True, text=True,
                         timeout=timeout, env=os.environ | {"PYTHONPATH": str(REPO)}, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"the {venv.name} environment's python failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def in_v2_env(code: str, *args: str, timeout: float = 120):
    """``in_serve_env`` in MLServer's environment."""
    return in_serve_env(code, *args, timeout=timeout, venv=V2_VENV)


def start_mlserver(env: dict[str, str], log: Path, *, timeout: float = 120, wait_ready: bool = True,
                   folder: Path = REPO / "model_server" / "v2") -> Server:
    """`mlserver start` of model_server/v2 (the Open Inference Protocol server; or another model ``folder``) with
    ``env`` added, on free loopback ports; waits until /v2/health/ready answers 200 (every model loaded and
    verified), or with ``wait_ready`` False until /v2/health/live does."""
    def start() -> Server:
        rest, grpc_port, metrics = free_ports(3)
        full_env = os.environ | {"MLSERVER_HOST": "127.0.0.1", "MLSERVER_HTTP_PORT": str(rest),
                                 "MLSERVER_GRPC_PORT": str(grpc_port), "MLSERVER_METRICS_PORT": str(metrics),
                                 "PYTHONPATH": str(REPO)} | env
        serve = REPO / "model_server" / "v2" / "serve.py"  # `mlserver` behind imgsim's request guard, as in the image
        proc = subprocess.Popen([str(v2_python()), str(serve), "start", "."], cwd=folder, env=full_env,
                                stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        server = Server(proc, f"http://127.0.0.1:{rest}", f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics}",
                        log)
        probe = "/v2/health/ready" if wait_ready else "/v2/health/live"
        return _wait_up(server, lambda: requests.get(f"{server.rest}{probe}", timeout=1).ok, timeout, "mlserver",
                        "ready")
    return _on_free_ports(start)


def start_tracking_server(store: Path, log: Path, *, timeout: float = 120, auth: dict[str, str] | None = None,
                          serve_artifacts: bool = False) -> Server:
    """`mlflow server` over the sqlite store in ``store`` on a free loopback port, as a cluster's tracking server:
    the serving environments' mlflow-skinny read the registry over HTTP only (no SQLAlchemy). ``auth``: MLflow's
    basic-auth app, with these admin credentials ({"username", "password"}), every other user's default
    permission none and its own user database in ``store``. ``serve_artifacts``: artifacts proxied by the server
    (into ``store``/artifacts), as on the cluster."""
    env = dict(os.environ)
    args = ["--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}"]
    if serve_artifacts:
        args += ["--serve-artifacts", "--artifacts-destination", (store / "artifacts").as_uri()]
    if auth:
        ini = store / "basic_auth.ini"
        ini.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                       f"database_uri = sqlite:///{store / 'auth.db'}\nadmin_username = {auth['username']}\n"
                       f"admin_password = {auth['password']}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env |= {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": auth["password"],
                "MLFLOW_FLASK_SERVER_SECRET_KEY": "imgsim-test-only"}
        args += ["--app-name", "basic-auth"]

    def start() -> Server:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", *args, "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "1"], cwd=store, env=env,
                                stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        server = Server(proc, f"http://127.0.0.1:{port}", "", "", log)
        return _wait_up(server, lambda: requests.get(f"{server.rest}/health", timeout=1).ok, timeout,
                        "mlflow server", "up")
    return _on_free_ports(start)


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


def triton(mode: str, server: Server, *args: str) -> dict:
    """One call of NVIDIA's tritonclient (support/triton_client.py in .venv-v2-client): ``mode`` binary or json (REST)
    or grpc."""
    url = (server.grpc if mode == "grpc" else server.rest.removeprefix("http://"))
    out = subprocess.run([str(venv_bin(V2_CLIENT_VENV, "python")), str(REPO / "support" / "triton_client.py"),
                          "--mode", mode, "--url", url, *args], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"triton_client failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
