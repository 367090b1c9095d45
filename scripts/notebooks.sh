#!/usr/bin/env bash
# The notebooks on the demo's gallery: run all three (papermill) into demo-out/notebooks, then open them in
# JupyterLab on 127.0.0.1. JupyterLab lives in its own .venv-notebooks (it needs jsonschema >= 4, which
# seldon-core 1.18 forbids in .venv) and runs the notebooks on .venv's kernel, registered as "python3".
# NOTEBOOKS_OPEN=0: run them only. Run `make demo` first (or set NOTEBOOK_BUNDLE to any bundle URI).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BUNDLE=${NOTEBOOK_BUNDLE:-models:/imgsim-gallery@serving}
OUT=demo-out/notebooks
mkdir -p "$OUT"
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}
for name in ann_vs_exact embedding_explorer top_k_viewer; do
  start=$(date +%s)
  .venv/bin/papermill -k python3 --no-progress-bar -p bundle "$BUNDLE" -p out_dir "$OUT" \
    "notebooks/$name.ipynb" "$OUT/$name.ipynb"
  echo "notebooks: $name ran in $(( $(date +%s) - start )) s -> $OUT/$name.ipynb"
done
[ "${NOTEBOOKS_OPEN:-1}" = 0 ] && exit 0
if [ ! -x .venv-notebooks/bin/jupyter ]; then
  python3.11 -m venv .venv-notebooks
  .venv-notebooks/bin/pip install -q "jupyterlab==4.5.*"
fi
# (ipykernel warns that this prefix is not on .venv's own kernel path: it is on JupyterLab's, which is what counts)
.venv/bin/python -m ipykernel install --prefix "$PWD/.venv-notebooks" --name python3 --display-name "Python 3 (imgsim)" \
  >/dev/null 2>&1
as_root=(); [ "$(id -u)" = 0 ] && as_root=(--allow-root)  # containers and CI machines often run as root
exec .venv-notebooks/bin/jupyter lab --no-browser --ip 127.0.0.1 "${as_root[@]}" --notebook-dir "$PWD" "$OUT"
