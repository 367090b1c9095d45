"""Export a trained model to ONNX (uint8 images in, embedding and logits out), checked against torch."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from imgsim import atomic
from imgsim.nn.embed import embed_array
from imgsim.errors import ImgsimError
from imgsim.modelspec import OPSET, PARITY
from imgsim.nn.model import EmbeddingNet, TrainedModel
from imgsim.serve.runtime import INPUT, OUTPUTS, OnnxModel



class _Serving(nn.Module):
    """What the server runs: uint8 images, scaled to [0, 1] inside the graph, to (embedding, logits)."""

    def __init__(self, net: EmbeddingNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.embed_images(images)


def export_onnx(model: TrainedModel, path: str | Path, check_inputs: NDArray[np.uint8]) -> float:
    """Write ``path`` atomically if ONNX Runtime matches torch on ``check_inputs``; returns the largest difference."""
    net = model.build()
    serving = _Serving(net).eval()  # export restores the mode it found: eval, so BatchNorm uses running stats
    example = torch.from_numpy(np.ascontiguousarray(check_inputs[:2]))
    with atomic.atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(serving, (example,), str(tmp), dynamo=False, opset_version=OPSET, input_names=[INPUT],
                          output_names=list(OUTPUTS), dynamic_axes={name: {0: "batch"} for name in (INPUT, *OUTPUTS)})
        parity = onnx_parity(OnnxModel(tmp, model.preprocess), net, check_inputs)
        if parity > PARITY:
            raise ImgsimError(f"the ONNX export of backbone {model.args.backbone} disagrees with torch by {parity:.3g} "
                              f"(more than {PARITY:g}) on the probe images; this is a bug in imgsim, please report it")
    return parity


def onnx_parity(onnx: OnnxModel, net: EmbeddingNet, inputs: NDArray[np.uint8]) -> float:
    """Largest absolute difference of the embeddings ONNX Runtime and torch give ``inputs``."""
    return float(np.abs(onnx(inputs)[0] - embed_array(net, inputs)[0]).max(initial=0.0))
