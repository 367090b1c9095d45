"""An Open Inference Protocol gRPC client for tests and benchmarks, run with the MLServer environment's Python
(.venv-serve-v2: its protobuf 6 stubs cannot load beside seldon-core's protobuf 3 in .venv).

    python support/oip_client.py --grpc 127.0.0.1:PORT --model imgsim [--image FILE ...] [--id N] [--k K]
        [--labels '["bag"]'] [--format json] [--repeat N]

Prints one JSON line: the response's outputs by name (and the answer parsed), or {"code", "details"} when the
call fails; with --repeat, also the per-call latencies in ms.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import grpc
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc import dataplane_pb2_grpc
from mlserver.grpc.converters import ModelInferResponseConverter


def request(args: argparse.Namespace) -> pb.ModelInferRequest:
    params = {}
    if args.k is not None:
        params["k"] = pb.InferParameter(int64_param=args.k)
    if args.labels is not None:
        params["labels"] = pb.InferParameter(string_param=args.labels)
    if args.format is not None:
        params["format"] = pb.InferParameter(string_param=args.format)
    if args.id is not None:
        tensor = pb.ModelInferRequest.InferInputTensor(name="id", datatype="INT64", shape=[1],
                                                       contents=pb.InferTensorContents(int64_contents=[args.id]))
    else:
        images = [open(path, "rb").read() for path in args.image] + [s.encode() for s in args.raw]
        tensor = pb.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES", shape=[len(images)],
                                                       contents=pb.InferTensorContents(bytes_contents=images))
    return pb.ModelInferRequest(model_name=args.model, inputs=[tensor], parameters=params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpc", required=True)
    parser.add_argument("--model", default="imgsim")
    parser.add_argument("--image", action="append", default=[])
    parser.add_argument("--raw", action="append", default=[], help="bytes to send as an image as they are")
    parser.add_argument("--id", type=int)
    parser.add_argument("--k", type=int)
    parser.add_argument("--labels")
    parser.add_argument("--format", help="json: also the v1 server's JSON answer")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    message, times = request(args), []
    with grpc.insecure_channel(args.grpc) as channel:
        stub = dataplane_pb2_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(args.repeat):
            started = time.perf_counter()
            try:
                reply = stub.ModelInfer(message, timeout=30)
            except grpc.RpcError as exc:
                print(json.dumps({"code": exc.code().name, "details": exc.details()}))
                return
            times.append(1000 * (time.perf_counter() - started))
    response = ModelInferResponseConverter.to_types(reply)
    outputs = {o.name: list(o.data) for o in response.outputs}
    answer = outputs.pop("answer", [None])[0]
    outputs = {k: [x.decode() if isinstance(x, bytes) else x for x in v] for k, v in outputs.items()}
    print(json.dumps({"outputs": outputs, "answer": json.loads(answer) if answer else None,
                      "parameters": response.parameters.model_extra if response.parameters else {},
                      **({"ms": times} if args.repeat > 1 else {})}))


if __name__ == "__main__":
    sys.exit(main())
