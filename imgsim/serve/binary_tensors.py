"""The Open Inference Protocol's binary tensor extension over REST, translated to and from its JSON form.

A request with an ``Inference-Header-Content-Length: N`` header is N bytes of JSON, then the raw data of each input
whose parameters hold ``binary_data_size``, in order: little-endian numbers, or for BYTES each element as a 4-byte
little-endian length and its bytes (what NVIDIA's tritonclient sends by default). MLServer 1.7 reads JSON only, so
the request is rewritten as JSON: numbers as lists, BYTES elements base64 with the tensor's ``content_type``
"base64". A response is turned binary for the outputs the request asked so of (``binary_data`` on a requested
output, or the request parameter ``binary_data_output``).
"""

from __future__ import annotations

import base64
import json
import math
import struct
from typing import Any

import numpy as np

from imgsim.errors import BadInput

HEADER = "inference-header-content-length"
NUMERIC = {"BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1",
           "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
# Far above any query here, and the bound on the Python lists a small binary body expands into (40x its size).
MAX_ELEMENTS, MAX_DIMS = 4096, 8


def wants_binary(request: dict) -> tuple[bool, dict[str, bool]]:
    """(binary for every output by default, binary per requested output name) as a request asks."""
    params = request.get("parameters")
    default = isinstance(params, dict) and params.get("binary_data_output") is True
    per_output = {}
    outputs = request.get("outputs")
    for output in outputs if isinstance(outputs, list) else []:
        if isinstance(output, dict) and isinstance(output.get("name"), str):
            flag = (output.get("parameters") or {}).get("binary_data") if isinstance(output.get("parameters"),
                                                                                       dict) else None
            per_output[output["name"]] = default if flag is None else flag is True
    return default, per_output


def parse_json(data: bytes | memoryview, what: str) -> Any:
    try:
        return json.loads(bytes(data))
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the interpreter's stack
        raise BadInput(f"{what} is not valid JSON") from None


def decode_request(body: bytes, size: int) -> dict:
    """The JSON request a binary one (its JSON part ``size`` bytes long) stands for. Raises ``BadInput`` for a body
    that does not add up."""
    if not 0 < size <= len(body):
        raise BadInput(f"{HEADER} must be the length of the request's JSON part (1 to {len(body)})")
    request = parse_json(memoryview(body)[:size], "the request's JSON part")
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise BadInput("the request's JSON part must be an object with a list of 'inputs'")
    offset, total = size, 0
    for i, tensor in enumerate(request["inputs"]):
        params = tensor.get("parameters") if isinstance(tensor, dict) else None
        if not isinstance(params, dict) or "binary_data_size" not in params:
            continue
        length = params.pop("binary_data_size")
        if not isinstance(length, int) or isinstance(length, bool) or not 0 <= length <= len(body) - offset:
            raise BadInput(f"inputs[{i}]: binary_data_size must be the length of its data in the body")
        raw = memoryview(body)[offset:offset + length]
        offset += length
        count = _elements(tensor.get("shape"), i)
        total += count
        if total > MAX_ELEMENTS:
            raise BadInput(f"the inputs hold more than {MAX_ELEMENTS} elements")
        datatype = tensor.get("datatype")
        if datatype == "BYTES":
            elements = _bytes_elements(raw, count, i)
            if params.get("content_type") == "base64":  # each element is already base64 text
                tensor["data"] = [_ascii(e, i) for e in elements]
            else:
                tensor["data"] = [base64.b64encode(e).decode("ascii") for e in elements]
                params["content_type"] = "base64"
        elif isinstance(datatype, str) and datatype in NUMERIC:
            dtype = np.dtype(NUMERIC[datatype])
            if length != count * dtype.itemsize:
                raise BadInput(f"inputs[{i}]: {length} bytes of data for {count} {datatype} elements")
            values = np.frombuffer(raw, dtype=dtype).tolist()
            if dtype.kind == "f" and not all(math.isfinite(v) for v in values):
                raise BadInput(f"inputs[{i}] holds a non-finite number")
            tensor["data"] = values
        else:
            raise BadInput(f"inputs[{i}]: datatype must be BYTES or one of {', '.join(NUMERIC)} for binary data")
    if offset != len(body):
        raise BadInput(f"the body has {len(body) - offset} bytes after the inputs' binary data")
    return request


def encode_response(response: dict, default: bool, per_output: dict[str, bool]) -> tuple[bytes, int] | None:
    """(body, JSON part's length) with the outputs asked for in binary, or None when none is."""
    binary = []
    for output in response.get("outputs") or []:
        if not per_output.get(output.get("name"), default) or output.get("data") is None:
            continue
        data, datatype = output.pop("data"), output.get("datatype")
        if datatype == "BYTES":
            raw = b"".join(struct.pack("<I", len(e)) + e for e in (_utf8(x) for x in _flat(data)))
        else:
            raw = np.asarray(_flat(data), dtype=NUMERIC[datatype]).tobytes()
        output["parameters"] = {**(output.get("parameters") or {}), "binary_data_size": len(raw)}
        binary.append(raw)
    if not binary:
        return None
    header = json.dumps(response).encode()
    return header + b"".join(binary), len(header)


def _elements(shape: Any, i: int) -> int:
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadInput(f"inputs[{i}]: shape must be a list of at most {MAX_DIMS} non-negative integers")
    if 0 in shape:
        return 0
    count = 1
    for dim in shape:  # (with an early stop: the product of huge dimensions is itself expensive)
        count *= dim
        if count > MAX_ELEMENTS:
            raise BadInput(f"inputs[{i}]: shape holds more than {MAX_ELEMENTS} elements")
    return count


def _bytes_elements(raw: memoryview, count: int, i: int) -> list[bytes]:
    elements, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise BadInput(f"inputs[{i}]: a BYTES element's 4-byte length is cut short")
        (size,) = struct.unpack_from("<I", raw, at)
        if size > len(raw) - at - 4:
            raise BadInput(f"inputs[{i}]: a BYTES element is longer than the data left")
        elements.append(bytes(raw[at + 4:at + 4 + size]))
        at += 4 + size
        if len(elements) > count:
            break
    if len(elements) != count:
        raise BadInput(f"inputs[{i}]: the shape holds {count} elements, the data {len(elements)}"
                       f"{' or more' if len(elements) > count else ''}")
    return elements


def _ascii(element: bytes, i: int) -> str:
    try:
        return element.decode("ascii")
    except UnicodeDecodeError:
        raise BadInput(f"inputs[{i}]: content_type base64, but an element is not base64 text") from None


def _utf8(element: Any) -> bytes:
    return element if isinstance(element, bytes) else str(element).encode()


def _flat(data: Any) -> list:
    return [x for row in data for x in _flat(row)] if isinstance(data, list) and data and \
        isinstance(data[0], list) else list(data)
