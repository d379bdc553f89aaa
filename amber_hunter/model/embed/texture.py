"""Texture embedder: fast hand-made colour, texture and pit-shape features of each superpixel.

Amber mining shows as clusters of small round pits, 2-6 m across (about 5-16 px at the imagery's
0.38 m/px), dark holes ringed by bright dug-up sand, on fields or in forest. These features
describe exactly that, cheaply enough to embed a whole scene in a fraction of a second on one core:

* colour as chromaticity (band shares, excess green, saturation): what the ground is, largely
  independent of exposure;
* brightness relative to the region's own median and spread: bright sand patches and dark holes
  stand out whatever the season or sun;
* difference-of-Gaussian blob responses at the pit scales, dark and bright, as strengths and as
  counts of distinct blobs, plus dark blobs sitting next to bright sand;
* gradient strength and structure-tensor coherence: roads, field rows and forest edges are linear,
  pits are not.

Two rules keep detection consistent with training, where each labelled crop *is* the bounding box
of one superpixel embedded whole. Features are pooled over each region's bbox, not its mask, and
the image is never resized, so blob scales stay in metres. Filters run once over the whole image
and each region only slices the response maps: a scene's ~30 regions share the work. Every texture
response is divided by the region's own luminance spread before pooling (filters are linear, so
this equals filtering a standardised crop), which makes the features independent of contrast and
exposure, and the same whether a region is embedded alone or inside its scene (up to the few
pixels at the bbox edge, where the scene's filters also see the neighbours).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from ..segment import Region
from .base import empty

#: Gaussian scales (px) whose consecutive differences are the blob filters. A DoG between sigma
#: and 1.6*sigma responds most to blobs about 3.6*sigma across, so these cover ~5-22 px: single
#: pits (5-16 px) and pairs of merged ones.
BLOB_SIGMAS = (1.5, 2.4, 3.84, 6.14, 9.83)
#: Blob strengths, in units of the region's luminance spread, counted as "distinct" blobs.
BLOB_THRESHOLDS = (0.5, 1.0, 2.0)
#: Roundness (smaller over larger curvature) above which a dark blob counts as a round pit.
ROUND = 0.5
#: Brightness thresholds, in units of the region's luminance spread above/below its median.
BRIGHT_STEPS = (1.0, 2.0, 4.0)
#: Quantiles of the colour maps.
QUANTILES = (0.1, 0.5, 0.9)
#: Integration windows of the structure tensor, in samples of the 2x grid: ~14 px, a few pit
#: diameters, so a field row or road reads as one orientation while a pit field reads as many;
#: then a further ~26 px (~40 px in all) for long straight features such as roads and ditches.
TENSOR_WINDOW = 7
WIDE_TENSOR_WINDOW = 13
#: Coherence levels counted as "linear" texture.
COHERENT = (0.4, 0.6, 0.8)
#: Gaussian levels from this sigma (px) on are computed on a 2x decimated grid.
DECIMATE_SIGMA = 3.5
#: Radius (px) around a dark blob searched for a bright sand rim.
RIM_RADIUS = 6
#: Blobs are counted per this many pixels of bbox, so counts compare across region sizes.
PER_PIXELS = 10_000.0
#: Floor of the luminance spread (grey levels), so flat regions (snow, water) don't blow up.
MIN_SPREAD = 2.0
#: Images are edge-padded to at least this side: the filters need a few pixels to work on.
MIN_SIDE = 4

_EPS = np.float32(1e-6)


class TextureEmbedder:
    """Colour, relative brightness, blob and orientation statistics pooled over each region's bbox.

    The embedder has no options: its scales are tied to the study's imagery (0.38 m/px) and
    changing them would silently change what a trained model sees. ``feature_names`` labels the
    columns of :meth:`embed` for inspection and feature-importance reports.
    """

    name = "texture"
    version = "1"
    kind = "handmade"

    def __init__(self) -> None:
        self.feature_names = _feature_names()
        self.dim = len(self.feature_names)

    @property
    def params(self) -> dict:
        return {}

    def embed(self, image: np.ndarray, regions: Sequence[Region]) -> np.ndarray:
        """Return ``float32 (len(regions), dim)`` features for ``regions`` of RGB ``uint8`` ``image``."""
        if len(regions) == 0:
            return empty(self.dim)
        h, w = image.shape[:2]
        # Padding at the far ends keeps every bbox where it was.
        image = np.pad(image, ((0, max(MIN_SIDE - h, 0)), (0, max(MIN_SIDE - w, 0)), (0, 0)), mode="edge")
        maps = _Maps(image)
        out = np.stack([maps.pool(region.bbox) for region in regions])
        # Every ratio is guarded, but XGBoost and the cache must never see a NaN, whatever the input.
        return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def _feature_names() -> list[str]:
    """Column names, in the order :meth:`_Maps.pool` writes them."""
    colours = ("red_share", "green_share", "excess_green", "saturation")
    names = [f"{m}_q{int(q * 100)}" for m in colours for q in QUANTILES]
    names += ["lum_q10", "lum_q50", "lum_q90", "lum_spread_ratio"]
    names += [f"bright_frac_{k:g}" for k in BRIGHT_STEPS] + [f"dark_frac_{k:g}" for k in BRIGHT_STEPS]
    names += ["sand_frac"]
    for s in BLOB_SIGMAS[:-1]:
        tag = f"s{s:g}"
        names += [f"dark_blob_mean_{tag}", f"bright_blob_mean_{tag}"]
        names += [f"dark_blob_frac_{tag}", f"bright_blob_frac_{tag}"]
        names += [f"dark_blob_count_{tag}_t{t:g}" for t in BLOB_THRESHOLDS]
        names += [f"bright_blob_count_{tag}_t{t:g}" for t in BLOB_THRESHOLDS]
        names += [f"rimmed_pit_count_{tag}", f"round_pit_count_{tag}", f"pit_roundness_{tag}"]
    names += ["gradient_mean", "gradient_q90"]
    for window in (2 * TENSOR_WINDOW, 2 * (TENSOR_WINDOW + WIDE_TENSOR_WINDOW)):
        names += [f"coherence_weighted_w{window}", f"coherence_mean_w{window}"]
        names += [f"coherent_frac_w{window}_c{c:g}" for c in COHERENT]
    names += ["bbox_anisotropy"]
    return names


class _Maps:
    """Per-pixel maps of one image, computed once; :meth:`pool` turns a bbox into a feature row."""

    def __init__(self, image: np.ndarray):
        red, green, blue = (image[..., i].astype(np.float32) for i in range(3))
        total = red + green + blue + _EPS
        top = np.maximum(np.maximum(red, green), blue)
        bottom = np.minimum(np.minimum(red, green), blue)
        saturation = (top - bottom) / (top + _EPS)
        # Colour maps as uint8 so that per-region quantiles are one bincount each.
        self.colour = [
            (_to_u8(red / total, 0.0, 1.0), 0.0, 1.0),
            (_to_u8(green / total, 0.0, 1.0), 0.0, 1.0),
            (_to_u8((2 * green - red - blue) / total, -1.0, 1.0), -1.0, 1.0),
            (_to_u8(saturation, 0.0, 1.0), 0.0, 1.0),
        ]
        lum = 0.299 * red + 0.587 * green + 0.114 * blue
        self.lum_u8 = np.clip(np.rint(lum), 0, 255).astype(np.uint8)
        # Sand: bright spots are only sand if they are not green or strongly coloured.
        self.greyish = saturation < 0.25

        levels, self.blobs = _blob_scales(lum)
        # The brightest smoothed pixel near each point (on the 2x grid, plenty for a max): high
        # around a pit means a ring of dug-up sand.
        self.rim = ndimage.maximum_filter(levels[1][::2, ::2], size=RIM_RADIUS + 1)

        # Gradients of the finest blur, which already suppresses pixel noise.
        gy, gx = np.gradient(levels[0])
        self.gradient = np.hypot(gx, gy)
        self.products = (gx * gx, gy * gy, gx * gy)
        # Box-averaged structure tensor: its coherence is ~1 on linear texture, ~0 on isotropic.
        # It varies slowly, so it lives on the 2x grid, where the box filters cost a quarter.
        tensor = [ndimage.uniform_filter(_halve(p), TENSOR_WINDOW) for p in self.products]
        wide = [ndimage.uniform_filter(j, WIDE_TENSOR_WINDOW) for j in tensor]
        self.coherence = [_Coherence(*tensor), _Coherence(*wide)]

    def pool(self, bbox: tuple[int, int, int, int]) -> np.ndarray:
        """The feature row of the region whose bbox is ``bbox``, in ``_feature_names`` order."""
        r0, c0, r1, c1 = bbox
        box = (slice(r0, r1), slice(c0, c1))
        n = float((r1 - r0) * (c1 - c0))
        feats: list[float] = []

        for u8, lo, hi in self.colour:
            feats += [lo + (hi - lo) * v / 255.0 for v in _u8_quantiles(u8[box], QUANTILES)]

        lum = self.lum_u8[box]
        q10, q25, median, q75, q90 = _u8_quantiles(lum, (0.1, 0.25, 0.5, 0.75, 0.9))
        # A robust standard deviation: sand, pits or a road in the bbox don't inflate it.
        spread = max((q75 - q25) / 1.349, MIN_SPREAD)
        feats += [q10 / 255.0, median / 255.0, q90 / 255.0]
        feats.append(spread / (median + 1.0))
        feats += [float(np.count_nonzero(lum > median + k * spread)) / n for k in BRIGHT_STEPS]
        feats += [float(np.count_nonzero(lum < median - k * spread)) / n for k in BRIGHT_STEPS]
        feats.append(float(np.count_nonzero((lum > median + spread) & self.greyish[box])) / n)

        per_px = PER_PIXELS / n
        for blob in self.blobs:
            d = blob.window(bbox) / spread
            dark_part = np.maximum(d, 0)
            # Mean dark and bright parts, and the area of strong (one spread) responses of each.
            feats += [float(dark_part.mean()), float((dark_part - d).mean())]
            feats += [float(np.count_nonzero(d > 1.0)) / d.size, float(np.count_nonzero(d < -1.0)) / d.size]
            in_box = blob.dark.within(bbox)
            dark = blob.dark.values[in_box]
            bright = blob.bright.values[blob.bright.within(bbox)]
            feats += [float(np.count_nonzero(dark > t * spread)) * per_px for t in BLOB_THRESHOLDS]
            feats += [float(np.count_nonzero(bright > t * spread)) * per_px for t in BLOB_THRESHOLDS]
            # Pits: distinct dark blobs of at least one spread; rimmed if sand lies next to them.
            pits = in_box & (blob.dark.values > spread)
            rims = self.rim[blob.dark.rows[pits] // 2, blob.dark.cols[pits] // 2]
            feats.append(float(np.count_nonzero(rims > median + spread)) * per_px)
            roundness = blob.dark.roundness[pits]
            feats.append(float(np.count_nonzero(roundness > ROUND)) * per_px)
            feats.append(float(roundness.mean()) if roundness.size else 0.0)

        # Edge density; then how linear the texture is, locally and over the whole bbox (a single
        # road or field-row direction), from the summed gradient outer products.
        grad = self.gradient[box] / spread
        feats += [float(grad.mean()), float(np.quantile(grad[::2, ::2], 0.9))]
        for coherence in self.coherence:
            feats += coherence.pool(bbox)
        jxx, jyy, jxy = (float(p[box].sum()) for p in self.products)
        feats.append(np.sqrt((jxx - jyy) ** 2 + 4 * jxy * jxy) / (jxx + jyy + 1e-6))
        return np.asarray(feats, np.float32)


class _Coherence:
    """Structure-tensor coherence over one window, on the 2x grid."""

    def __init__(self, jxx: np.ndarray, jyy: np.ndarray, jxy: np.ndarray):
        self.energy = jxx + jyy
        # Coherence times energy: its bbox sum over the energy's is the energy-weighted coherence.
        self.oriented = np.sqrt((jxx - jyy) ** 2 + 4 * jxy * jxy)
        self.coherence = self.oriented / (self.energy + _EPS)

    def pool(self, bbox: tuple[int, int, int, int]) -> list[float]:
        """Energy-weighted and plain mean coherence, and the share of samples above each level."""
        box = _window(bbox, 2)
        coherence = self.coherence[box]
        feats = [float(self.oriented[box].sum()) / (float(self.energy[box].sum()) + 1e-6), float(coherence.mean())]
        return feats + [float(np.count_nonzero(coherence > c)) / coherence.size for c in COHERENT]


class _BlobScale:
    """One difference-of-Gaussians response, sampled every ``step`` px, and its peaks."""

    def __init__(self, dog: np.ndarray, step: int):
        self.dog, self.step = dog, step
        # Positive where the centre is darker than its surround: dark blobs (pits) are positive.
        self.dark = _peaks(dog, step)
        self.bright = _peaks(dog, step, sign=-1)

    def window(self, bbox: tuple[int, int, int, int]) -> np.ndarray:
        return self.dog[_window(bbox, self.step)]


def _blob_scales(lum: np.ndarray) -> tuple[list[np.ndarray], list[_BlobScale]]:
    """The Gaussian levels of ``lum`` at ``BLOB_SIGMAS`` and the DoG between neighbouring levels.

    Each level blurs the previous one by the missing amount, and levels from ``DECIMATE_SIGMA``
    on live on a 2x decimated grid (SIFT's octaves): they hold nothing finer, and the wide
    filters cost a quarter as much there. Pits only need a blob's count and strength, not its
    position to the pixel.
    """
    level = ndimage.gaussian_filter(lum, BLOB_SIGMAS[0], truncate=3.0)
    levels, scales, step = [level], [], 1
    for sigma, wider in itertools.pairwise(BLOB_SIGMAS):
        if step == 1 and sigma >= DECIMATE_SIGMA:
            level, step = level[::2, ::2], 2
        nxt = ndimage.gaussian_filter(level, np.sqrt(wider**2 - sigma**2) / step, truncate=3.0)
        scales.append(_BlobScale(nxt - level, step))
        levels.append(nxt)
        level = nxt
    return levels, scales


class _Peaks:
    """Local maxima of a response map: positions and values, so regions can count them by bbox."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, roundness: np.ndarray):
        self.rows, self.cols, self.values, self.roundness = rows, cols, values, roundness

    def within(self, bbox: tuple[int, int, int, int]) -> np.ndarray:
        r0, c0, r1, c1 = bbox
        return (self.rows >= r0) & (self.rows < r1) & (self.cols >= c0) & (self.cols < c1)


def _peaks(response: np.ndarray, step: int, sign: int = 1) -> _Peaks:
    """Positive 3x3 local maxima of ``sign * response`` (sampled every ``step`` px), in
    full-resolution coordinates: one per distinct blob, not one per pixel. The outermost samples
    are skipped.

    Each peak also gets its roundness, the ratio of the smaller to the larger curvature of the
    response there (the Hessian's eigenvalues): ~1 for a round pit, ~0 for a ridge such as a
    track or a furrow, whose DoG maxima are elongated.

    This runs eight times per scene over maps of up to a megapixel, so it is written for speed
    without changing a result: the samples that beat their left and right neighbours are found
    first (a few per cent of the map), and only they are compared with the six above and below.
    ``sign`` -1 finds the bright blobs without negating the whole map.
    """
    width = response.shape[1]
    inner = response[1:-1, 1:-1]
    above = np.greater if sign > 0 else np.less
    at_least = np.greater_equal if sign > 0 else np.less_equal
    candidate = above(inner, 0)
    candidate &= at_least(inner, response[1:-1, :-2])
    candidate &= at_least(inner, response[1:-1, 2:])
    r, c = np.divmod(np.flatnonzero(candidate), max(width - 2, 1))
    r, c = r + 1, c + 1
    flat = response.ravel()  # gathering by flat index is several times cheaper than by (row, col)
    index = r * width + c

    def at(dr: int, dc: int) -> np.ndarray:
        values = flat[index + (dr * width + dc)]  # ``index`` as it is when called: after ``keep``, the peaks
        return values if sign > 0 else -values

    centre = at(0, 0)
    keep = np.ones(len(r), bool)
    for dr, dc in itertools.product((-1, 1), (-1, 0, 1)):
        keep &= centre >= at(dr, dc)
    r, c, index, centre = r[keep], c[keep], index[keep], centre[keep]
    dxx = 2 * centre - at(0, -1) - at(0, 1)
    dyy = 2 * centre - at(-1, 0) - at(1, 0)
    dxy = (at(1, 1) + at(-1, -1) - at(1, -1) - at(-1, 1)) / 4
    half_trace, half_gap = (dxx + dyy) / 2, np.sqrt(((dxx - dyy) / 2) ** 2 + dxy * dxy)
    roundness = np.clip(half_trace - half_gap, 0, None) / (half_trace + half_gap + _EPS)
    return _Peaks(r * step, c * step, centre, roundness)


def _window(bbox: tuple[int, int, int, int], step: int) -> tuple[slice, slice]:
    """The slices of a map sampled every ``step`` px that cover ``bbox``."""
    r0, c0, r1, c1 = bbox
    return slice(r0 // step, -(-r1 // step)), slice(c0 // step, -(-c1 // step))


def _halve(values: np.ndarray) -> np.ndarray:
    """Means of 2x2 blocks (an odd last row or column is averaged alone): the 2x grid.

    Written as two sums of row pairs rather than ``reshape(...).mean(axis=(1, 3))``: the same
    float32 additions in the same order, so the same values to the last bit, but for the sign of
    a zero (tests/test_embedders.py checks it), at a tenth of the time (1.2 ms against 11.6 ms a
    megapixel, three maps a scene). A map one block wide, which numpy sums in another order, is
    left to numpy: images are padded to ``MIN_SIDE`` px, so no scene or crop is one.
    """
    h, w = values.shape
    if h % 2 or w % 2:
        values = np.pad(values, ((0, h % 2), (0, w % 2)), mode="edge")
    if w <= 2:
        return values.reshape((h + 1) // 2, 2, 1, 2).mean(axis=(1, 3))
    top, bottom = values[0::2], values[1::2]
    return ((top[:, 0::2] + top[:, 1::2]) + (bottom[:, 0::2] + bottom[:, 1::2])) / np.float32(4)


def _to_u8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``values`` in ``[lo, hi]`` as 256 levels: fine enough for quantiles of colour ratios."""
    return np.clip(np.rint((values - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _u8_quantiles(values: np.ndarray, qs: Sequence[float]) -> list[float]:
    """Quantiles of a ``uint8`` array from its histogram: far cheaper than sorting."""
    cdf = np.cumsum(np.bincount(values.ravel(), minlength=256))
    return [float(np.searchsorted(cdf, q * cdf[-1])) for q in qs]
