"""Segment stage: split a scene into SLIC superpixels, the unit that gets embedded and classified.

The defaults are the source study's (n_segments=30, compactness=35, sigma=1 on ~1000 px scenes),
because the labelled crops were cut with them: a model trained on those crops sees superpixels of
the same size and shape only if detection segments the same way.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image
from skimage.segmentation import slic

from ..errors import ConfigError, ImageError

#: The study's SLIC parameters.
N_SEGMENTS = 30
COMPACTNESS = 35.0
SIGMA = 1.0
#: The SLIC scale of new bundles and of the default and balanced ones (fast uses 1/3): at 1/2 the
#: segmentation agrees with full size at ARI 0.975, every example scene keeps its flag with the
#: default and fast models (the ones measured; balanced was trained later, at this scale), and
#: SLIC takes 0.23 of the time (training/results/slic_scale.md).
SLIC_SCALE = 2
#: CNN input side; the study resized every bbox crop to this with nearest-neighbour sampling.
CNN_SIZE = 224


@dataclass(frozen=True)
class SlicParams:
    """SLIC settings, stored with every model so detection can segment as training did."""

    n_segments: int = N_SEGMENTS
    compactness: float = COMPACTNESS
    sigma: float = SIGMA
    #: SLIC runs on the scene shrunk by this integer factor (box average), and its labels are
    #: brought back to full size by nearest neighbour. Thirty superpixels do not need a megapixel:
    #: see ``training/results/slic_scale.md`` for what each factor costs and saves. ``sigma``
    #: stays in full-resolution pixels (it is divided by ``scale`` for the small image), so it
    #: smooths the same ground width at every factor. 1 is the study's way, and what a model.json
    #: without the key means; new bundles are written with :data:`SLIC_SCALE`. A run keeps the
    #: scale of the model that scanned it (retrained versions inherit it).
    scale: int = 1

    def __post_init__(self):
        if not isinstance(self.scale, int) or isinstance(self.scale, bool) or self.scale < 1:
            raise ConfigError(
                f"SLIC scale {self.scale!r} is not a whole factor of at least 1; use 1 (full size), 2, 3..."
            )


@dataclass(frozen=True)
class Region:
    """One superpixel: its SLIC label, bounding box ``(row0, col0, row1, col1)`` (end-exclusive),
    pixel area and boolean mask cropped to the bbox."""

    label: int
    bbox: tuple[int, int, int, int]
    area_px: int
    mask: np.ndarray

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The bbox crop of ``image``: what the study saved as a training superpixel."""
        r0, c0, r1, c1 = self.bbox
        return image[r0:r1, c0:c1]


@dataclass(frozen=True)
class Segmentation:
    """A label image (``int32``, labels from 1) and its regions in label order."""

    labels: np.ndarray
    regions: list[Region]


def whole_image_region(image: np.ndarray) -> Region:
    """A single region covering all of ``image``: how a labelled crop is embedded.

    A training crop *is* the bbox of one superpixel, so embedding it whole matches what
    detection does when it crops a superpixel's bbox out of a scene.
    """
    h, w = image.shape[:2]
    return Region(label=1, bbox=(0, 0, h, w), area_px=h * w, mask=np.ones((h, w), bool))


def segment(image: np.ndarray, params: SlicParams = SlicParams(), valid: np.ndarray | None = None) -> Segmentation:
    """Run SLIC on an RGB ``uint8`` image and return its regions.

    ``valid`` (boolean, image-shaped) restricts the superpixels to the pixels that hold imagery;
    the rest get label 0 and belong to no region. The number of segments shrinks with the valid
    share, so superpixels keep the size the model was trained on: half a scene gets about half as
    many superpixels, not thirty squeezed into it.

    The image is converted to float32 first: scikit-image would otherwise work in float64 and use
    twice the memory for no gain in the segmentation.

    With ``params.scale`` > 1, SLIC sees the image shrunk by that factor, and each label covers
    its ``scale x scale`` block of the scene: the labels and regions are full-size either way, so
    embedding and the run store never see the difference. The same image and params always give
    the same labels, so a stored scene re-segments exactly (``run/resegment.py``).
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"segment expects an RGB image (H, W, 3), got shape {image.shape}")
    h, w = image.shape[:2]
    s = params.scale
    hs, ws = -(-h // s), -(-w // s)  # the shrunk size, rounded up as PIL's reduce does
    if hs * ws < params.n_segments or min(hs, ws) < 2:
        at = "" if s == 1 else f" at SLIC scale 1/{s} ({ws}x{hs} px)"
        raise ImageError(
            f"image of {w}x{h} px{at} is too small for {params.n_segments} superpixels; "
            "use a larger scene, fewer segments" + ("" if s == 1 else " or a smaller scale")
        )
    n_segments = params.n_segments
    if valid is not None:
        if valid.shape != (h, w):
            raise ImageError(f"validity mask of shape {valid.shape} does not match the {w}x{h} px image")
        if not valid.any():
            raise ImageError("the scene has no valid pixel to segment; it should have been recorded as no-imagery")
        n_segments = max(1, round(params.n_segments * float(valid.mean())))
    small, small_valid = (image, valid) if s == 1 else _shrink(image, valid, s)
    labels = slic(
        small.astype(np.float32) / np.float32(255.0),
        n_segments=n_segments,
        compactness=params.compactness,
        sigma=params.sigma / s,
        start_label=1,
        channel_axis=-1,
        mask=small_valid,
    ).astype(np.int32)
    if s > 1:
        labels = np.repeat(np.repeat(labels, s, axis=0), s, axis=1)[:h, :w]
        if valid is not None:  # a block with some imagery is segmented; its nodata pixels are not
            labels[~valid] = 0
    return Segmentation(labels=labels, regions=regions_of(labels))


def _shrink(image: np.ndarray, valid: np.ndarray | None, scale: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``image`` box-averaged by ``scale`` (edge blocks partial), and the blocks that hold any
    valid pixel, so that every valid pixel of the scene gets a superpixel."""
    small = np.asarray(Image.fromarray(image).reduce(scale))
    if valid is None:
        return small, None
    hs, ws = small.shape[:2]
    padded = np.zeros((hs * scale, ws * scale), bool)
    padded[: valid.shape[0], : valid.shape[1]] = valid
    return small, padded.reshape(hs, scale, ws, scale).any(axis=(1, 3))


