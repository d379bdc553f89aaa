"""Decoding what sources return: transparency as a validity mask, sizes from headers alone, and
images too large to decode refused before their pixels are allocated."""

from __future__ import annotations

import io
import math
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from amber_hunter.errors import ImageError
from amber_hunter.images import MAX_PIXELS, decode_rgb, decode_rgba, image_size

RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8)
HOLES = np.zeros((6, 8), bool)
HOLES[0, :3] = HOLES[4:, 6:] = True


def encoded(im: Image.Image, format="PNG", **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=format, **params)
    return buf.getvalue()


def png(width: int, height: int, *, bit_depth=8, colour_type=2, idat: bytes | None = None) -> bytes:
    """A PNG with any header, valid checksums, and ``idat`` as its compressed pixels (or none)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0))
    pixels = chunk(b"IDAT", idat) if idat is not None else b""
    return b"\x89PNG\r\n\x1a\n" + header + pixels + chunk(b"IEND", b"")


# --- decode_rgba ---------------------------------------------------------------------------------


def test_rgba_alpha_becomes_the_validity_mask():
    alpha = np.where(HOLES, 0, RNG.integers(1, 256, HOLES.shape)).astype(np.uint8)  # any alpha > 0 is data
    data = encoded(Image.fromarray(np.dstack([RGB, alpha]), "RGBA"))
    rgb, valid = decode_rgba(data)
    assert rgb.dtype == np.uint8 and rgb.shape == (6, 8, 3) and valid.dtype == bool
    np.testing.assert_array_equal(rgb, RGB)
    np.testing.assert_array_equal(valid, ~HOLES)
    np.testing.assert_array_equal(decode_rgb(data), RGB)  # decode_rgb still just drops alpha


def test_grey_alpha():
    grey = RGB[:, :, 0]
    data = encoded(Image.fromarray(np.dstack([grey, np.where(HOLES, 0, 255).astype(np.uint8)]), "LA"))
    rgb, valid = decode_rgba(data)
    np.testing.assert_array_equal(rgb, np.repeat(grey[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(valid, ~HOLES)
    np.testing.assert_array_equal(decode_rgb(data), rgb)


def test_palette_with_a_transparent_entry():
    indices = np.where(HOLES, 0, 1 + np.arange(48).reshape(6, 8) % 5).astype(np.uint8)
    im = Image.fromarray(indices, "P")
    im.putpalette([0, 0, 0, 250, 10, 10, 10, 250, 10, 10, 10, 250, 200, 200, 0, 0, 200, 200])
    data = encoded(im, transparency=0)
    rgb, valid = decode_rgba(data)
    np.testing.assert_array_equal(valid, ~HOLES)
    np.testing.assert_array_equal(rgb, decode_rgb(data))
    assert tuple(rgb[0, 3]) == (200, 200, 0)  # palette entry 1 + 3 % 5 = 4


def test_rgb_with_a_transparent_colour():
    pixels = RGB.copy()
    pixels[HOLES] = (1, 2, 3)
    rgb, valid = decode_rgba(encoded(Image.fromarray(pixels), transparency=(1, 2, 3)))
    np.testing.assert_array_equal(valid, ~HOLES)
    np.testing.assert_array_equal(rgb, pixels)


def test_sixteen_bit_grey_with_a_transparent_value():
    grey = (RGB[:, :, 0].astype(np.uint16) << 8) | 0x7F
    grey[HOLES] = 0
    data = encoded(Image.fromarray(grey), transparency=0)
    rgb, valid = decode_rgba(data)
    np.testing.assert_array_equal(valid, ~HOLES)
    np.testing.assert_array_equal(rgb[:, :, 0], (grey >> 8).astype(np.uint8))  # the high byte, as decode_rgb


@pytest.mark.parametrize("format", ["PNG", "JPEG"])
def test_images_without_transparency_are_valid_everywhere(format):
    data = encoded(Image.fromarray(RGB), format=format)
    rgb, valid = decode_rgba(data)
    assert valid.shape == (6, 8) and valid.all()
    np.testing.assert_array_equal(rgb, decode_rgb(data))


def test_decode_rgba_fails_like_decode_rgb():
    with pytest.raises(ImageError, match="tile 5/1/2: not a readable image"):
        decode_rgba(b"<html>503</html>", name="tile 5/1/2")


def test_the_same_failure_gives_the_same_message():
    """Pillow's message names the buffer object ("<_io.BytesIO object at 0x7f...>"); ours must not,
    or a run's summary could not count the tiles that failed for one reason together."""
    messages = set()
    for decode in (decode_rgb, decode_rgba, decode_rgb):
        with pytest.raises(ImageError) as info:
            decode(b"<html>rate limited</html>", name="tile")
        messages.add(str(info.value))
    assert messages == {"tile: not a readable image (cannot identify image file); re-export it as PNG or JPEG"}


# --- image_size ----------------------------------------------------------------------------------


def test_image_size_reads_the_header_only():
    assert image_size(png(512, 256)) == (512, 256)  # no pixel data at all: nothing was decoded
    assert image_size(encoded(Image.fromarray(RGB), format="JPEG")) == (8, 6)
    with pytest.raises(ImageError, match="not a readable image"):
        image_size(b"not an image")


# --- sizes too large to decode -------------------------------------------------------------------


def test_a_real_image_over_max_pixels_is_refused_before_decoding():
    """A valid 9000 x 9000 bilevel PNG of 10 kB: decoded, 243 MB of RGB. Refused from its header."""
    side = 9000
    assert side * side > MAX_PIXELS
    data = png(side, side, bit_depth=1, colour_type=0, idat=zlib.compress(bytes(side * (1 + side // 8))))
    assert len(data) < 20_000
    for decode in (decode_rgb, decode_rgba):
        start = time.perf_counter()
        with pytest.raises(ImageError) as info:
            decode(data, name="huge.png")
        assert time.perf_counter() - start < 0.5
        message = str(info.value)
        assert message.startswith("huge.png: 9000x9000 px (81000000 pixels) is over the limit of ")
        assert str(MAX_PIXELS) in message and "\n" not in message


def test_a_decompression_bomb_header_is_an_image_error():
    for call in (decode_rgb, decode_rgba, image_size):
        with pytest.raises(ImageError, match=f"bomb.png: 10000000000 pixels is over the limit of {MAX_PIXELS}"):
            call(png(100_000, 100_000), name="bomb.png")


def test_pillows_bomb_warning_is_an_image_error_too():
    side = math.isqrt(Image.MAX_IMAGE_PIXELS) + 100  # over Pillow's warning threshold, under its error
    data = png(side, side)
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageError, match="over the limit"):
        decode_rgb(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match=f"{side * side} pixels is over the limit of {MAX_PIXELS}"):
            decode_rgba(data)
