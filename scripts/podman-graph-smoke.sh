#!/usr/bin/env bash
# Optional, by hand, after scripts/podman-smoke.sh has built the serve image: cut the demo bundle into shards,
# run a sharded gallery's graph nodes (Embedder, IndexShard x N, ShardMerger) as containers of that image the
# way the chart does (their own commands, uid 8888, read-only root, each node's part at /mnt/models), pass a
# query's messages between them in the graph's order (Seldon's executor does that in a cluster), and compare
# the answer with brute force over the whole gallery's embeddings.
#
#   bash scripts/podman-graph-smoke.sh      (PODMAN_SHARDS: shard count, default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${PODMAN_BUNDLE:-bundles/demo}
SHARDS=${PODMAN_SHARDS:-2}
OUT=${PODMAN_WORK:-build/podman}/sharded
IMAGE=${PODMAN_IMAGE:-localhost/imgsim:smoke}
PODMAN=(podman --runtime /usr/sbin/runc)
ULIMITS=(--ulimit nofile=20000:20000 --ulimit nproc=4096:4096)
"${PODMAN[@]}" image exists "$IMAGE" || { echo "podman-graph-smoke: no $IMAGE; run scripts/podman-smoke.sh first"; exit 1; }
.venv/bin/imgsim shard-bundle "$BUNDLE" --shards "$SHARDS" --out "$OUT"

names=()
trap 'for n in "${names[@]}"; do "${PODMAN[@]}" rm -f "$n" >/dev/null 2>&1 || true; done' EXIT
start() {  # name port part class type [env...]
  local name=imgsim-graph-$1-$$ port=$2 part=$3 class=$4 type=$5
  shift 5
  local env=(-e "IMGSIM_SHARDS=$SHARDS" -e IMGSIM_POLL_INTERVAL_S=0)
  for e in "$@"; do env+=(-e "$e"); done
  "${PODMAN[@]}" run -d --rm --name "$name" "${ULIMITS[@]}" --read-only --tmpfs /tmp --cap-drop ALL "${env[@]}" \
    -p "127.0.0.1:$port:9000" ${part:+-v "$PWD/$OUT/$part:/mnt/models:ro"} "$IMAGE" \
    seldon-core-microservice "$class" --service-type "$type" >/dev/null
  names+=("$name")
}
start embedder 19100 embedder Embedder TRANSFORMER
start merger 19101 "" ShardMerger COMBINER
for i in $(seq 0 $((SHARDS - 1))); do
  start "shard-$i" $((19110 + i)) "shard-$i" IndexShard MODEL "IMGSIM_SHARD=$i"
done
for port in 19100 19101 $(seq 19110 $((19110 + SHARDS - 1))); do
  for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/health/status" >/dev/null && break; sleep 1; done
  curl -sf "http://127.0.0.1:$port/health/status" >/dev/null || { "${PODMAN[@]}" logs "${names[-1]}" | tail -30; exit 1; }
done
query=$(.venv/bin/imgsim pick-image --result demo-out/result.json --split test)
.venv/bin/python -m support.graph_smoke "$query" "$BUNDLE" http://127.0.0.1:19100 http://127.0.0.1:19101 \
  $(for i in $(seq 0 $((SHARDS - 1))); do echo "http://127.0.0.1:$((19110 + i))"; done)
echo "podman-graph-smoke: the graph's $((SHARDS + 2)) nodes answered from $IMAGE as uid $("${PODMAN[@]}" exec "${names[0]}" id -u)"
