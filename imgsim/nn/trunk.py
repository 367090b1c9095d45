"""The backbone's pooled features of uint8 image batches, on torch or ONNX Runtime: what head-mode training keeps
and extract feeds the head (docs/benchmarks.md, section 20, has the two runtimes side by side)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import warnings

import numpy as np
import onnxruntime as ort
import PIL
import torch
from numpy.typing import NDArray
from torch import nn

from imgsim.errors import ImgsimError
from imgsim.modelspec import BACKBONE_RUNTIMES as RUNTIMES
from imgsim.modelspec import OPSET, PARITY
from imgsim.nn import distributed
from imgsim.nn.model import EmbeddingNet

CHUNK = 32
# Part of every kept feature's key: raise it when decoding or pooling changes what a file's features are.
FEATURES_VERSION = 1


def fingerprint(model: EmbeddingNet) -> str:
    """Identifies what turns a file into features: the trunk's weights, the input normalisation and the
    preprocessing, so a cached feature never outlives its backbone."""
    pre = model.preprocess
    digest = hashlib.sha256(json.dumps([FEATURES_VERSION, PIL.__version__, model.args.backbone,
                                        model.args.feature_levels, pre.size, pre.channels, pre.resize]).encode())
    for name, tensor in sorted(model.trunk.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(model.mean.cpu().numpy().tobytes() + model.std.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class _Features(nn.Module):
    """uint8 images, scaled to [0, 1] inside the graph, to the trunk's pooled features."""

    def __init__(self, net: EmbeddingNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(images.float() / 255.0)


class Trunk:
    """Calls the frozen backbone on uint8 batches (N, C, H, W) and returns float32 features (N, F)."""

    def __init__(self, model: EmbeddingNet, runtime: str | None = None, threads: int | None = None) -> None:
        if runtime is not None and runtime not in RUNTIMES:
            raise ImgsimError(f"backbone_runtime must be one of {RUNTIMES}, got {runtime!r}")
        self.device = distributed.device()
        self.model = model.eval()
        # Torch: on a CPU the two are level (docs/benchmarks.md, section 20), and torch's features are the ones the
        # torch model gives, so a head trains exactly as it did on them.
        self.runtime = runtime or "torch"
        self.threads, self.session = threads, None  # exported at the first batch: all features kept, no export
        self._channels_last: EmbeddingNet | None = None

    def _export(self, threads: int) -> ort.InferenceSession:
        pre, net = self.model.preprocess, copy.deepcopy(self.model).cpu()  # the caller's model stays where it is
        probe = np.random.default_rng(0).integers(0, 256, (2, pre.channels, pre.size, pre.size), dtype=np.uint8)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        with tempfile.TemporaryDirectory(prefix="imgsim-trunk-") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            path = os.path.join(tmp, "trunk.onnx")
            torch.onnx.export(_Features(net).eval(), (torch.from_numpy(probe),), path, dynamo=False,
                              opset_version=OPSET, input_names=["images"], output_names=["features"],
                              dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        with torch.inference_mode():
            want = _Features(net)(torch.from_numpy(probe)).numpy()
        got = session.run(None, {"images": probe})[0]
        # PARITY relative to the features' scale: pooled features are not unit vectors.
        if np.abs(got - want).max() > PARITY * max(1.0, float(np.abs(want).max())):
            raise ImgsimError(f"the ONNX export of backbone {net.args.backbone} disagrees with torch; run with "
                              "backbone_runtime=torch, and please report it")
        return session

    def _torch(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        if self._channels_last is None:
            # Channels-last convolutions are eager torch's fastest on a CPU; on a copy, because training and the
            # export expect the model in the default layout.
            self._channels_last = copy.deepcopy(self.model).to(self.device, memory_format=torch.channels_last)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
            x = (x.float() / 255.0).contiguous(memory_format=torch.channels_last)
            return self._channels_last.forward_features(x).float().cpu().numpy()

    def __call__(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        if self.runtime == "onnxruntime" and self.session is None:
            self.session = self._export(self.threads)
        # At most CHUNK images a pass: ONNX Runtime's arena keeps the largest pass's activations for good.
        return np.concatenate([self._run(images[i:i + CHUNK]) for i in range(0, len(images), CHUNK)]) \
            if len(images) else self._run(images)

    def _run(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        if self.session is None:
            return self._torch(images)
        return self.session.run(None, {"images": np.ascontiguousarray(images, dtype=np.uint8)})[0]
