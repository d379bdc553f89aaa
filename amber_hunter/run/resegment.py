"""A scanned scene segmented again, from the tiles the scan already has, never from the network.

The run stores each superpixel's probability, bbox and (for positives) outline, not the SLIC
label map: that would double a run's size for a picture few scenes ever need again. SLIC is
deterministic, so the label map comes back exactly from the same pixels and parameters. The
explore app needs it to show a superpixel in context; feedback needs it to find the superpixel
under a reader's point; a rescore needs it to outline a superpixel that has just become positive.

An HTTP source is read from the run's tile cache only: a pruned cache is said (a
:class:`SceneUnavailableError`), not silently refilled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SceneUnavailableError, TileSourceError
from ..model.segment import Region, SlicParams
from ..sources import CachedTileSource, TileSource, open_source
from .store import RunStore


@dataclass(frozen=True)
class Resegmented:
    """A scene's image, its SLIC label map and its superpixels by label, as the scan saw them."""

    image: np.ndarray
    labels: np.ndarray
    regions: dict[int, Region]


class _CacheOnly:
    """The 'network' behind a run's tile cache: it never fetches."""

    tile_size = None

    def get(self, tile):
        raise TileSourceError(f"tile {tile.z}/{tile.x}/{tile.y} is not in the run's tile cache")

    def describe(self) -> str:
        return "the run's tile cache only"

    def check_zoom(self, zoom: int) -> None:
        pass

    def cancel(self) -> None:
        pass

    def close(self) -> None:
        pass


def stored_tiles(store: RunStore) -> TileSource:
    """The run's tiles without the network: the source itself when it is local (a folder, an
    MBTiles file), else the run's tile cache."""
    config = store.config
    if not config.is_http:
        return open_source(config.tiles, scheme=config.scheme)
    return CachedTileSource(_CacheOnly(), config.tile_cache or store.tile_cache_dir)


def resegment(store: RunStore, scene_id: str, slic: SlicParams) -> Resegmented:
    """The scene ``scene_id`` stitched and segmented again exactly as the scan did."""
    from ..model.segment import segment
    from .scenes import cell_from_id, load_scene

    config = store.config
    with stored_tiles(store) as source:
        scene = load_scene(cell_from_id(scene_id), source, tile_size=config.tile_size, min_valid=config.min_valid)
    if scene.status != "ok":
        reason = scene.reason or scene.status
        if "not in the run's tile cache" in reason:
            reason = (f"the run's tile cache {config.tile_cache or store.tile_cache_dir} no longer holds this scene's "
                      "tiles (pruned by --tile-cache-max-gb?); they are not fetched again silently: fetch them back "
                      "with 'amber-hunter scan' over the scene's bounds into a new --run with the same --tile-cache, "
                      "or raise --tile-cache-max-gb")
        raise SceneUnavailableError(f"scene {scene_id}: {reason}")
    seg = segment(scene.image, slic, scene.valid)
    return Resegmented(scene.image, seg.labels, {r.label: r for r in seg.regions})
