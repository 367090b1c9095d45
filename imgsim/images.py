"""Decode, validate and preprocess images so split, train, extract and serve agree exactly."""

from __future__ import annotations

import dataclasses
import io
import warnings
from typing import Callable

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps, UnidentifiedImageError

from imgsim.errors import BadInput

# Above ~40 MP a photo is almost certainly a decompression bomb for a 28-224 px model.
DEFAULT_MAX_PIXELS = 40_000_000
# What a server (and the page's thumbnails) decodes at most per image: see ServiceConfig.max_pixels.
SERVING_MAX_PIXELS = 12_000_000
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"})


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft: int = 0,
                 admit: Callable[[int], None] | None = None) -> Image.Image:
    """Decode ``data`` into an ``L`` or ``RGB`` image, or raise ``BadInput`` with the reason.

    ``draft``: the smallest side the caller needs. JPEGs then decode at a reduced scale (1/2 to 1/8), and any
    image still at least twice that size is box-reduced before its mode is converted, so a large image costs
    one full-size buffer, not several. ``admit`` sees the pixel count about to be decoded (after the header,
    before the decode) and may refuse it by raising ``BadInput``: a per-request budget."""
    if not data:
        raise BadInput("empty file (0 bytes): not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in SUPPORTED_FORMATS:
                raise BadInput(f"unsupported image format {img.format}; use JPEG, PNG, WebP, BMP, GIF or TIFF")
            img.seek(0)  # animated GIF/WebP: the first frame stands for the image
            if draft and img.format in ("JPEG", "MPO"):
                img.draft(img.mode, _draft_box(*img.size, draft))  # only the header so far: nothing decoded
            width, height = img.size
            if width * height > max_pixels:
                raise BadInput(
                    f"image is {width}x{height} = {width * height} pixels, over this server's limit of {max_pixels} "
                    "(a possible decompression bomb); downscale it first"
                )
            if admit is not None:
                admit(width * height)
            img.load()
            img = _reduce(img, draft)
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


# Modes whose pixels may be averaged (Pillow premultiplies RGBA/LA itself); not palette indices, not 1-bit.
_REDUCIBLE = frozenset({"L", "LA", "La", "RGB", "RGBA", "RGBa", "I", "F", "CMYK", "YCbCr"})


def _reduce(img: Image.Image, smallest_side: int) -> Image.Image:
    """Box-average by an integer factor while the shorter side stays >= ``smallest_side`` (0: leave as is)."""
    if not smallest_side:
        return img
    if img.mode == "1" or img.mode.startswith("I;16"):
        img = _canonical_mode(img)  # 1 byte per pixel either way, then reducible
    factor = min(img.size) // smallest_side
    if factor >= 4 and img.mode in ("P", "PA"):
        # Palette indices cannot be averaged and expanding to RGBA costs four full-size buffers: subsample first.
        step = factor // 2
        sampled = img.resize((img.width // step, img.height // step), Image.Resampling.NEAREST)
        sampled.info = img.info  # transparency and EXIF orientation
        img = _canonical_mode(sampled)
        factor = min(img.size) // smallest_side
    if factor < 2 or img.mode not in _REDUCIBLE:
        return img
    reduced = img.reduce(factor)
    reduced.info = img.info  # keeps the EXIF orientation for exif_transpose
    return reduced


def _canonical_mode(img: Image.Image) -> Image.Image:
    """Map every Pillow mode onto L or RGB: transparency on white, 16-bit scaled, CMYK to RGB."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img)), mode="L")
    if mode == "1":
        return img.convert("L")
    if mode == "P" and "transparency" not in img.info:
        return img.convert("RGB")
    if mode in ("P", "PA", "LA", "RGBA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV


def _to_uint8(arr: NDArray) -> NDArray[np.uint8]:
    """16/32-bit or float grey levels to 0-255 (x / 257 when above 255), in the array's own type: no float64."""
    arr = arr.copy()  # Pillow's buffer is read-only
    if arr.max(initial=0) > 255:
        if arr.dtype.kind == "f":
            arr /= 257
        else:
            arr //= 257
    np.clip(arr, 0, 255, out=arr)
    return arr.astype(np.uint8)


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

    def decode(self, data: bytes, size: int | None = None, **limits) -> NDArray[np.uint8]:
        """Image file bytes to model input, decoded only as large as ``to_array`` needs (JPEG draft, reduce):
        the one path from bytes to input for training, extract and serving. ``limits``: ``decode_image``'s
        ``max_pixels`` and ``admit``."""
        out = size or self.size
        return self.to_array(decode_image(data, draft=self.load_side * out // self.size, **limits), out)

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
