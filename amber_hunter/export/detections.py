"""What an export shows, read from the run store once: flagged scenes, their positive superpixels
with both area figures and licence status, and the gaps in coverage.

Every writer (GeoJSON, CSV, GeoPackage, summary, map, PNG) works from these typed records, so the
figures agree across files and the run is read, and its imagery decoded, only once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..geo.tiles import Area, Bounds
from ..run.config import RunConfig
from ..run.scenes import TILE_SIZE, cell_from_id
from ..run.store import RunStatus, RunStore
from .area import disturbed_pixels, rasterise
from .imagery import open_offline, polygon_pixels, read_scene
from .registry import Registry

M2_PER_HA = 10_000.0


@dataclass(frozen=True)
class SuperpixelDetection:
    """A positive superpixel: ``area_m2`` is all of it (valid pixels), ``disturbed_m2`` the
    estimated disturbed ground inside it (None without imagery); ``licensed`` is None without a
    registry."""

    label: int
    probability: float | None
    area_m2: float
    disturbed_m2: float | None
    polygon: dict
    licensed: bool | None = None


@dataclass(frozen=True)
class SceneDetection:
    """A flagged scene and its positive superpixels."""

    scene_id: str
    bounds: Bounds
    capture_date: dt.date | None
    max_probability: float
    n_positive: int
    positive_area_m2: float
    valid_fraction: float | None
    scene_area_m2: float
    superpixels: tuple[SuperpixelDetection, ...]

    @property
    def centre(self) -> tuple[float, float]:
        """``(lat, lon)`` of the scene's middle: what a reader types into a map."""
        lon, lat = self.bounds.centre
        return lat, lon

    @property
    def year(self) -> str:
        return str(self.capture_date.year) if self.capture_date else "unknown"

    @property
    def disturbed_m2(self) -> float | None:
        values = [s.disturbed_m2 for s in self.superpixels]
        return None if not values or any(v is None for v in values) else float(sum(values))

    @property
    def unlicensed_m2(self) -> float | None:
        """Positive area outside every licensed area (None without a registry)."""
        if any(s.licensed is None for s in self.superpixels):
            return None
        return float(sum(s.area_m2 for s in self.superpixels if not s.licensed))

    @property
    def licence_status(self) -> str | None:
        """"licensed", "unlicensed" or "partly licensed" by its positive superpixels; None without
        a registry."""
        outside = self.unlicensed_m2
        if outside is None:
            return None
        if outside == 0:
            return "licensed"
        return "unlicensed" if all(not s.licensed for s in self.superpixels) else "partly licensed"


@dataclass(frozen=True)
class CoverageGap:
    """A scene of the area that was not analysed: ``status`` failed, no-imagery or skipped."""

    scene_id: str
    status: str
    reason: str | None
    bounds: Bounds


@dataclass(frozen=True)
class RunDetections:
    """Everything an export shows about one run."""

    name: str
    started: dt.date | None
    config: RunConfig
    status: RunStatus
    scenes: tuple[SceneDetection, ...]
    gaps: tuple[CoverageGap, ...]
    registry: Registry | None
    #: The run's identity for the browser's review marks: its name and the time of its first
    #: start. Not the model: a retrain must not hide the marks an editor has not sent yet.
    key: str = ""

    @property
    def area(self) -> Area:
        return self.config.area


#: Called with (scene id, image, valid mask, positive superpixel masks) for every done scene whose
#: imagery could be read; the map uses it to write its imagery and popup pictures.
SceneHook = Callable[[str, np.ndarray, "np.ndarray | None", list], None]


def footprint_m2(scene_id: str) -> float:
    """The ground area of a scene's whole footprint, in m² (at its centre latitude's scale)."""
    cell = cell_from_id(scene_id)
    return round((cell.size * TILE_SIZE * cell.m_per_px(TILE_SIZE)) ** 2, 1)


def collect(store: RunStore, registry: Registry | None = None, *, imagery: bool = True,
            on_scene: SceneHook | None = None) -> RunDetections:
    """Read the run: flagged scenes with both area figures, gaps, and (through ``on_scene``) the
    pixels of every done scene. ``imagery=False`` skips reading tiles (no pixel estimate)."""
    config = store.config
    source = open_offline(store) if imagery else None
    scenes, gaps = [], []
    try:
        for stored in store.scenes():
            cell = cell_from_id(stored.scene_id)
            if stored.status in ("failed", "no-imagery", "skipped"):
                gaps.append(CoverageGap(stored.scene_id, stored.status, stored.error, stored.bounds or cell.bounds))
                continue
            if stored.status != "done" or not (stored.flagged or on_scene):
                continue
            scene = read_scene(cell, source, config)
            regions = store.regions(stored.scene_id, positive_only=True) if stored.flagged else []
            masks = [rasterise(polygon_pixels(cell, r.polygon), scene.image.shape[:2]) for r in regions
                     if r.polygon] if scene is not None else []
            if scene is not None and on_scene is not None:
                on_scene(stored.scene_id, scene.image, scene.valid, masks)
            if not stored.flagged:
                continue
            disturbed = disturbed_pixels(scene.image, scene.valid) if scene is not None else None
            m2 = cell.m_per_px(TILE_SIZE) ** 2
            superpixels = tuple(
                SuperpixelDetection(
                    r.label, r.probability, r.area_m2,
                    None if disturbed is None else round(float((disturbed & mask).sum()) * m2, 3),
                    r.polygon, None if registry is None else registry.licensed(r.polygon))
                for r, mask in zip(regions, masks if masks else [None] * len(regions)))
            scenes.append(SceneDetection(
                stored.scene_id, stored.bounds or cell.bounds, stored.capture_date, stored.max_probability or 0.0,
                stored.n_positive or 0, stored.positive_area_m2 or 0.0, stored.valid_fraction,
                footprint_m2(stored.scene_id), superpixels))
    finally:
        if source is not None:
            source.close()
    starts = store.events("start")
    started = dt.datetime.fromtimestamp(starts[0].ts, dt.timezone.utc).date() if starts else None
    name = store.run_dir.resolve().name
    return RunDetections(name, started, config, store.status(), tuple(scenes), tuple(gaps), registry,
                         f"{name}:{starts[0].ts:.3f}" if starts else name)
