"""Scenes: the tiles of one scene cell stitched into one georeferenced RGB image and its validity mask.

The study segmented ~1000 px scenes, not 256 px tiles, so tiles are fetched and stitched per
:class:`~amber_hunter.geo.tiles.SceneCell`. Loading a scene never raises for bad data: coverage gaps,
blank "no data" tiles and broken tiles are everyday events in a night-long scan, so each becomes
an outcome the run records (no-imagery, skipped or failed) before moving on to the next scene.

Real tile servers mark the edge of their imagery in three ways: a missing tile (404/204), a flat
filler tile, and transparent pixels (alpha 0) inside a tile. All three become *invalid* pixels of
the scene's mask. Detection segments and measures the valid pixels only, so a scene at the edge of
the imagery is analysed for what it shows, and black filler never turns into superpixels.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import AmberHunterError, ConfigError, ImageError, RunAbortError, RunStoreError
from ..geo.tiles import Bounds, SceneCell, source_tiles
from ..images import decode_rgba
from ..sources import TileSource

#: The pixel scale every scene is analysed at: that of 256 px tiles at the scan's zoom, whatever
#: the source serves, so that ``--zoom 18`` means the same ground resolution on every source.
TILE_SIZE = 256
#: ``--tile-size`` values. "auto" takes 256 px tiles as they are and larger ones as high-DPI
#: ("@2x") copies of the same tile, scaled down; "512@2x" says so explicitly; "512" is a source of
#: 512 px tiles one zoom up (each covering 2x2 tiles of the scan's zoom at the same scale).
TILE_SIZES = ("auto", "256", "512", "512@2x")
#: A tile whose every channel spans at most this many grey levels carries no imagery: providers
#: fill gaps with flat white, black or grey tiles rather than answering 404.
UNIFORM_SPREAD = 2
#: The grid step (px) of the first, sparse look at a tile for :func:`_is_uniform`.
UNIFORM_SAMPLE = 16
#: A scene with less than this share of valid pixels is skipped: too little to segment like the
#: study's whole scenes. ``--min-valid`` overrides it.
MIN_VALID = 0.25

SceneStatus = Literal["ok", "no-imagery", "skipped", "failed"]


@dataclass(frozen=True)
class Scene:
    """One scene cell's stitched image (``status == "ok"``) or why there is none (``reason``).

    ``valid`` marks the pixels that hold imagery; invalid pixels of ``image`` are filled with the
    median colour of the valid ones, a neutral value for filters that look across the edge.
    ``capture_date`` is the latest date any of its tiles reported: a scene is as recent as its
    newest imagery, and one date per scene is what the exports can show.
    """

    cell: SceneCell
    status: SceneStatus
    image: np.ndarray | None = None
    reason: str | None = None
    capture_date: dt.date | None = None
    valid: np.ndarray | None = None

    @property
    def scene_id(self) -> str:
        return self.cell.scene_id

    @property
    def bounds(self) -> Bounds:
        return self.cell.bounds

    @property
    def m_per_px(self) -> float:
        return self.cell.m_per_px(TILE_SIZE)

    @property
    def valid_fraction(self) -> float | None:
        """Share of the scene's pixels that hold imagery (None when there is no image)."""
        if self.image is None:
            return None
        return 1.0 if self.valid is None else float(self.valid.mean())


def cell_from_id(scene_id: str) -> SceneCell:
    """The cell named by a :attr:`SceneCell.scene_id` (``"zoom/x0/y0/size"``), as the run store keeps it."""
    try:
        zoom, x0, y0, size = (int(part) for part in scene_id.split("/"))
    except ValueError:
        raise RunStoreError(f"scene id {scene_id!r} is not zoom/x/y/size; the run store is corrupt, start a new run directory") from None
    return SceneCell(zoom, x0, y0, size)


