#!/usr/bin/env bash
# Optional, by hand: build the serving image with podman from a locally built Debian base (no registry
# needed), run it the way the chart does (uid 8888, read-only root, /tmp as tmpfs, bundle at /mnt/models),
# and query it with a test image of the demo's split over REST and gRPC on loopback. Needs root, apt-get,
# and a bundle from `make demo`.
#
#   bash scripts/podman-smoke.sh            (PODMAN_VOLUMES: extra build volumes, e.g. local wheel folders)
#   bash scripts/podman-smoke.sh serve-v2   (the Open Inference Protocol image, MLServer; needs .venv-serve-v2)
#
# Neither serve image has torch (ONNX Runtime runs the model). The build uses the host's pip configuration
# (index, CA bundle); PODMAN_VOLUMES adds build volumes, such as local wheel folders.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${PODMAN_BUNDLE:-bundles/demo}
WORK=${PODMAN_WORK:-build/podman}
TARGET=${1:-serve}
case "$TARGET" in
  serve) IMAGE=${PODMAN_IMAGE:-localhost/imgsim:smoke}; PORTS=(9000 5000); READY=/health/status ;;
  serve-v2) IMAGE=${PODMAN_IMAGE:-localhost/imgsim-serve-v2:smoke}; PORTS=(8080 8081); READY=/v2/health/ready ;;
  *) echo "podman-smoke: the target is serve or serve-v2, not $TARGET"; exit 2 ;;
esac
BASE=localhost/imgsim-base:bookworm
PODMAN=(podman --runtime /usr/sbin/runc)
ULIMITS=(--ulimit nofile=20000:20000 --ulimit nproc=4096:4096)
[ -f "$BUNDLE/bundle.json" ] || { echo "podman-smoke: no bundle at $BUNDLE; run 'make demo' first (or set PODMAN_BUNDLE)"; exit 1; }

if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
fi

# The Dockerfile's base is python:3.11-slim-bookworm; with no registry, build Debian bookworm with its
# Python 3.11 (and headers, as the official image has them) instead.
if ! "${PODMAN[@]}" image exists "$BASE"; then
  echo "podman-smoke: building $BASE with debootstrap"
  rm -rf "$WORK/rootfs" && mkdir -p "$WORK"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,python-is-python3,ca-certificates \
    bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log"
  tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import - "$BASE" >/dev/null
  rm -rf "$WORK/rootfs"
fi

# The host's pip configuration and the CA bundle pip trusts (a TLS-inspecting proxy's, say), where they exist,
# so the build reaches the package index the host reaches. Local wheel folders that configuration names are
# not mounted (pip skips them with a warning): add them with PODMAN_VOLUMES="-v /srv/wheels:/srv/wheels:ro".
VOLUMES=()
for path in /etc/pip.conf /etc/xdg/pip "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}"; do
  if [ -e "$path" ]; then VOLUMES+=(-v "$path:$path:ro"); fi
done
if [ -d "$HOME/.config/pip" ]; then VOLUMES+=(-v "$HOME/.config/pip:/root/.config/pip:ro"); fi
read -r -a EXTRA <<<"${PODMAN_VOLUMES:-}"
VOLUMES+=("${EXTRA[@]}")
echo "podman-smoke: building $IMAGE (target $TARGET)"
"${PODMAN[@]}" build --format docker --network host "${ULIMITS[@]}" "${VOLUMES[@]}" \
  --build-arg PYTHON_IMAGE="$BASE" \
  --target "$TARGET" -t "$IMAGE" .

REST=${PODMAN_REST_PORT:-19000}
GRPC=${PODMAN_GRPC_PORT:-15000}
name=imgsim-smoke-$$
"${PODMAN[@]}" run -d --rm --name "$name" "${ULIMITS[@]}" --read-only --tmpfs /tmp --cap-drop ALL \
  -p "127.0.0.1:$REST:${PORTS[0]}" -p "127.0.0.1:$GRPC:${PORTS[1]}" -v "$PWD/$BUNDLE:/mnt/models:ro" "$IMAGE" >/dev/null
trap '"${PODMAN[@]}" rm -f "$name" >/dev/null 2>&1 || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$REST$READY" >/dev/null && break
  sleep 1
done
curl -sf "http://127.0.0.1:$REST$READY" -o /dev/null || { "${PODMAN[@]}" logs "$name" | tail -40; exit 1; }
echo
query=$(.venv/bin/imgsim pick-image --result demo-out/result.json --split test)
if [ "$TARGET" = serve ]; then
  .venv/bin/imgsim query "$query" --url "http://127.0.0.1:$REST" --grpc "127.0.0.1:$GRPC" -k 5
else
  .venv/bin/imgsim query "$query" --url "http://127.0.0.1:$REST" --protocol v2 -k 5
  .venv-serve-v2/bin/python support/oip_client.py --grpc "127.0.0.1:$GRPC" --image "$query" --k 5
fi
echo "podman-smoke: $IMAGE answered over REST and gRPC as uid $("${PODMAN[@]}" exec "$name" id -u)"
echo "podman-smoke: image size $("${PODMAN[@]}" image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.0f MB", $1 / 1e6}')"
