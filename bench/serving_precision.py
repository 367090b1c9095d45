"""Bench 24: a colour-default bundle served in float32 and in int8 (extract ``precision=int8``), side by side in one
run on both servers: single-image query latency at concurrency 1 and throughput at 16.

python -m bench.serving_precision --fp32 FOLDER --int8 FOLDER   -> bench/results/serving_precision.json

The two bundles come from one trained model (the same gallery, extracted at each precision). Each server runs for
real on loopback with bench/serving.py's worker settings (one ONNX Runtime thread per worker): Seldon's v1 wrapper
on ONNX Runtime (REST), and MLServer (REST, and gRPC from its own environment). The load generator shares the
machine's cores, so read the int8/fp32 ratios.
"""

from __future__ import annotations

import argparse
import base64
import tempfile
from pathlib import Path

from bench.common import RESULTS, save, table
from bench.load import load
from bench.serving import SETTINGS, V2_SETTINGS, query_image, rest_client, v2_grpc_load, v2_rest_client
from support.servers import REPO, start_mlserver, start_server

REQUESTS = {1: 300, 16: 1200}


def measure(precision: str, bundle: Path, image: bytes, query: Path) -> list[dict]:
    rows = []
    server = start_server(SETTINGS | {"IMGSIM_MODEL_URI": str(bundle), "IMGSIM_RUNTIME": "onnx"},
                          RESULTS / f"server-{precision}.log")
    try:
        body = {"binData": base64.b64encode(image).decode()}
        for concurrency, total in REQUESTS.items():
            rows.append({"precision": precision, "server": "v1 onnx", "protocol": "REST", "concurrency": concurrency,
                         **load(lambda: rest_client(server.rest, body), concurrency, total)})
            print(rows[-1], flush=True)
    finally:
        server.stop()
    server = start_mlserver(V2_SETTINGS | {"IMGSIM_MODEL_URI": str(bundle)}, RESULTS / f"mlserver-{precision}.log",
                            folder=REPO / "model_server" / "v2")
    try:
        for concurrency, total in REQUESTS.items():
            rows.append({"precision": precision, "server": "v2", "protocol": "REST", "concurrency": concurrency,
                         **load(lambda: v2_rest_client(server.rest, "imgsim", image), concurrency, total)})
            print(rows[-1], flush=True)
            rows.append({"precision": precision, "server": "v2", "protocol": "gRPC", "concurrency": concurrency,
                         **v2_grpc_load(server, "imgsim", query, concurrency, total)})
            print(rows[-1], flush=True)
    finally:
        server.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", type=Path, required=True, help="a colour bundle extracted at precision=fp32")
    parser.add_argument("--int8", type=Path, required=True, help="the same model's bundle at precision=int8")
    args = parser.parse_args()
    image = query_image(args.fp32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        query = Path(tmp) / "query.png"
        query.write_bytes(image)  # for MLServer's gRPC load, which runs in its own process
        for precision, bundle in (("fp32", args.fp32), ("int8", args.int8)):
            rows += measure(precision, bundle, image, query)
    fp32 = {(r["server"], r["protocol"], r["concurrency"]): r for r in rows if r["precision"] == "fp32"}
    for r in rows:
        base = fp32[(r["server"], r["protocol"], r["concurrency"])]
        r["p50_of_fp32"], r["rps_of_fp32"] = r["p50_ms"] / base["p50_ms"], r["rps"] / base["rps"]
    print(table(rows, ["precision", "server", "protocol", "concurrency", "errors", "rps", "p50_ms", "p99_ms",
                       "p50_of_fp32", "rps_of_fp32"]))
    print(f"wrote {save('serving_precision', {'settings': SETTINGS, 'v2_settings': V2_SETTINGS, 'rows': rows})}")


if __name__ == "__main__":
    main()
