"""Decoding every supported format to the model's channels, and clear errors for bad bytes."""

import io

import numpy as np
import pytest
from PIL import Image

from imgsim.errors import BadInput
from imgsim.images import Preprocess, decode_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_formats_decode_to_l_or_rgb(fmt):
    img = Image.new("RGB", (20, 10), (200, 30, 30))
    decoded = decode_image(encode(img, fmt))
    assert decoded.mode in ("L", "RGB") and decoded.size == (20, 10)


def test_rgba_transparency_is_composited_on_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(decode_image(encode(img, "PNG"))).min() == 255


def test_palette_with_transparency_is_composited_on_white():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0] * 256)
    data = encode(img, "PNG", transparency=0)
    assert np.asarray(decode_image(data)).min() == 255


def test_cmyk_and_16_bit_convert_consistently():
    gray = Image.new("L", (8, 8), 128)
    cmyk = decode_image(encode(gray.convert("CMYK"), "JPEG", quality=100))
    sixteen = decode_image(encode(Image.fromarray(np.full((8, 8), 128 * 257, np.uint16)), "PNG"))
    assert cmyk.mode == "RGB" and abs(int(np.asarray(cmyk.convert("L")).mean()) - 128) < 4
    assert sixteen.mode == "L" and int(np.asarray(sixteen).mean()) == 128


def test_gif_uses_first_frame():
    frames = [Image.new("L", (6, 6), 10), Image.new("L", (6, 6), 250)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert np.asarray(decode_image(data)).mean() < 50


@pytest.mark.parametrize("data, message", [
    (b"", "empty file"),
    (b"definitely not an image", "not an image"),
    (encode(Image.new("L", (64, 64), 7), "PNG")[:60], "corrupt or truncated"),
    (encode(Image.new("L", (64, 64), 7), "PDF"), "not an image"),
])
def test_bad_bytes_raise_bad_input_with_reason(data, message):
    with pytest.raises(BadInput, match=message):
        decode_image(data)


def test_pixel_limit_rejects_decompression_bombs():
    with pytest.raises(BadInput, match="decompression bomb"):
        decode_image(encode(Image.new("1", (2000, 2000)), "PNG"), max_pixels=1_000_000)


def test_preprocess_resizes_and_converts_channels():
    rgb = Image.new("RGB", (50, 40), (10, 20, 30))
    assert Preprocess(size=28, channels=1, mean=(0.5,), std=(0.2,)).to_array(rgb).shape == (1, 28, 28)
    out = Preprocess(size=16, channels=3, mean=(0.5,) * 3, std=(0.2,) * 3).stack([rgb, rgb])
    assert out.shape == (2, 3, 16, 16) and out.dtype == np.uint8


def test_preprocess_rejects_bad_settings():
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        Preprocess(channels=2, mean=(0.5, 0.5), std=(0.2, 0.2))
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        Preprocess(channels=3)
