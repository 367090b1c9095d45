#!/usr/bin/env bash
# Set up everything on a fresh machine: the Fashion-MNIST package (where apt-get exists), the pipeline's virtual
# environment with pinned packages, each serving environment with its own pins (the Seldon wrapper on Python 3.12,
# MLServer), and the small side environment for Kubernetes schema checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "setup: installing Debian's dataset-fashion-mnist"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || echo "setup: apt-get could not install dataset-fashion-mnist; 'imgsim prepare' will try torchvision's download"
fi

# The search page's browser tests drive Debian's chromium through chromium-driver (no browser download).
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "setup: installing Debian's chromium and chromium-driver for the browser tests"
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; } \
    || echo "setup: apt-get could not install chromium; the browser tests will say so"
fi

stamp="$VENV/.imgsim-installed"
want="$(cat requirements.txt requirements-dev.txt constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # torch's CUDA build makes the environment ~7 GB: say so up front rather than fail deep inside pip.
  need_gb=7; mkdir -p "$(dirname "$VENV")"
  read -r free_kb mount < <(df -Pk "$(dirname "$VENV")" | awk 'NR==2 {print $4, $6}')
  if [ ! -d "$VENV" ] && [ $((free_kb / 1024 / 1024)) -lt "$need_gb" ]; then
    echo "setup: $VENV needs about $need_gb GB of disk, only $((free_kb / 1024 / 1024)) GB are free on $mount;" \
         "free some space (old clones, /tmp) or set VENV to a folder on a bigger disk" >&2
    exit 1
  fi
  echo "setup: creating $VENV and installing pinned packages (torch is large: a minute or two)"
  rm -rf "$VENV"  # afresh: an upgrade in place would keep packages the pins dropped (seldon-core, before 1.19)
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade "pip<26"
  "$VENV/bin/pip" install -q -r requirements.txt -r requirements-dev.txt -c constraints.txt
  "$VENV/bin/pip" install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
# kubernetes-validate needs jsonschema>=4.23: a separate small environment.
K8S_VENV=${K8S_VENV:-.venv-k8s}
if [ ! -x "$K8S_VENV/bin/kubernetes-validate" ]; then
  echo "setup: creating $K8S_VENV for Kubernetes schema checks"
  "$PYTHON" -m venv "$K8S_VENV"
  "$K8S_VENV/bin/pip" install -q "pip<26" "kubernetes-validate==1.37.0" "jsonschema>=4.23,<5" "pyyaml>=6"
fi

# serve_env VENV FIND_PYTHON REQUIREMENTS CONSTRAINTS WHAT: a torch-free serving environment with its own pins,
# rebuilt when its requirements or constraints change (imgsim itself comes from PYTHONPATH: the servers run the
# checkout). FIND_PYTHON prints the interpreter to build it with, asked only when it is built.
serve_env() {
  local venv=$1 want python
  want="$(cat "$3" "$4" | sha256sum | cut -d' ' -f1)"
  if [ ! -f "$venv/.imgsim-installed" ] || [ "$(cat "$venv/.imgsim-installed")" != "$want" ]; then
    python=$($2)
    echo "setup: creating $venv for $5"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install -q "pip<26"
    "$venv/bin/pip" install -q -r "$3" -c "$4"
    echo "$want" > "$venv/.imgsim-installed"
  fi
}

# The Seldon v1 wrapper on its maintained release: seldon-core 1.19 needs Python >= 3.12 (and protobuf 5,
# cryptography >= 46), which torch's environment here cannot be. SERVE_PYTHON names the interpreter; else python3.12
# on PATH, else pyenv's.
serve_python() {
  local candidate
  for candidate in ${SERVE_PYTHON:-} python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$candidate"; return
    fi
  done
  echo "setup: the Seldon server's environment needs Python 3.12 (seldon-core 1.19); install it (pyenv install" \
       "3.12, or your distribution's python3.12) or set SERVE_PYTHON to its interpreter" >&2
  return 1
}
main_python() { echo "$PYTHON"; }

SERVE_VENV=${SERVE_VENV:-.venv-serve}
serve_env "$SERVE_VENV" serve_python requirements-serve.txt constraints-serve.txt \
  "the Seldon v1 wrapper (seldon-core 1.19, Python 3.12)"
# The Open Inference Protocol server (MLServer 1.7) in its own environment.
V2_VENV=${V2_VENV:-.venv-serve-v2}
serve_env "$V2_VENV" main_python requirements-serve-v2.txt constraints-serve-v2.txt \
  "the Open Inference Protocol server (MLServer)"
# NVIDIA's tritonclient, the third-party V2 client the tests drive that server with, in an environment of its own.
V2_CLIENT_VENV=${V2_CLIENT_VENV:-.venv-v2-client}
serve_env "$V2_CLIENT_VENV" main_python requirements-v2-client.txt constraints-v2-client.txt \
  "tritonclient, the third-party V2 client of the tests"
echo "setup: ready ($VENV, $K8S_VENV, $SERVE_VENV, $V2_VENV, $V2_CLIENT_VENV)"
