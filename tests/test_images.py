"""Decoding every supported format to the model's channels, and clear errors for bad bytes."""

import io
import subprocess
import sys

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


def _photo(size: tuple[int, int], mode: str) -> Image.Image:
    grad = Image.linear_gradient("L").resize(size)
    rgb = Image.merge("RGB", (grad, grad.transpose(Image.Transpose.FLIP_LEFT_RIGHT), grad.rotate(90).resize(size)))
    return rgb.convert(mode)


@pytest.mark.parametrize("mode, fmt", [("RGBA", "PNG"), ("L", "PNG"), ("RGB", "JPEG"), ("CMYK", "JPEG"),
                                       ("I;16", "PNG"), ("1", "PNG")])
def test_large_images_decode_small_and_preprocess_like_a_full_decode(mode, fmt):
    img = _photo((900, 700), "L" if mode in ("I;16", "1") else mode)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img).astype(np.uint16) * 257)
    elif mode == "1":
        img = img.convert("1")
    data = encode(img, fmt)
    seen = []
    small = decode_image(data, draft=28, admit=seen.append)
    full = decode_image(data)
    assert small.mode in ("L", "RGB") and 28 <= min(small.size) < 56 and full.size == (900, 700)
    assert seen and seen[0] <= 900 * 700  # the budget hook saw the pixels about to be decoded
    pre = Preprocess(size=28, channels=3, mean=(0.5,) * 3, std=(0.2,) * 3)
    diff = np.abs(pre.to_array(small).astype(int) - pre.to_array(full).astype(int))
    # Box-averaged (JPEG: DCT-scaled) first, then the same bilinear resize: a few grey levels apart at most.
    assert diff.mean() < {"1": 12, "JPEG": 6}.get(mode, {"JPEG": 6}.get(fmt, 3))


def test_reduced_decoding_keeps_the_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(_photo((800, 400), "RGB"), "JPEG", exif=exif)
    assert decode_image(data).size == (400, 800) and decode_image(data, draft=28).size[1] > decode_image(
        data, draft=28).size[0]


def test_the_budget_hook_can_refuse_before_anything_is_decoded():
    def refuse(pixels):
        raise BadInput(f"{pixels} pixels is over the request's budget")

    with pytest.raises(BadInput, match="640000 pixels is over"):
        decode_image(encode(Image.new("L", (800, 800)), "PNG"), admit=refuse)


def test_sixteen_bit_levels_scale_without_float64():
    levels = np.array([[0, 257, 128 * 257, 65535]], dtype=np.uint16)
    assert np.asarray(decode_image(encode(Image.fromarray(levels), "PNG"))).tolist() == [[0, 1, 128, 255]]
    low = np.array([[0, 17, 255]], dtype=np.uint16)  # 16-bit container, 8-bit values: kept as they are
    assert np.asarray(decode_image(encode(Image.fromarray(low), "PNG"))).tolist() == [[0, 17, 255]]


def test_preprocess_resizes_and_converts_channels():
    rgb = Image.new("RGB", (50, 40), (10, 20, 30))
    assert Preprocess(size=28, channels=1, mean=(0.5,), std=(0.2,)).to_array(rgb).shape == (1, 28, 28)
    out = Preprocess(size=16, channels=3, mean=(0.5,) * 3, std=(0.2,) * 3).to_array(rgb)
    assert out.shape == (3, 16, 16) and out.dtype == np.uint8


def test_preprocess_rejects_bad_settings():
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        Preprocess(channels=2, mean=(0.5, 0.5), std=(0.2, 0.2))
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        Preprocess(channels=3)


def test_a_large_transparent_palette_image_is_reduced_before_it_is_expanded():
    # Blocks of colour and see-through, large enough that the reduced picture must keep them.
    side_x, side_y = 3000, 2000
    idx = ((np.arange(side_y)[:, None] // 250 + np.arange(side_x)[None, :] // 250) % 3).astype(np.uint8)
    img = Image.fromarray(idx, mode="P")
    img.putpalette([255, 0, 0, 0, 0, 255, 0, 0, 0] + [0] * (253 * 3))
    data = encode(img, "PNG", transparency=2)
    small = decode_image(data, draft=64)
    assert small.mode == "RGB" and min(small.size) >= 64 and min(small.size) < 2 * 128
    full = decode_image(data).resize(small.size, Image.Resampling.BOX)  # the unbounded path, reduced after
    assert np.abs(np.asarray(small, dtype=int) - np.asarray(full, dtype=int)).mean() < 12
    pixels = np.asarray(small).reshape(-1, 3)
    assert {(255, 0, 0), (0, 0, 255), (255, 255, 255)} <= {tuple(p) for p in pixels}  # red, blue, white


@pytest.mark.slow
def test_decoding_a_palette_bomb_costs_about_one_index_buffer():
    # 7300 x 5470 in a few kB: expanded to RGBA before any reduction it peaked at ~700 MB.
    code = ("import io, resource, numpy as np; from PIL import Image; from imgsim.images import decode_image;"
            "img = Image.new('P', (7300, 5470), 0); img.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762);"
            "buf = io.BytesIO(); img.save(buf, 'PNG', transparency=0); data = buf.getvalue();"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
            "decode_image(data, draft=160);"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)")
    # the encoder's own full-size buffer sets `before`; decoding must not add much beyond one index buffer
    growth_mb = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert growth_mb < 100, f"decoding grew the peak by {growth_mb} MB"