def regions_of(labels: np.ndarray, only: set[int] | None = None) -> list[Region]:
    """Regions of a label image, found in one pass with ``ndimage.find_objects``; with ``only``,
    just those labels (a rescore outlines the few superpixels that became positive)."""
    from scipy import ndimage

    regions = []
    for index, slices in enumerate(ndimage.find_objects(labels), start=1):
        if slices is None or (only is not None and index not in only):
            continue
        rows, cols = slices
        mask = labels[rows, cols] == index
        regions.append(
            Region(
                label=index,
                bbox=(rows.start, cols.start, rows.stop, cols.stop),
                area_px=int(mask.sum()),
                mask=mask,
            )
        )
    return regions


def boundaries(labels: np.ndarray, *, inner: bool = False) -> np.ndarray:
    """The pixels with a 4-neighbour of another label: what scikit-image's ``find_boundaries``
    marks in mode "thick" (with ``inner``, mode "inner": only the pixels of non-zero labels).

    The scan draws these on the map picture of every flagged scene, twice per megapixel scene,
    where ``find_boundaries`` (a grey dilation and an erosion) took 25 ms; two shifted comparisons
    give the same pixels in 2.5.
    """
    edge = np.zeros(labels.shape, bool)
    rows = labels[1:] != labels[:-1]
    edge[1:] |= rows
    edge[:-1] |= rows
    cols = labels[:, 1:] != labels[:, :-1]
    edge[:, 1:] |= cols
    edge[:, :-1] |= cols
    if inner:
        edge &= labels != 0
    return edge


#: Header of a packed label map: height, width (uint32) and the bytes per label (1 or 2).
_PACKED = struct.Struct("<IIB")


def pack_labels(labels: np.ndarray) -> bytes:
    """A label image as compact bytes, to keep with a scanned scene.

    A rescore outlines the superpixels that a new model makes positive, and a reader's report is
    matched to the superpixels under it; both need the scan's label map, and SLIC again from the
    tiles costs a third of a second a scene (and the tiles may be pruned). Thirty-odd blobs
    compress well: about 25 kB for a 1000 px scene, in 3 ms (zlib level 1; level 6 saves a third
    for seven times the time). Labels are stored in one byte when they fit, else two.
    """
    low, top = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if labels.ndim != 2 or low < 0 or top > 0xFFFF:
        raise ImageError(f"cannot pack a label image of shape {labels.shape} with labels from {low} to {top}; "
                         "it must be 2-D with labels from 0 to 65535")
    dtype = np.uint8 if top <= 0xFF else np.uint16
    raw = np.ascontiguousarray(labels, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    return _PACKED.pack(*labels.shape, np.dtype(dtype).itemsize) + zlib.compress(raw, 1)


def unpack_labels(data: bytes) -> np.ndarray:
    """The ``int32`` label image that :func:`pack_labels` packed."""
    try:
        h, w, size = _PACKED.unpack_from(data)
        raw = zlib.decompress(data[_PACKED.size:])
    except (struct.error, zlib.error) as exc:
        raise ImageError(f"a stored label map is damaged ({exc}); the scene is segmented again from its tiles, "
                         "or rescan the area into a new run directory") from None
    if size not in (1, 2) or len(raw) != h * w * size:
        raise ImageError(f"a stored label map holds {len(raw)} bytes, not {h}x{w} labels of {size} bytes; the scene "
                         "is segmented again from its tiles, or rescan the area into a new run directory")
    return np.frombuffer(raw, {1: "u1", 2: "<u2"}[size]).reshape(h, w).astype(np.int32)


def resize_nearest(crop: np.ndarray, size: int = CNN_SIZE) -> np.ndarray:
    """Resize a crop to ``size x size`` with nearest-neighbour sampling, as the study did."""
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.NEAREST))
