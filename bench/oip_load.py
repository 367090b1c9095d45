"""Closed-loop Open Inference Protocol gRPC load (bench/load.py) on an MLServer model, run with MLServer's
environment's Python (.venv-serve-v2: its protobuf 6 stubs cannot load beside seldon-core's protobuf 3).

    .venv-serve-v2/bin/python -m bench.oip_load --grpc 127.0.0.1:PORT --model imgsim --image q.png \
        --concurrency 4 --total 800

Prints one JSON line: requests, errors, rps, p50_ms, p99_ms.
"""

from __future__ import annotations

import argparse
import json

import grpc
from mlserver.grpc import dataplane_pb2_grpc

from bench.load import load
from support.oip_client import request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpc", required=True)
    parser.add_argument("--model", default="imgsim")
    parser.add_argument("--image", action="append", default=[])
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--total", type=int, default=400)
    args = parser.parse_args()
    message = request(argparse.Namespace(model=args.model, image=args.image, raw=[], id=None, k=None, labels=None,
                                         format=None))

    def client():
        stub = dataplane_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(args.grpc))

        def call() -> bool:
            try:
                stub.ModelInfer(message, timeout=30)
                return True
            except grpc.RpcError:
                return False
        return call

    print(json.dumps(load(client, args.concurrency, args.total)))


if __name__ == "__main__":
    main()
