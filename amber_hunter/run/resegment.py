"""A scanned scene's superpixels again, from what the run stored, never from the network.

The scan stores each done scene's SLIC label map (``RunStore.segmentation``): a rescore outlines
the superpixels a new model makes positive from it, and a reader's report finds the superpixels
under it, without a tile or a second SLIC (:func:`scene_labels`). Runs scanned before label maps
were stored, and callers that need the pixels too (the explore app shows a superpixel in context;
``suggest`` cuts crops), segment the scene again from its stored tiles (:func:`resegment`): SLIC
is deterministic, so the same pixels and parameters give the scan's labels back exactly.

An HTTP source is read from the run's tile cache only: a pruned cache is said (a
:class:`SceneUnavailableError`), not silently refilled.
"""

from __future__ import annotations

import contextlib
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


def scene_labels(store: RunStore, scene_id: str, slic: SlicParams | None = None) -> np.ndarray:
    """The SLIC label map of the scene ``scene_id`` as the scan made it: the stored one, or for a
    run scanned before label maps were stored (or a damaged one), segmented again from the tiles
    with ``slic``, by default the run's model's settings (loaded only then)."""
    from ..errors import ImageError

    with contextlib.suppress(ImageError):  # a damaged map: the tiles give it back exactly
        stored = store.segmentation(scene_id)
        if stored is not None:
            return stored
    if slic is None:
        from ..model.classify import load_bundle, resolve_model

        slic = load_bundle(resolve_model(store.config.model)).slic_params()
    return resegment(store, scene_id, slic).labels
