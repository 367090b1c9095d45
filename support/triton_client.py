"""NVIDIA's tritonclient, the common third-party Open Inference Protocol client, driving a server as its users do;
run with .venv-v2-client's Python (requirements-v2-client.txt).

    python support/triton_client.py --mode binary|json|grpc --url HOST:PORT --model imgsim
        [--image FILE ...] [--id N] [--k K] [--outputs ids,scores] [--metadata]

REST ``binary`` is tritonclient's default (the binary tensor extension both ways); ``json`` sends base64 text and
asks for JSON outputs. Prints one JSON line: the outputs by name as lists, or {"error": message} when the call
fails; with --metadata, the model's metadata.
"""

from __future__ import annotations

import argparse
import base64
import json

import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

OUTPUTS = ("ids", "scores", "labels", "predicted")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("binary", "json", "grpc"), required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", default="imgsim")
    parser.add_argument("--image", nargs="*", default=[])
    parser.add_argument("--id", type=int)
    parser.add_argument("--k", type=int)
    parser.add_argument("--outputs", default="")
    parser.add_argument("--metadata", action="store_true")
    args = parser.parse_args()
    lib = triton_grpc if args.mode == "grpc" else triton_http
    client = lib.InferenceServerClient(args.url)
    try:
        if args.metadata:
            meta = client.get_model_metadata(args.model, **({"as_json": True} if args.mode == "grpc" else {}))
            print(json.dumps(meta))
            return
        binary = args.mode != "json"
        if args.id is not None:
            tensor = lib.InferInput("id", [1], "INT64")
            data = np.array([args.id], dtype=np.int64)
        else:
            images = [open(path, "rb").read() for path in args.image]
            tensor = lib.InferInput("images", [len(images)], "BYTES")
            # REST JSON cannot carry raw bytes: tritonclient refuses them there, so a JSON client sends base64 text.
            data = np.array(images if binary else [base64.b64encode(i) for i in images], dtype=object)
        if args.mode == "grpc":
            tensor.set_data_from_numpy(data)
        else:
            tensor.set_data_from_numpy(data, binary_data=binary)
        names = [n for n in args.outputs.split(",") if n]
        if args.mode == "grpc":
            outputs = [lib.InferRequestedOutput(n) for n in names] or None
        else:
            outputs = [lib.InferRequestedOutput(n, binary_data=binary) for n in names] or None
        params = {"k": args.k} if args.k is not None else {}
        result = client.infer(args.model, [tensor], outputs=outputs, parameters=params)
        answer = {}
        for name in names or OUTPUTS:
            array = result.as_numpy(name)
            answer[name] = None if array is None else [_plain(x) for x in array.reshape(-1).tolist()]
        print(json.dumps(answer))
    except InferenceServerException as exc:
        print(json.dumps({"error": exc.message(), "status": exc.status()}))


def _plain(value):
    return value.decode() if isinstance(value, bytes) else value


if __name__ == "__main__":
    main()