def check_tile_size(tile_size: str) -> None:
    if tile_size not in TILE_SIZES:
        raise ConfigError(f"tile size {tile_size!r} is not one of {', '.join(TILE_SIZES)}; "
                          "use --tile-size 512 for 512 px tiles one zoom up, 512@2x for high-DPI copies of 256 px tiles")


def zoom_up(tile_size: str) -> int:
    """How many zooms above the scan's the source's tiles are fetched from."""
    return 1 if tile_size == "512" else 0


def _spread(pixels: np.ndarray) -> int:
    """The largest range of grey levels of any channel of ``(N, 3)`` pixels."""
    return int((pixels.max(axis=0).astype(int) - pixels.min(axis=0)).max())


def _is_uniform(rgb: np.ndarray, valid: np.ndarray) -> bool:
    """Whether the valid pixels of a tile span at most ``UNIFORM_SPREAD`` grey levels in every
    channel (False when none is valid).

    Every tile of a scan is checked, and the full check (gathering the valid pixels, then a
    reduction along the short axis) cost a tenth of a second per scene. Imagery varies by more
    than that within a few pixels, so a sparse grid of pixels settles almost every real tile: a
    spread found there is a spread of the tile. Only a tile that looks flat on the grid pays for
    the full check, so the answer is always the full check's.
    """
    sample = rgb[::UNIFORM_SAMPLE, ::UNIFORM_SAMPLE][valid[::UNIFORM_SAMPLE, ::UNIFORM_SAMPLE]]
    if len(sample) and _spread(sample) > UNIFORM_SPREAD:
        return False
    pixels = rgb[valid]
    return bool(len(pixels)) and _spread(pixels) <= UNIFORM_SPREAD


