"""Reading and writing images, with every odd format turned into plain 8-bit RGB.

Map tiles and the study's crops are RGB PNG, but users feed in whatever they have: greyscale
scans, RGBA screenshots, 16-bit exports. Everything downstream assumes ``uint8 (H, W, 3)``, so
the conversion happens once, here, and a file that cannot be read fails with one clear line.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import atomic
from .errors import ImageError


def to_rgb8(array: np.ndarray, *, name: str = "image") -> np.ndarray:
    """Return ``array`` as contiguous ``uint8 (H, W, 3)``.

    Greyscale is repeated over three channels, alpha is dropped (tiles use it for "no data", which
    the scan handles separately) and 16-bit or float data is rescaled to 0-255.
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


def decode_rgb(data: bytes, *, name: str = "image") -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, ...) into ``uint8 (H, W, 3)``."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # forces a full decode so truncated files fail here, not later
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit: keep the high byte, whatever the range actually used, so that two
                # exports of the same scene always come out equally bright.
                array = (np.asarray(im, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8)
            elif im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1", "LA", "F"):
                array = np.asarray(im.convert("RGB"))
            else:
                array = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: not a readable image ({exc}); re-export it as PNG or JPEG") from None
    return to_rgb8(array, name=name)


def encode_png(image: np.ndarray) -> bytes:
    """Encode ``uint8 (H, W, 3|4)`` as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write ``image`` as a PNG file atomically."""
    atomic.write_bytes(path, encode_png(image))
