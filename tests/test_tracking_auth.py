"""The tracking server as the cluster runs it: the real `mlflow server --app-name basic-auth` on loopback, one
identity per role made by `imgsim tracking-users`, the pipeline writing through it end to end, the serving identity
reading and refused everything else, and a gallery version whose stored files changed after registration refused
by the real Seldon server on the registry's digest."""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from imgsim.bundle_format import BUNDLE_JSON
from imgsim.modelspec import file_sha256
from imgsim.runs import tracking
from support.servers import start_server, start_tracking_server
from tests.conftest import make_image_folder, photo

pytestmark = pytest.mark.slow

GALLERY = "imgsim-gallery"
# The pipeline at the test suite's smallest size (as the shared pipeline_run fixture trains it).
SMALL_MAIN = ["--test-ratio", "0.25", "--eval-ratio", "0.1", "--epochs", "2", "--batch-size", "16", "--widths", "8,16",
              "--depths", "1,1", "--embedding-dim", "16", "--image-size", "32", "--n-trees", "5", "--plot-points", "40"]


def _cli(*args: str, env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run([sys.executable, "-m", "imgsim.cli", *args], cwd=cwd, env=clean | env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The authenticated server, its identities made twice (the step is idempotent), and one pipeline run."""
    store = tmp_path_factory.mktemp("auth-store")
    creds = {role: {"username": f"imgsim-{role}", "password": secrets.token_urlsafe(16)}
             for role in ("pipeline", "serving")}
    admin = {"username": "admin", "password": secrets.token_urlsafe(16)}
    srv = start_tracking_server(store, store / "mlflow.log", auth=admin, serve_artifacts=True)
    try:
        env = {"MLFLOW_TRACKING_URI": srv.rest, "MLFLOW_TRACKING_USERNAME": admin["username"],
               "MLFLOW_TRACKING_PASSWORD": admin["password"],
               "IMGSIM_PIPELINE_PASSWORD": creds["pipeline"]["password"],
               "IMGSIM_SERVING_PASSWORD": creds["serving"]["password"]}
        runs = [_cli("tracking-users", env=env, cwd=store) for _ in range(2)]
        yield {"url": srv.rest, "store": store, "admin": admin, "creds": creds, "setup": runs, "log": srv.log}
    finally:
        srv.stop()


def _as(server: dict, role: str) -> dict[str, str]:
    creds = server["creds"][role]
    return {"MLFLOW_TRACKING_URI": server["url"], "MLFLOW_TRACKING_USERNAME": creds["username"],
            "MLFLOW_TRACKING_PASSWORD": creds["password"]}


@pytest.fixture(scope="module")
def pipeline(server, tmp_path_factory):
    """`imgsim main` end to end as the pipeline identity: split, train, extract, the gallery registered."""
    work = tmp_path_factory.mktemp("auth-pipeline")
    make_image_folder(work / "images")
    result = _cli("main", "--data-dir", str(work / "images"), *SMALL_MAIN, "--checkpoint-dir", str(work / "ckpt"),
                  "--result-file", str(work / "result.json"), env=_as(server, "pipeline"), cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"work": work, "root": work / "images", "result": json.loads((work / "result.json").read_text())}


@pytest.fixture
def as_role(server, monkeypatch):
    """Point this process's MLflow client at the server as one role (or anonymous, None)."""
    def use(role: str | None) -> MlflowClient:
        for key, value in (_as(server, role) if role else {"MLFLOW_TRACKING_URI": server["url"]}).items():
            monkeypatch.setenv(key, value)
        if role is None:
            monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
            monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        mlflow.set_tracking_uri(server["url"])
        return MlflowClient()
    yield use
    mlflow.set_tracking_uri(None)


def test_the_identities_step_is_idempotent_and_grants_each_role_its_own(server):
    first, second = server["setup"]
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "created user imgsim-pipeline" in first.stdout and "created user imgsim-serving" in first.stdout
    assert "user imgsim-serving exists: password set" in second.stdout  # a rerun rotates, creates nothing twice
    for out in (first.stdout, second.stdout):
        assert f"imgsim-pipeline: EDIT on registered model {GALLERY}" in out
        assert f"imgsim-serving: READ on registered model {GALLERY}" in out
        assert "imgsim-serving: READ on experiment imgsim" in out
    for role in ("pipeline", "serving"):
        assert server["creds"][role]["password"] not in first.stdout + first.stderr + second.stdout + second.stderr


def test_the_step_refuses_short_passwords_and_changes_nothing(server, tmp_path):
    env = {"MLFLOW_TRACKING_URI": server["url"], "MLFLOW_TRACKING_USERNAME": "admin",
           "MLFLOW_TRACKING_PASSWORD": server["admin"]["password"], "IMGSIM_PIPELINE_PASSWORD": "short",
           "IMGSIM_SERVING_PASSWORD": "x" * 20}
    out = _cli("tracking-users", env=env, cwd=tmp_path)
    assert out.returncode == 2 and "IMGSIM_PIPELINE_PASSWORD" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_anonymous_requests_get_401(server):
    for method, path in (("post", "/api/2.0/mlflow/experiments/search"),
                         ("get", f"/api/2.0/mlflow/registered-models/alias?name={GALLERY}&alias=serving"),
                         ("get", "/api/2.0/mlflow-artifacts/artifacts")):
        assert getattr(requests, method)(server["url"] + path, json={}, timeout=10).status_code == 401, path
    assert requests.get(server["url"] + "/health", timeout=10).ok  # the probe stays open


def test_the_pipeline_registered_a_vouched_gallery_version(server, pipeline, as_role):
    client = as_role("pipeline")
    version = client.get_model_version_by_alias(GALLERY, "serving")
    digest = version.tags[tracking.BUNDLE_SHA_TAG]
    with tracking.fetched(f"models:/{GALLERY}/{version.version}", "bundle") as folder:
        assert file_sha256(folder / BUNDLE_JSON) == digest
    assert pipeline["result"]["extract"] and version.run_id == pipeline["result"]["extract"]


def test_the_serving_identity_reads_and_may_change_nothing(server, pipeline, as_role, tmp_path):
    client = as_role("serving")
    version = client.get_model_version_by_alias(GALLERY, "serving")
    with tracking.fetched(f"models:/{GALLERY}@serving", "bundle") as folder:
        assert (folder / BUNDLE_JSON).is_file()
    refusals = {
        "move the alias": lambda: client.set_registered_model_alias(GALLERY, "serving", version.version),
        "register a version": lambda: client.create_model_version(GALLERY, version.source, version.run_id),
        "tag a version": lambda: client.set_model_version_tag(GALLERY, version.version, tracking.BUNDLE_SHA_TAG, "0"),
        "write an artifact": lambda: client.log_text(version.run_id, "x", "planted.txt"),
        "start a run": lambda: client.create_run(client.get_experiment_by_name("imgsim").experiment_id),
    }
    for what, attempt in refusals.items():
        with pytest.raises((MlflowException, requests.HTTPError)) as refused:
            attempt()
        assert "403" in str(refused.value) or getattr(refused.value, "error_code", "") == "PERMISSION_DENIED", what
    assert client.get_model_version_by_alias(GALLERY, "serving").version == version.version


def test_missing_or_wrong_credentials_are_one_line_naming_the_variables(server, pipeline, tmp_path):
    for creds in ({}, {"MLFLOW_TRACKING_USERNAME": "imgsim-serving", "MLFLOW_TRACKING_PASSWORD": "expired-one"}):
        out = _cli("export", "--uri", f"models:/{GALLERY}@serving", "--out", str(tmp_path / "b"),
                   env={"MLFLOW_TRACKING_URI": server["url"]} | creds, cwd=tmp_path, timeout=120)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "MLFLOW_TRACKING_USERNAME" in out.stderr and "MLFLOW_TRACKING_PASSWORD" in out.stderr
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
        assert "expired-one" not in out.stderr
    out = _cli("export", "--uri", f"models:/{GALLERY}@serving", "--out", str(tmp_path / "b"),
               env=_as(server, "serving") | {"MLFLOW_TRACKING_URI": server["url"].replace(
                   "http://", "http://imgsim-serving:leaked-password@")}, cwd=tmp_path, timeout=120)
    assert "leaked-password" not in out.stdout + out.stderr


def _seldon(server: dict, pipeline: dict, tmp_path: Path, wait_ready: bool):
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = _as(server, "serving") | {"IMGSIM_MODEL_URI": f"models:/{GALLERY}@serving", "TMPDIR": str(tmp_path / "tmp"),
                                    "IMGSIM_POLL_INTERVAL_S": "0", "GUNICORN_WORKERS": "1"}
    return start_server(env, tmp_path / "server.log", wait_ready=wait_ready)


def test_the_seldon_server_serves_the_gallery_as_the_serving_identity(server, pipeline, tmp_path):
    srv = _seldon(server, pipeline, tmp_path, wait_ready=True)
    try:
        status = requests.get(f"{srv.rest}/health/status", timeout=10).json()["jsonData"]
        assert status["bundle_version"] == "1"
        query = io.BytesIO()
        photo(7).save(query, format="PNG")
        answer = requests.post(f"{srv.rest}/api/v1.0/predictions", files={"binData": ("q.png", query.getvalue())},
                               data={"meta": json.dumps({"tags": {"k": 3}})}, timeout=30)
        assert answer.ok and len(answer.json()["jsonData"]["results"][0]["neighbours"]) == 3
    finally:
        srv.stop()
    assert server["creds"]["serving"]["password"] not in srv.log.read_text(errors="replace")


def test_a_stored_bundle_changed_after_registration_is_refused_by_the_registry_digest(server, pipeline, tmp_path,
                                                                                    as_role):
    client = as_role("pipeline")
    version = client.get_model_version_by_alias(GALLERY, "serving")
    run_id = version.run_id
    (stored,) = (server["store"] / "artifacts").glob(f"*/{run_id}/artifacts/bundle")
    meta_path, items = stored / BUNDLE_JSON, stored / "items.csv"
    saved = {path: path.read_bytes() for path in (meta_path, items)}
    try:
        # An attacker with write access to the bucket: a changed gallery file, and bundle.json's checksums made to
        # match it, so the bundle is consistent in itself.
        lines = items.read_text().splitlines()
        lines[1] = lines[1].replace(lines[1].split(",")[1], "planted", 1)
        items.write_text("\n".join(lines) + "\n")
        meta = json.loads(meta_path.read_text())
        meta["files"]["items.csv"] = file_sha256(items)
        meta_path.write_text(json.dumps(meta, indent=2))
        srv = _seldon(server, pipeline, tmp_path, wait_ready=False)
        try:
            status = requests.get(f"{srv.rest}/health/status", timeout=10)
            assert status.status_code == 503
            assert BUNDLE_JSON in status.text and tracking.BUNDLE_SHA_TAG in status.text, status.text[:500]
            assert "not retried" in status.text  # the same bytes cannot pass later: not a crash loop either
        finally:
            srv.stop()
    finally:
        for path, data in saved.items():
            path.write_bytes(data)
