#!/usr/bin/env bash
# Set up everything on a fresh machine: the Fashion-MNIST package (where apt-get exists), the project's
# virtual environment with pinned packages, and the small side environment for Kubernetes schema checks.
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
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade "pip<26"
  "$VENV/bin/pip" install -q -r requirements.txt -r requirements-dev.txt -c constraints.txt
  "$VENV/bin/pip" install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
# kubernetes-validate needs jsonschema>=4.23 while seldon-core pins <4: a separate small environment.
K8S_VENV=${K8S_VENV:-.venv-k8s}
if [ ! -x "$K8S_VENV/bin/kubernetes-validate" ]; then
  echo "setup: creating $K8S_VENV for Kubernetes schema checks"
  "$PYTHON" -m venv "$K8S_VENV"
  "$K8S_VENV/bin/pip" install -q "pip<26" "kubernetes-validate==1.37.0" "jsonschema>=4.23,<5" "pyyaml>=6"
fi
# The Open Inference Protocol server (MLServer 1.7, protobuf 6) cannot share $VENV with seldon-core 1.18
# (protobuf < 4): its own environment, rebuilt when its requirements change.
V2_VENV=${V2_VENV:-.venv-serve-v2}
v2_want="$(sha256sum requirements-serve-v2.txt | cut -d' ' -f1)"
if [ ! -f "$V2_VENV/.imgsim-installed" ] || [ "$(cat "$V2_VENV/.imgsim-installed")" != "$v2_want" ]; then
  echo "setup: creating $V2_VENV for the Open Inference Protocol server (MLServer)"
  "$PYTHON" -m venv "$V2_VENV"
  "$V2_VENV/bin/pip" install -q "pip<26"
  "$V2_VENV/bin/pip" install -q -r requirements-serve-v2.txt
  echo "$v2_want" > "$V2_VENV/.imgsim-installed"
fi
echo "setup: ready ($VENV, $K8S_VENV, $V2_VENV)"
