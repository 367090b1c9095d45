"""Each environment pins a maintained release in its own constraints file, as scripts/setup.sh builds it: the
pipeline's (which also runs `mlflow server`), the Seldon wrapper's (seldon-core 1.19 on Python 3.12) and MLServer's.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path

import pytest

from support.servers import REPO, SERVE_VENV, V2_VENV, in_serve_env, venv_bin

# The oldest MLflow without the tracking server's published advisories (CVE-2026-2614 file read, fixed in 3.10.0;
# CVE-2026-2651 artifact overwrite, 3.10/3.11; CVE-2026-33866 unchecked artifact download, after 3.10.1;
# CVE-2026-4137 world-writable download folders, 3.11.0).
MLFLOW_FLOOR = (3, 11)
# environment -> (its requirements, its constraints, the MLflow distribution it carries)
ENVIRONMENTS = {"pipeline": ("requirements.txt", "constraints.txt", "mlflow"),
                "seldon": ("requirements-serve.txt", "constraints-serve.txt", "mlflow-skinny"),
                "mlserver": ("requirements-serve-v2.txt", "constraints-serve-v2.txt", "mlflow-skinny")}


def pins(constraints: str) -> dict[str, str]:
    found = {}
    for line in (REPO / constraints).read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if match:
            found[match[1].lower().replace("_", "-")] = match[2]
    return found


def release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def test_the_environment_that_runs_mlflow_server_is_past_the_advisories():
    pinned = pins("constraints.txt")
    assert release(pinned["mlflow"]) >= MLFLOW_FLOOR, f"constraints.txt pins mlflow {pinned['mlflow']}"
    installed = importlib.metadata.version("mlflow")
    assert release(installed) >= MLFLOW_FLOOR, f"this environment runs mlflow {installed}"
    assert "mlflow[auth]" in (REPO / "requirements.txt").read_text()  # the server's basic-auth app


def test_the_floor_check_would_fail_on_the_old_pin():
    assert release("3.2.0") < MLFLOW_FLOOR and release("3.10.1") < MLFLOW_FLOOR and release("3.11.0") >= MLFLOW_FLOOR


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_each_environment_pins_its_whole_set_in_its_own_file(env):
    requirements, constraints, mlflow_dist = ENVIRONMENTS[env]
    pinned = pins(constraints)
    direct = {re.split(r"[=<>\[ ;]", line.strip())[0].lower() for line in (REPO / requirements).read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert direct - {"imgsim"} <= set(pinned), f"{constraints} misses {sorted(direct - set(pinned))}"
    # Every serving environment downloads bundles with the same current MLflow client (CVE-2026-4137's fix).
    assert release(pinned[mlflow_dist]) >= MLFLOW_FLOOR
    assert pinned[mlflow_dist] == pins("constraints.txt")["mlflow"]
    assert constraints in (REPO / "scripts" / "setup.sh").read_text() and constraints in (REPO / "Dockerfile").read_text()
    if env != "pipeline":
        assert not {"torch", "torchvision", "mlflow"} & set(pinned)  # torch-free, no MLflow server stack


def test_the_seldon_wrapper_runs_its_maintained_release_on_python_3_12():
    assert pins("constraints-serve.txt")["seldon-core"] == "1.19.0"
    assert importlib.util.find_spec("seldon_core") is None  # the pipeline environment no longer carries it
    assert "seldon-core" not in pins("constraints.txt")
    got = in_serve_env("import json, sys, importlib.metadata as m; print(json.dumps([list(sys.version_info[:2]), "
                       "m.version('seldon-core'), m.version('mlflow-skinny'), m.version('cryptography')]))")
    python, seldon, mlflow_skinny, cryptography = got
    assert python == [3, 12] and seldon == "1.19.0" and release(mlflow_skinny) >= MLFLOW_FLOOR
    assert release(cryptography) >= (46,)
    assert venv_bin(SERVE_VENV, "seldon-core-microservice").exists()


def test_the_mlserver_environment_has_the_same_mlflow_client():
    python = venv_bin(V2_VENV, "python")
    site = next(Path(python).parent.parent.glob("lib/python3*/site-packages"))
    (dist,) = site.glob("mlflow_skinny-*.dist-info")
    assert release(dist.name.split("-")[1]) >= MLFLOW_FLOOR
