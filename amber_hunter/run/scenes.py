"""Scenes: the tiles of one scene cell stitched into one georeferenced RGB image.

The study segmented ~1000 px scenes, not 256 px tiles, so tiles are fetched and stitched per
:class:`~amber_hunter.geo.tiles.SceneCell`. Loading a scene never raises for bad data: coverage gaps,
blank "no data" tiles and broken tiles are everyday events in a night-long scan, so each becomes
an outcome the run records (no-imagery, skipped or failed) before moving on to the next scene.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import AmberHunterError, ImageError, RunStoreError
from ..geo.tiles import Bounds, SceneCell
from ..images import decode_rgb
from ..sources.fetch import TileSource

TILE_SIZE = 256
#: A tile whose every channel spans at most this many grey levels carries no imagery: providers
#: fill gaps with flat white, black or grey tiles rather than answering 404.
UNIFORM_SPREAD = 2
#: A scene with more than this share of uniform tiles is mostly without data and is skipped.
MAX_UNIFORM_SHARE = 0.5

SceneStatus = Literal["ok", "no-imagery", "skipped", "failed"]


@dataclass(frozen=True)
class Scene:
    """One scene cell's stitched image (``status == "ok"``) or why there is none (``reason``).

    ``capture_date`` is the latest date any of its tiles reported: a scene is as recent as its
    newest imagery, and one date per scene is what the exports can show.
    """

    cell: SceneCell
    status: SceneStatus
    image: np.ndarray | None = None
    reason: str | None = None
    capture_date: dt.date | None = None

    @property
    def scene_id(self) -> str:
        return self.cell.scene_id

    @property
    def bounds(self) -> Bounds:
        return self.cell.bounds

    @property
    def m_per_px(self) -> float:
        return self.cell.m_per_px(TILE_SIZE)


def cell_from_id(scene_id: str) -> SceneCell:
    """The cell named by a :attr:`SceneCell.scene_id` (``"zoom/x0/y0/size"``), as the run store keeps it."""
    try:
        zoom, x0, y0, size = (int(part) for part in scene_id.split("/"))
    except ValueError:
        raise RunStoreError(f"scene id {scene_id!r} is not zoom/x/y/size; the run store is corrupt, start a new run directory") from None
    return SceneCell(zoom, x0, y0, size)


def _is_uniform(tile: np.ndarray) -> bool:
    flat = tile.reshape(-1, 3)
    return bool((flat.max(axis=0).astype(int) - flat.min(axis=0) <= UNIFORM_SPREAD).all())


def load_scene(cell: SceneCell, source: TileSource) -> Scene:
    """Fetch, decode and stitch the tiles of ``cell`` into a ``uint8 (size*256, size*256, 3)`` image.

    Any missing tile makes the scene "no-imagery" (a partial scene would segment differently from
    a whole one). A source or decoding error, or a tile of the wrong size, fails the scene with
    that error. Tiles are stitched into one preallocated array as they arrive, so a scene costs
    its own size in memory and no more.
    """
    side = cell.size * TILE_SIZE
    image = np.empty((side, side, 3), np.uint8)
    uniform, dates = 0, []
    for i, tile in enumerate(cell.tiles):
        name = f"tile {tile.z}/{tile.x}/{tile.y}"
        try:
            result = source.get(tile)
            if result.status == "missing":
                return Scene(cell, "no-imagery", reason=f"{name} has no imagery")
            pixels = decode_rgb(result.data, name=name)
        except AmberHunterError as exc:
            return Scene(cell, "failed", reason=str(exc))
        if pixels.shape[:2] != (TILE_SIZE, TILE_SIZE):
            error = ImageError(f"{name} is {pixels.shape[1]}x{pixels.shape[0]} px, expected {TILE_SIZE}x{TILE_SIZE}")
            return Scene(cell, "failed", reason=str(error))
        row, col = divmod(i, cell.size)
        image[row * TILE_SIZE:(row + 1) * TILE_SIZE, col * TILE_SIZE:(col + 1) * TILE_SIZE] = pixels
        uniform += _is_uniform(pixels)
        if result.capture_date is not None:
            dates.append(result.capture_date)
    date = max(dates, default=None)
    n = cell.size * cell.size
    if uniform > MAX_UNIFORM_SHARE * n:
        return Scene(cell, "skipped", reason=f"{uniform} of {n} tiles are blank or uniform (no data)", capture_date=date)
    return Scene(cell, "ok", image=image, capture_date=date)
