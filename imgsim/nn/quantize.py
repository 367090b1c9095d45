"""An int8 serving model: ONNX Runtime's static quantization of the float32 export, calibrated on gallery images.

The backbone's convolutions run in int8 (QDQ, per-channel weights); the embedding head stays float32, as the
head was trained on float32 features (docs/benchmarks.md, section 22, has the measurements behind each choice).
Weights keep 8 bits (ONNX Runtime's reduce_range, 7 bits, cost 0.05 of P@1 on Oxygen): on a CPU without VNNI its
u8 x s8 kernels may saturate and embed differently, which the bundle's probe check then refuses; the record names
the CPU that calibrated it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from imgsim import atomic
from imgsim.errors import ImgsimError
from imgsim.modelspec import INT8, cpu_int8
from imgsim.nn.model import TrainedModel
from imgsim.nn.onnx_export import export_onnx
from imgsim.serve.runtime import INPUT, OnnxModel

# Images the activation ranges are taken from (fewer cost P@1: docs/benchmarks.md, "Where the defaults come from").
CALIBRATION_IMAGES = 256
# Nodes under this prefix are the backbone (EmbeddingNet.trunk in the exported graph); the rest is the head.
TRUNK_PREFIX = "/trunk/"


class _Images:
    """ONNX Runtime's calibration reader: one image at a time, as the server runs them."""

    def __init__(self, images: NDArray[np.uint8]) -> None:
        self._rows = iter(images)

    def get_next(self) -> dict | None:
        row = next(self._rows, None)
        return None if row is None else {INPUT: np.ascontiguousarray(row[None])}


def quantize_int8(fp32: str | Path, out: str | Path, calibration: NDArray[np.uint8]) -> None:
    """Write ``out`` (atomically): ``fp32``'s backbone in int8, activation ranges from ``calibration`` images."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Its calibration and shape-inference passes log every tensor at INFO/WARNING: progress is ours to show.
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="imgsim-int8-") as tmp, atomic.atomic_path(out) as target:
            prepared = os.path.join(tmp, "prepared.onnx")
            quant_pre_process(str(fp32), prepared)  # folds constants and infers shapes, as quantization expects
            head = [n.name for n in onnx.load(prepared).graph.node if not n.name.startswith(TRUNK_PREFIX)]
            quantize_static(prepared, str(target), _Images(calibration), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=head)
            nodes = onnx.load(str(target)).graph.node
            convs = [n for n in nodes if n.op_type == "Conv"]
            quantized = {n.output[0] for n in nodes if n.op_type == "DequantizeLinear"}
            if not any(n.input[1] in quantized for n in convs):  # no backbone node matched: nothing is int8
                raise ImgsimError(f"quantization left every convolution in float32 (no node under {TRUNK_PREFIX!r}); "
                                  "this is a bug in imgsim, please report it")
    finally:
        logging.getLogger().setLevel(quiet)


@dataclasses.dataclass(frozen=True)
class Int8Model:
    """The int8 serving model: its file's bytes, how many images calibrated it, and a session running it."""

    onnx: bytes
    calibration_images: int
    export_parity: float  # the float32 export against torch, before quantization
    engine: OnnxModel = dataclasses.field(repr=False)

    def record(self) -> dict:
        """How it was made, for bundle.json: a server on a CPU that computes it differently names what differs."""
        return {"precision": INT8, "calibration_images": self.calibration_images,
                "method": "ONNX Runtime static QDQ: backbone int8 (per-channel weights, MinMax activation ranges), "
                          "head float32", "onnxruntime": ort.__version__, "cpu_int8": cpu_int8()}

    def outputs(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        """Embeddings and logits side by side (N, D + classes): one array, as the feature store's rows are."""
        return np.concatenate(self.engine(images), axis=1)


def int8_model(model: TrainedModel, calibration: NDArray[np.uint8], threads: int) -> Int8Model:
    """Export ``model`` (checked against torch), quantize it on ``calibration`` images and open it."""
    with tempfile.TemporaryDirectory(prefix="imgsim-int8-") as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        parity = export_onnx(model, fp32, calibration[:32])
        quantize_int8(fp32, int8, calibration)
        data = int8.read_bytes()
    return Int8Model(data, len(calibration), parity, OnnxModel(data, model.preprocess, threads))


def calibration_rows(n: int, seed: int) -> NDArray[np.int64]:
    """The gallery rows calibration reads: a seeded sample, in file order."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:CALIBRATION_IMAGES])
