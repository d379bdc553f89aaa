"""The scanned scenes' pixels, read back at export time without touching the network.

The export needs them twice: the pixel-level damage estimate counts disturbed pixels inside each
positive superpixel, and the map shows the scenes themselves (downsampled) as an imagery layer,
so it has a background offline. Local sources (folders, MBTiles) are read as the scan read them;
an HTTP source is read from the run's tile cache only, never downloaded again: an export may run
on a laptop on a train, and a tile no longer cached just leaves that scene without imagery.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np

from ..errors import AmberHunterError
from ..geo.tiles import Bounds, SceneCell
from ..run.config import RunConfig
from ..run.resegment import stored_tiles
from ..run.scenes import Scene, load_scene
from ..run.store import RunStore
from ..sources import TileSource

log = logging.getLogger(__name__)

#: Side of a scene's picture in the map's imagery layer (px): 4x fewer than a 1024 px scene,
#: still ~1.5 m/px, enough to see a pit field and small enough for thousands of scenes.
IMAGERY_PX = 256
#: Longest side of the popup picture (px).
PICTURE_PX = 512
#: Opacity of the fill of a positive superpixel in the popup picture: light, so the pits show.
FILL_ALPHA = 0.18


def open_offline(store: RunStore) -> TileSource | None:
    """The run's tiles as they can be read now without a network (``run.resegment.stored_tiles``:
    the local source, or the HTTP source's cache). None (with a log line) if a local source has gone."""
    try:
        return stored_tiles(store)
    except AmberHunterError as exc:
        log.warning("export: the run's tiles %s cannot be opened (%s); the map has no imagery", store.config.tiles, exc)
        return None


def read_scene(cell: SceneCell, source: TileSource | None, config: RunConfig) -> Scene | None:
    """A scanned scene's stitched image, or None when its tiles are no longer available."""
    if source is None:
        return None
    scene = load_scene(cell, source, tile_size=config.tile_size, min_valid=1e-9)
    return scene if scene.status == "ok" else None


def polygon_pixels(cell: SceneCell, polygon: dict) -> list:
    """A GeoJSON Polygon's rings as ``[[col, row], ...]`` pixel rings of the scene."""
    rings = []
    for ring in polygon["coordinates"]:
        lon, lat = np.asarray(ring, float).T
        row, col = cell.lonlat_to_pixel(lon, lat)
        rings.append(np.column_stack([col, row]).tolist())
    return rings


def _resize(image: np.ndarray, longest: int) -> np.ndarray:
    from PIL import Image

    picture = Image.fromarray(image)
    picture.thumbnail((longest, longest), Image.Resampling.LANCZOS)
    return np.asarray(picture)


def imagery_jpeg(image: np.ndarray, valid: np.ndarray | None) -> bytes:
    """The scene for the map's imagery layer: ``IMAGERY_PX`` on a side, JPEG. Nodata is grey."""
    import io

    from PIL import Image

    if valid is not None:
        image = image.copy()
        image[~valid] = 128
    buf = io.BytesIO()
    Image.fromarray(_resize(image, IMAGERY_PX)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def picture(image: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
    """The popup picture: the scene with each positive superpixel outlined in red over a light
    red fill, so the pits inside stay visible (the scan's own overlay fills them opaquely)."""
    from skimage.segmentation import find_boundaries

    out = image.astype(np.float32)
    if masks:
        inside = np.logical_or.reduce(masks)
        out[inside] = (1 - FILL_ALPHA) * out[inside] + FILL_ALPHA * np.array([255, 0, 0], np.float32)
        scale = max(image.shape[:2]) / PICTURE_PX
        edge = np.zeros(inside.shape, bool)
        for mask in masks:
            edge |= find_boundaries(mask, mode="inner")
        if scale > 1:  # outlines that survive the downsampling: thicken by the scale factor
            from scipy import ndimage

            edge = ndimage.binary_dilation(edge, iterations=max(round(scale) - 1, 0)) if scale >= 1.5 else edge
        out[edge] = (255, 0, 0)
    return _resize(np.clip(out, 0, 255).astype(np.uint8), PICTURE_PX)


def copy_overlay(store: RunStore, scene_id: str, dest: Path) -> bool:
    """Fall back on the scan's stored overlay picture when the imagery is gone."""
    src = store.overlay_path(scene_id)
    with contextlib.suppress(OSError):
        dest.write_bytes(src.read_bytes())
        return True
    return False


def scene_bounds_list(b: Bounds) -> list[float]:
    """``[[south, west], [north, east]]`` flattened, rounded to ~1 cm, for the map's data."""
    return [round(b.south, 7), round(b.west, 7), round(b.north, 7), round(b.east, 7)]
