"""Run an exported model with ONNX Runtime, without torch: uint8 images in, embeddings and logits out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from imgsim.errors import ImgsimError
from imgsim.images import Preprocess

INPUT, OUTPUTS = "images", ("embedding", "logits")
# Images per ONNX Runtime pass. Its CPU arena keeps the largest pass's activations for the process's life: a
# request of max_batch images, or the bundle's 32 probes in one pass, would otherwise fix every server process's
# memory at that peak (docs/benchmarks.md, section 21); smaller passes cost no throughput on a CPU.
RUN_CHUNK = 1


class OnnxModel:
    """An ONNX Runtime session on the CPU with a fixed number of threads (one per server worker by default)."""

    def __init__(self, path: str | Path | bytes, preprocess: Preprocess, threads: int = 1) -> None:
        """``path``: the model file, or its bytes."""
        name = "model.onnx" if isinstance(path, bytes) else Path(path).name
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self.session = ort.InferenceSession(path if isinstance(path, bytes) else str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT raises its own pybind types: bad file, unknown opset, ...
            raise ImgsimError(f"{name} cannot be run by onnxruntime {ort.__version__}: "
                              f"{str(exc).strip().splitlines()[0][:300]}") from None
        self._check_signature(name, preprocess)

    def _check_signature(self, name: str, preprocess: Preprocess) -> None:
        inputs, outputs = self.session.get_inputs(), [o.name for o in self.session.get_outputs()]
        want = [preprocess.channels, preprocess.size, preprocess.size]
        if len(inputs) != 1 or inputs[0].name != INPUT or inputs[0].type != "tensor(uint8)" or \
                list(inputs[0].shape[1:]) != want or tuple(outputs) != OUTPUTS:
            got = [(i.name, i.type, i.shape) for i in inputs]
            raise ImgsimError(f"{name} takes {got} and gives {outputs}; this model needs uint8 {INPUT!r} of shape "
                              f"[batch, {', '.join(map(str, want))}] giving {list(OUTPUTS)}: export it again")

    def __call__(self, inputs: NDArray[np.uint8]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """Normalised embeddings and logits of a uint8 batch (N, C, H, W)."""
        if len(inputs) <= RUN_CHUNK:
            embedding, logits = self.session.run(list(OUTPUTS), {INPUT: np.ascontiguousarray(inputs, dtype=np.uint8)})
            return embedding, logits
        parts = [self(inputs[i:i + RUN_CHUNK]) for i in range(0, len(inputs), RUN_CHUNK)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
