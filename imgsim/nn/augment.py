"""Training augmentation presets: pixel shifts for small grayscale images, crops and colour jitter for photos."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

def photo_transform(size: int, crop_scale: float, jitter: float) -> v2.Compose:
    """Per-image: random resized crop (area share >= ``crop_scale``; at 1 the whole image, resized), horizontal
    flip, colour jitter."""
    crop = v2.Resize((size, size), antialias=True) if crop_scale >= 1 else \
        v2.RandomResizedCrop(size, scale=(crop_scale, 1.0), antialias=True)
    steps = [crop, v2.RandomHorizontalFlip()]
    if jitter > 0:
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=min(jitter / 4, 0.5)))
    return v2.Compose(steps)


def shift_flip(images: torch.Tensor, seed: int, pad: int = 2) -> torch.Tensor:
    """Per image in a float batch: random horizontal flip and up-to-``pad``-pixel shift, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    n, _, h, w = images.shape
    flip = torch.rand(n, generator=gen) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(3), images)
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2, n), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
