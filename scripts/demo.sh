#!/usr/bin/env bash
# The whole pipeline on Fashion-MNIST through MLflow, then a real query through the real Seldon server.
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

imgsim setup-tracking
imgsim prepare --out "$DATA"
# --env-manager local: the default manager runs `pyenv install`, which needs the internet.
mlflow run . -e main --env-manager local --experiment-name "$MLFLOW_EXPERIMENT_NAME" \
  -P data_dir="$DATA" -P epochs="$EPOCHS" -P result_file="$PWD/$OUT/result.json"

bundle_uri=$(python -c "import json; print(json.load(open('$OUT/result.json'))['bundle_uri'])")
imgsim export --uri "$bundle_uri" --out bundles/demo

echo "demo: starting seldon-core-microservice on 127.0.0.1:$REST_PORT (REST) and :$GRPC_PORT (gRPC)"
(cd model_server && IMGSIM_MODEL_URI="$PWD/../bundles/demo" IMGSIM_GALLERY_ROOT="$PWD/../$DATA" \
  PREDICTIVE_UNIT_HTTP_SERVICE_PORT=$REST_PORT PREDICTIVE_UNIT_GRPC_SERVICE_PORT=$GRPC_PORT \
  PREDICTIVE_UNIT_METRICS_SERVICE_PORT=$METRICS_PORT \
  exec setsid seldon-core-microservice ModelServer --service-type MODEL) > "$OUT/server.log" 2>&1 &
server=$!
trap 'kill -- -$server 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$REST_PORT/health/status" >/dev/null && break
  kill -0 $server 2>/dev/null || { echo "demo: the server exited; see $OUT/server.log"; exit 1; }
  sleep 1
done
curl -sf "http://127.0.0.1:$REST_PORT/health/status" >/dev/null || { echo "demo: server not ready; see $OUT/server.log"; exit 1; }

query=$(python -c "
from imgsim.manifest import Manifest; from imgsim import tracking, export
import json; r = json.load(open('$OUT/result.json')); tracking.setup()
m = Manifest.load(tracking.download('runs:/' + r['split'] + '/split', 'manifest'))
print(m.root + '/' + m.split('test')[0].path)")
echo
echo "== top-5 neighbours of a test image, through the real Seldon server =="
imgsim query "$query" --url "http://127.0.0.1:$REST_PORT" --grpc "127.0.0.1:$GRPC_PORT" -k 5 \
  --out "$OUT/query.png" --gallery-root "$DATA"
echo
echo "== runs and metrics =="
python -c "import json; r = json.load(open('$OUT/result.json')); print(json.dumps(r, indent=2))"
echo
echo "MLflow UI: .venv/bin/mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI --port 8080  (then open http://127.0.0.1:8080)"
