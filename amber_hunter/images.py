"""Reading and writing images, with every odd format turned into plain 8-bit RGB.

Map tiles and the study's crops are RGB PNG, but users feed in whatever they have: greyscale
scans, RGBA screenshots, 16-bit exports. Everything downstream assumes ``uint8 (H, W, 3)``, so
the conversion happens once, here, and a file that cannot be read fails with one clear line.
Transparency, which tile servers use for "no imagery", comes out of :func:`decode_rgba` as a
validity mask; an image too large to decode safely is refused from its header.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import atomic
from .errors import ImageError, plain


def to_rgb8(array: np.ndarray, *, name: str = "image") -> np.ndarray:
    """Return ``array`` as contiguous ``uint8 (H, W, 3)``.

    Greyscale is repeated over three channels, alpha is dropped (tiles use it for "no data", which
    :func:`decode_rgba` returns separately) and 16-bit or float data is rescaled to 0-255.
    """
    a = np.asarray(array)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] in (1, 2):  # grey, grey + alpha
        a = np.repeat(a[:, :, :1], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    elif not (a.ndim == 3 and a.shape[2] == 3):
        raise ImageError(f"{name}: shape {a.shape} is not an image; expected (H, W) or (H, W, 1-4)")
    if a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        a = np.clip(np.nan_to_num(a) * (255.0 if a.max(initial=0) <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ImageError(f"{name}: pixel type {a.dtype} is not supported; save it as 8- or 16-bit PNG")
    return np.ascontiguousarray(a)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file into ``uint8 (H, W, 3)``; a truncated or non-image file is an ImageError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, expected an image file") from None
    return decode_rgb(data, name=str(path))


#: Largest image decoded, in pixels: 8192 x 8192 (64 MP, ~200 MB as RGB). A tile or scene is ~1 MP;
#: anything far larger is a mistake or a decompression bomb, and is refused from its header,
#: before its pixels are allocated.
MAX_PIXELS = 8192 * 8192
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")
_NEEDS_RGB = ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1", "LA", "F")
_READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError)
# Pillow refuses images over 2 * Image.MAX_IMAGE_PIXELS in Image.open, before our own check can
# run; over Image.MAX_IMAGE_PIXELS it warns, which raises when warnings are errors.
_BOMBS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def _too_large(name: str, size: str) -> ImageError:
    return ImageError(
        f"{name}: {size} is over the limit of {MAX_PIXELS} pixels (MAX_PIXELS); "
        "cut it into map tiles or scenes of at most that size"
    )


def _unreadable(name: str, exc: Exception) -> ImageError:
    # Pillow names the buffer it read, "<_io.BytesIO object at 0x7f...>".
    reason = plain(str(exc)) or type(exc).__name__
    return ImageError(f"{name}: not a readable image ({reason}); re-export it as PNG or JPEG")


def _bomb(name: str, exc: Exception) -> ImageError:
    count = re.search(r"(\d+) pixels", str(exc))  # "Image size (N pixels) exceeds limit of ..."
    return _too_large(name, f"{count.group(1)} pixels" if count else f"the image ({exc})")


def image_size(data: bytes, *, name: str = "image") -> tuple[int, int]:
    """``(width, height)`` of encoded image bytes, from the header alone: no pixel is decoded.

    Lets a caller learn a source's tile size for the price of one header.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except _BOMBS as exc:
        raise _bomb(name, exc) from None
    except _READ_ERRORS as exc:
        raise _unreadable(name, exc) from None


def _load(data: bytes, name: str) -> Image.Image:
    """Open ``data``, refuse it if its header claims more than MAX_PIXELS, then decode it fully.

    The full decode happens here so truncated files fail here, not later; the size check happens
    before it, because ``Image.open`` reads only the header and ``load`` allocates the pixels.
    """
    try:
        im = Image.open(io.BytesIO(data))
        width, height = im.size
        if width * height > MAX_PIXELS:
            raise _too_large(name, f"{width}x{height} px ({width * height} pixels)")
        im.load()
    except _BOMBS as exc:
        raise _bomb(name, exc) from None
    except _READ_ERRORS as exc:
        raise _unreadable(name, exc) from None
    return im


def _high_byte(im: Image.Image) -> np.ndarray:
    # 16-bit: keep the high byte, whatever the range actually used, so that two exports of the
    # same scene always come out equally bright.
    return (np.asarray(im, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8)


def _rgb(im: Image.Image, name: str) -> np.ndarray:
    if im.mode in _SIXTEEN_BIT:
        array = _high_byte(im)
    elif im.mode in _NEEDS_RGB:
        array = np.asarray(im.convert("RGB"))
    else:
        array = np.asarray(im)
    return to_rgb8(array, name=name)


def decode_rgb(data: bytes, *, name: str = "image") -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, ...) into ``uint8 (H, W, 3)``, dropping any alpha."""
    return _rgb(_load(data, name), name)


def decode_rgba(data: bytes, *, name: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Decode image bytes into ``uint8 (H, W, 3)`` and where the image has data, ``bool (H, W)``.

    Tile servers mark "no imagery here" with transparency, so a pixel is valid where its alpha
    is above 0. Transparency also comes as a palette entry or a single transparent colour (a
    PNG tRNS chunk); both count. An image without any transparency is valid everywhere.
    """
    im = _load(data, name)
    transparent = im.info.get("transparency")
    if im.mode in _SIXTEEN_BIT:  # converting to RGBA would clip 16-bit values, not scale them
        rgb = _rgb(im, name)
        valid = np.asarray(im) != transparent if isinstance(transparent, int) else np.ones(rgb.shape[:2], bool)
    elif transparent is not None or {"A", "a"} & set(im.getbands()):
        rgba = np.asarray(im.convert("RGBA"))
        rgb, valid = np.ascontiguousarray(rgba[:, :, :3]), rgba[:, :, 3] > 0
    else:
        rgb = _rgb(im, name)
        valid = np.ones(rgb.shape[:2], bool)
    return rgb, valid


#: zlib level of the PNGs the tool writes (overlays, map pictures, crops). Aerial imagery hardly
#: compresses: on the demo's 512 px overlays level 1 took 25 ms and 454 kB, Pillow's default 6
#: took 115 ms and 422 kB. A scan's one writer encodes every flagged scene's overlay: at level 6
#: that was 9.7 s of the main process's CPU in a 49 s ``fast`` scan of 96 demo scenes (48 flagged).
PNG_COMPRESS_LEVEL = 1


def encode_png(image: np.ndarray) -> bytes:
    """Encode ``uint8 (H, W, 3|4)`` as PNG bytes, at :data:`PNG_COMPRESS_LEVEL`: lossless either way."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write ``image`` as a PNG file atomically."""
    atomic.write_bytes(path, encode_png(image))
