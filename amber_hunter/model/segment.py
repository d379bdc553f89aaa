"""Segment stage: split a scene into SLIC superpixels, the unit that gets embedded and classified.

The defaults are the source study's (n_segments=30, compactness=35, sigma=1 on ~1000 px scenes),
because the labelled crops were cut with them: a model trained on those crops sees superpixels of
the same size and shape only if detection segments the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from skimage.segmentation import slic

from ..errors import ImageError

#: The study's SLIC parameters.
N_SEGMENTS = 30
COMPACTNESS = 35.0
SIGMA = 1.0
#: CNN input side; the study resized every bbox crop to this with nearest-neighbour sampling.
CNN_SIZE = 224


@dataclass(frozen=True)
class SlicParams:
    """SLIC settings, stored with every model so detection can segment as training did."""

    n_segments: int = N_SEGMENTS
    compactness: float = COMPACTNESS
    sigma: float = SIGMA


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
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"segment expects an RGB image (H, W, 3), got shape {image.shape}")
    h, w = image.shape[:2]
    if h * w < params.n_segments or min(h, w) < 2:
        raise ImageError(
            f"image of {w}x{h} px is too small for {params.n_segments} superpixels; "
            "use a larger scene or fewer segments"
        )
    n_segments = params.n_segments
    if valid is not None:
        if valid.shape != (h, w):
            raise ImageError(f"validity mask of shape {valid.shape} does not match the {w}x{h} px image")
        if not valid.any():
            raise ImageError("the scene has no valid pixel to segment; it should have been recorded as no-imagery")
        n_segments = max(1, round(params.n_segments * float(valid.mean())))
    labels = slic(
        image.astype(np.float32) / np.float32(255.0),
        n_segments=n_segments,
        compactness=params.compactness,
        sigma=params.sigma,
        start_label=1,
        channel_axis=-1,
        mask=valid,
    ).astype(np.int32)
    return Segmentation(labels=labels, regions=regions_of(labels))


def regions_of(labels: np.ndarray) -> list[Region]:
    """Regions of a label image, found in one pass with ``ndimage.find_objects``."""
    from scipy import ndimage

    regions = []
    for index, slices in enumerate(ndimage.find_objects(labels), start=1):
        if slices is None:
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


def resize_nearest(crop: np.ndarray, size: int = CNN_SIZE) -> np.ndarray:
    """Resize a crop to ``size x size`` with nearest-neighbour sampling, as the study did."""
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.NEAREST))
