"""Decode, validate and preprocess images so split, train, extract and serve agree exactly."""

from __future__ import annotations

import dataclasses
import io
import warnings
from typing import Sequence

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps, UnidentifiedImageError

from imgsim.errors import BadInput

# Above ~40 MP a photo is almost certainly a decompression bomb for a 28-224 px model.
DEFAULT_MAX_PIXELS = 40_000_000
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"})


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft: int = 0) -> Image.Image:
    """Fully decode ``data`` into an ``L`` or ``RGB`` image, or raise ``BadInput`` with the reason.

    ``draft``: the smallest side the caller needs; JPEGs then decode at a reduced scale (1/2 to 1/8),
    which is several times faster for photos that are resized down anyway."""
    if not data:
        raise BadInput("empty file (0 bytes): not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in SUPPORTED_FORMATS:
                raise BadInput(f"unsupported image format {img.format}; use JPEG, PNG, WebP, BMP, GIF or TIFF")
            width, height = img.size
            if width * height > max_pixels:
                raise BadInput(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
                    "(a possible decompression bomb); downscale it first"
                )
            img.seek(0)  # animated GIF/WebP: the first frame stands for the image
            if draft and img.format in ("JPEG", "MPO"):
                img.draft(img.mode, _draft_box(width, height, draft))
            img.load()
            img = ImageOps.exif_transpose(img)
    except BadInput:
        raise
    except UnidentifiedImageError:
        raise BadInput("not an image: the bytes are in no recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadInput(f"image too large (possible decompression bomb): {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadInput(f"corrupt or truncated image: {exc}") from None
    return _canonical_mode(img)


def _draft_box(width: int, height: int, smallest_side: int) -> tuple[int, int]:
    """The size ``draft`` must keep at least: the shorter side stays >= ``smallest_side``."""
    scale = smallest_side / max(min(width, height), 1)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _canonical_mode(img: Image.Image) -> Image.Image:
    """Map every Pillow mode onto L or RGB: transparency on white, 16-bit scaled, CMYK to RGB."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 257.0 if arr.max(initial=0) > 255 else 1.0
        return Image.fromarray(np.clip(arr / scale, 0, 255).astype(np.uint8), mode="L")
    if mode == "1":
        return img.convert("L")
    if mode == "P" and "transparency" not in img.info:
        return img.convert("RGB")
    if mode in ("P", "PA", "LA", "RGBA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How an image becomes model input; stored with the model so every stage applies the same."""

    size: int = 28
    channels: int = 1
    mean: tuple[float, ...] = (0.286,)
    std: tuple[float, ...] = (0.353,)
    # 0: squash the whole image to size x size. >0: scale the shorter side to ``resize``, then centre-crop
    # size x size, as torchvision's pretrained weights expect (e.g. 256 -> 224).
    resize: int = 0

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.size < 8:
            raise ValueError(f"image size must be at least 8 pixels, got {self.size}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values each, got {self.mean} and {self.std}")
        if self.resize and self.resize < self.size:
            raise ValueError(f"resize ({self.resize}) must be 0 or at least size ({self.size})")

    @property
    def load_side(self) -> int:
        """The smallest side a decoded image needs before resizing (for JPEG draft decoding)."""
        return self.resize or self.size

    def to_array(self, img: Image.Image, size: int | None = None) -> NDArray[np.uint8]:
        """Resize (and centre-crop, with ``resize``) a decoded image to a (C, H, W) uint8 array.

        ``size`` overrides the output side while keeping the same framing (training crops from larger images)."""
        img = img.convert("L" if self.channels == 1 else "RGB")
        out = size or self.size
        if self.resize:
            img = _resize_and_crop(img, round(self.resize * out / self.size), out)
        elif img.size != (out, out):
            img = img.resize((out, out), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
        # Copies either way: Pillow's buffer is read-only, and torch.from_numpy needs a writable array.
        return arr[None, :, :].copy() if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))

    def stack(self, images: Sequence[Image.Image]) -> NDArray[np.uint8]:
        """Preprocess a batch into an (N, C, H, W) uint8 array."""
        if not images:
            return np.zeros((0, self.channels, self.size, self.size), dtype=np.uint8)
        return np.stack([self.to_array(img) for img in images])

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocess":
        """Rebuild from the dict stored beside the weights."""
        return cls(size=int(data["size"]), channels=int(data["channels"]),
                   mean=tuple(data["mean"]), std=tuple(data["std"]), resize=int(data.get("resize", 0)))


def _resize_and_crop(img: Image.Image, shorter: int, crop: int) -> Image.Image:
    width, height = img.size
    scale = shorter / min(width, height)
    new = (max(crop, round(width * scale)), max(crop, round(height * scale)))
    if new != img.size:
        img = img.resize(new, Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (new[0] - crop) // 2, (new[1] - crop) // 2
    return img.crop((left, top, left + crop, top + crop))
