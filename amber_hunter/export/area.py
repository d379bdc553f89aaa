"""The damaged area, measured two ways: whole positive superpixels, and disturbed pixels inside them.

A positive superpixel is 0.5-0.9 ha, and the pits and dug-up sand that made it positive usually
cover a fraction of it. Summing whole superpixels (the study's way) gives an *upper bound*: right
for "where to look", too high for "how much land was destroyed". So the export also reports an
*estimate* of the disturbed ground itself, from the same hand-made evidence the texture embedder
pools (see :mod:`amber_hunter.model.embed.texture`), applied per pixel:

* bare sand: pixels brighter than their surroundings by more than ``SAND_STEP`` robust spreads
  and nearly colourless (dug-up sand is pale grey-yellow; fields and forest are green);
* pits: dark blobs of pit size (difference-of-Gaussians at the embedder's two finest scales)
  next to bright sand, grown to the pit's size;
* the ground between them: a small closing and hole filling joins pits and sand patches into
  the dug-over area a person would outline, and specks smaller than one pit are dropped.

The estimate is checked against hand-drawn masks (``training/damage_masks``); the README gives its
error. It needs the scene's pixels, so it is made at export from the run's tile source or cache,
and is missing (None) for a scene whose imagery is no longer there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Side (px) of the window whose median luminance is a pixel's "surroundings": ~25 m at zoom 18,
#: larger than a sand patch's typical width so the patch does not raise its own background.
BACKGROUND_PX = 65
#: Brightness above the surroundings, in robust spreads of the scene's luminance, that is sand.
SAND_STEP = 1.5
#: Saturation below which a bright pixel may be sand (the texture embedder's "greyish").
MAX_SAND_SATURATION = 0.25
#: Dark-blob strength (DoG response, in robust spreads) that is a pit.
PIT_STEP = 0.6
#: A pit counts only with sand within this many px of it (the rim of dug-up sand).
RIM_PX = 6
#: Radius (px) pits are grown by: a pit's DoG peak is narrower than the pit.
PIT_RADIUS = 3
#: Closing radius (px) that joins sand and pits into one dug-over area (~1.5 m).
CLOSE_PX = 4
#: Connected disturbed areas below this many px (~ one small pit, 3 m²) are noise.
MIN_PATCH_PX = 20
#: Holes up to this many px (~15 m²) inside disturbed ground are dug-over too (water in a pit).
MAX_HOLE_PX = 100


@dataclass(frozen=True)
class DamageFigures:
    """The two area figures of one superpixel or scene, in m².

    ``upper_m2`` is the whole positive superpixels' valid area; ``disturbed_m2`` the estimate of
    the disturbed ground inside them, None when the imagery was not available at export.
    """

    upper_m2: float
    disturbed_m2: float | None


def _disk(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius


def disturbed_pixels(image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """A boolean map of the pixels of RGB ``image`` that look dug over: sand, pits and between.

    Statistics are taken over the whole scene (its valid pixels), so a superpixel entirely of
    sand is still measured as sand, which a per-superpixel median would hide.
    """
    rgb = image.astype(np.float32)
    lum = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    top, bottom = rgb.max(axis=2), rgb.min(axis=2)
    saturation = (top - bottom) / (top + 1e-6)
    pixels = lum if valid is None else lum[valid]
    q25, q75 = np.percentile(pixels, [25, 75]) if pixels.size else (0.0, 1.0)
    spread = max((q75 - q25) / 1.349, 2.0)
    background = ndimage.median_filter(lum[::4, ::4], size=max(BACKGROUND_PX // 4, 3), mode="nearest")
    background = np.kron(background, np.ones((4, 4), np.float32))[: lum.shape[0], : lum.shape[1]]
    sand = (lum > background + SAND_STEP * spread) & (saturation < MAX_SAND_SATURATION)

    fine = ndimage.gaussian_filter(lum, 1.5)
    pits = np.zeros_like(sand)
    for sigma, wider in ((1.5, 2.4), (2.4, 3.84)):
        dog = ndimage.gaussian_filter(lum, wider) - (fine if sigma == 1.5 else ndimage.gaussian_filter(lum, sigma))
        pits |= dog > PIT_STEP * spread
    near_sand = ndimage.binary_dilation(sand, _disk(RIM_PX))
    pits = ndimage.binary_dilation(pits & near_sand, _disk(PIT_RADIUS))

    disturbed = ndimage.binary_closing(sand | pits, _disk(CLOSE_PX))
    holes = ndimage.binary_fill_holes(disturbed) & ~disturbed
    labels, n = ndimage.label(holes)
    if n:
        sizes = ndimage.sum_labels(holes, labels, np.arange(1, n + 1))
        disturbed |= np.isin(labels, 1 + np.flatnonzero(sizes <= MAX_HOLE_PX))
    labels, n = ndimage.label(disturbed)
    if n:
        sizes = ndimage.sum_labels(disturbed, labels, np.arange(1, n + 1))
        disturbed &= np.isin(labels, 1 + np.flatnonzero(sizes >= MIN_PATCH_PX))
    if valid is not None:
        disturbed &= valid
    return disturbed


def rasterise(rings: list, shape: tuple[int, int]) -> np.ndarray:
    """A boolean mask of ``shape`` from polygon rings in pixel coordinates ``[[col, row], ...]``:
    the first ring is the outline, later ones are holes (even-odd fill, as GeoJSON means them)."""
    from PIL import Image, ImageDraw

    mask = np.zeros(shape, bool)
    for ring in rings:
        canvas = Image.new("1", (shape[1], shape[0]), 0)
        ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for x, y in ring], fill=1)
        mask ^= np.asarray(canvas, bool)
    return mask