def _to_scale(rgb: np.ndarray, valid: np.ndarray, native: int, tile_size: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A decoded tile at the scene's pixel scale: ``native`` px on a side.

    High-DPI tiles are averaged down in blocks; a block is valid only if all its pixels are, so
    the mask never claims imagery that was partly transparent.
    """
    h, w = rgb.shape[:2]
    factor = h // native if h == w and h % native == 0 else 0
    allowed = {"auto": (1, 2, 4), "256": (1,), "512": (1,), "512@2x": (2,)}[tile_size]
    if factor not in allowed:
        sizes = " or ".join(f"{native * f}x{native * f}" for f in allowed)
        raise ImageError(f"{name} is {w}x{h} px, expected {sizes}; set --tile-size to the source's tile size "
                         f"({', '.join(TILE_SIZES)})")
    if factor == 1:
        return rgb, valid
    blocks = rgb.reshape(native, factor, native, factor, 3).astype(np.float32).mean(axis=(1, 3))
    return np.rint(blocks).astype(np.uint8), valid.reshape(native, factor, native, factor).all(axis=(1, 3))


@dataclass(frozen=True)
class FetchedScene:
    """The raw tiles of one scene cell as the source answered, not yet decoded.

    Loading is split in two because the halves belong in different places: fetching waits on the
    network and runs in threads beside the one rate limiter and tile cache of the run, while
    decoding and stitching use a core each and run in the scan's worker processes.
    ``tiles`` holds ``(tile, row, col, result)`` in the order of :func:`source_tiles`; ``error``
    says why fetching failed (the scene then fails with it).
    """

    cell: SceneCell
    tiles: tuple = ()
    error: str | None = None
    seconds: float = 0.0


def fetch_scene(cell: SceneCell, source: TileSource, *, tile_size: str = "auto") -> FetchedScene:
    """Fetch the tiles of ``cell``. Whole-run failures (:class:`RunAbortError`) propagate; any
    other error becomes the scene's ``error``."""
    started = time.perf_counter()
    try:
        tiles = tuple((tile, row, col, source.get(tile)) for tile, row, col in source_tiles(cell, zoom_up(tile_size)))
    except RunAbortError:
        raise
    except Exception as exc:  # noqa: BLE001 - one bad scene never stops a night's run
        return FetchedScene(cell, error=scene_error(exc), seconds=time.perf_counter() - started)
    return FetchedScene(cell, tiles, seconds=time.perf_counter() - started)


def assemble_scene(fetched: FetchedScene, *, tile_size: str = "auto", min_valid: float = MIN_VALID) -> Scene:
    """Decode and stitch fetched tiles into a ``uint8 (size*256, size*256, 3)`` image.

    Missing tiles, blank filler tiles and transparent pixels are left out of the validity mask. A
    scene with no imagery at all is "no-imagery"; one with too little (``min_valid``) or only
    blank tiles is "skipped"; any error while fetching or decoding fails the scene with that
    error. Tiles are stitched into one preallocated array, so a scene costs its own size in memory.
    """
    cell = fetched.cell
    if fetched.error is not None:
        return Scene(cell, "failed", reason=fetched.error)
    native = TILE_SIZE << zoom_up(tile_size)  # source pixels per source tile at the scene's scale
    side = cell.size * TILE_SIZE
    image = np.zeros((side, side, 3), np.uint8)
    valid = np.zeros((side, side), bool)
    counts = {"missing": 0, "blank": 0}
    dates = []
    try:
        for tile, row, col, result in fetched.tiles:
            name = f"tile {tile.z}/{tile.x}/{tile.y}"
            if result.status == "missing":
                counts["missing"] += 1
                continue
            rgb, mask = _to_scale(*decode_rgba(result.data, name=name), native, tile_size, name)
            if _is_uniform(rgb, mask):
                counts["blank"] += 1
                continue
            # Where the tile lands on the scene canvas; a tile larger than the cell is cropped.
            r0, c0 = row * TILE_SIZE, col * TILE_SIZE
            rs, cs = slice(max(r0, 0), min(r0 + native, side)), slice(max(c0, 0), min(c0 + native, side))
            ts = (slice(rs.start - r0, rs.stop - r0), slice(cs.start - c0, cs.stop - c0))
            image[rs, cs] = rgb[ts]
            valid[rs, cs] = mask[ts]
            if result.capture_date is not None:
                dates.append(result.capture_date)
    except Exception as exc:  # noqa: BLE001 - one bad scene never stops a night's run
        return Scene(cell, "failed", reason=scene_error(exc))
    date = max(dates, default=None)
    fraction = float(valid.mean())
    n = len(fetched.tiles)
    if fraction == 0.0:
        if counts["blank"]:
            return Scene(cell, "skipped", reason=f"{counts['blank']} of {n} tiles are blank or uniform (no data)", capture_date=date)
        what = "no imagery" if counts["missing"] == n else "no imagery (transparent or missing tiles)"
        return Scene(cell, "no-imagery", reason=what, capture_date=date)
    if fraction < min_valid:
        return Scene(cell, "skipped", capture_date=date,
                     reason=f"only {fraction:.0%} of the scene has imagery, below --min-valid {min_valid:g}")
    if fraction < 1.0:
        image[~valid] = np.median(image[valid], axis=0).astype(np.uint8)
    return Scene(cell, "ok", image=image, capture_date=date, valid=None if fraction == 1.0 else valid)


def load_scene(cell: SceneCell, source: TileSource, *, tile_size: str = "auto", min_valid: float = MIN_VALID) -> Scene:
    """Fetch, decode and stitch the tiles of ``cell`` (:func:`fetch_scene`, then :func:`assemble_scene`)."""
    return assemble_scene(fetch_scene(cell, source, tile_size=tile_size), tile_size=tile_size, min_valid=min_valid)


def scene_error(exc: Exception) -> str:
    """A failed scene's error as one line: the package's own messages as they are, anything else
    (a bug, or an error a library raised that nobody foresaw) with its type, so it can be reported."""
    text = str(exc).replace("\n", " ").strip()
    return text if isinstance(exc, AmberHunterError) else f"{type(exc).__name__}: {text or 'no message'}"
