#!/usr/bin/env bash
# The whole pipeline on Fashion-MNIST through MLflow, then a real query through the real Seldon server.
# Every step is an imgsim or mlflow command (tested like any other); this file only sequences them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate

EPOCHS=${DEMO_EPOCHS:-4}
DATA=${DEMO_DATA:-data/fashion-mnist}
REST_PORT=${DEMO_REST_PORT:-9000}
GRPC_PORT=${DEMO_GRPC_PORT:-5000}
METRICS_PORT=${DEMO_METRICS_PORT:-6000}
OUT=demo-out
mkdir -p "$OUT"
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}
export MLFLOW_EXPERIMENT_NAME=${MLFLOW_EXPERIMENT_NAME:-imgsim}
# Quiet by default (imgsim commands are too); IMGSIM_LOG_LEVEL=DEBUG make demo shows every log line.
export MLFLOW_LOGGING_LEVEL=${MLFLOW_LOGGING_LEVEL:-${IMGSIM_LOG_LEVEL:-WARNING}}

imgsim setup-tracking
imgsim prepare --out "$DATA"
# --env-manager local: the default manager runs `pyenv install`, which needs the internet.
mlflow run . -e main --env-manager local --experiment-name "$MLFLOW_EXPERIMENT_NAME" \
  -P data_dir="$DATA" -P epochs="$EPOCHS" -P result_file="$PWD/$OUT/result.json"
imgsim export --result "$OUT/result.json" --out bundles/demo

echo "demo: starting seldon-core-microservice on 127.0.0.1:$REST_PORT (REST) and :$GRPC_PORT (gRPC), log in $OUT/server.log"
# The Seldon wrapper runs from its own environment (seldon-core 1.19, Python 3.12), imgsim from this checkout.
SELDON="$(cd "${SERVE_VENV:-.venv-serve}" && pwd)/bin/seldon-core-microservice"
(cd model_server && IMGSIM_MODEL_URI="$PWD/../bundles/demo" IMGSIM_GALLERY_ROOT="$PWD/../$DATA" \
  PREDICTIVE_UNIT_HTTP_SERVICE_PORT=$REST_PORT PREDICTIVE_UNIT_GRPC_SERVICE_PORT=$GRPC_PORT \
  PREDICTIVE_UNIT_METRICS_SERVICE_PORT=$METRICS_PORT PYTHONPATH="$PWD/.." \
  exec setsid "$SELDON" ModelServer --service-type MODEL) \
  > "$OUT/server.log" 2>&1 &
server=$!
trap 'kill -- -$server 2>/dev/null || true' EXIT
imgsim wait-ready --url "http://127.0.0.1:$REST_PORT" --pid $server --log "$OUT/server.log" --timeout-s 120

echo
echo "== top-5 neighbours of a test image, through the real Seldon server =="
query=$(imgsim pick-image --result "$OUT/result.json" --split test)
imgsim query "$query" \
  --url "http://127.0.0.1:$REST_PORT" --grpc "127.0.0.1:$GRPC_PORT" -k 5 --out "$OUT/query.png" --gallery-root "$DATA"
echo
echo "== runs and metrics =="
imgsim report "$OUT/result.json"
