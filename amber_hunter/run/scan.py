"""Region scan: every scene of an area through fetch → stitch → detect → store, resumably.

The loop is built for overnight runs on one machine. Scenes are fetched by a small thread pool a
few scenes ahead of the detector, so downloads overlap with computing, but never more than
``workers + 1`` scenes are held at once: memory does not grow with the region. Each scene is
committed as soon as it is done, so a kill loses only the scenes in flight, and a rerun of the
same command picks up the pending ones. The first Ctrl-C lets the scene in flight finish and
stops; a second one stops at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import AmberHunterError
from ..geo.tiles import Bounds, SceneCell, scene_grid
from ..model.segment import Region
from ..sources.fetch import CachedTileSource, TileSource, open_source
from .config import RunConfig
from .scenes import Scene, cell_from_id, load_scene
from .store import RegionRecord, RunStatus, RunStore, SceneRecord

log = logging.getLogger(__name__)

#: Outlines are simplified to within this many pixels (~0.4 m at zoom 18): plenty for a map.
SIMPLIFY_PX = 1.0
#: Longest side of the overlay picture kept per flagged scene for the map's popups.
OVERLAY_PX = 512


class Progress(Protocol):
    """What a scan reports progress to; a ``tqdm`` bar is one."""

    def update(self, n: int = 1) -> object: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ScanSummary:
    """What one call of :func:`scan` did (``processed`` scenes) and where the run stands now."""

    run_dir: Path
    processed: int
    status: RunStatus
    interrupted: bool
    seconds: float


# --- per scene ---------------------------------------------------------------------------------


def region_outline(region: Region, cell: SceneCell) -> dict:
    """A superpixel's outline as a GeoJSON Polygon in lon/lat (exterior ring only, counter-clockwise).

    The contour runs along pixel edges (level 0.5 between inside and outside pixel centres), so
    pixel index ``i`` of the padded mask sits at continuous coordinate ``i - 1 + 0.5`` of the crop.
    """
    from skimage.measure import approximate_polygon, find_contours

    contour = max(find_contours(np.pad(region.mask, 1).astype(np.float32), 0.5), key=len)
    simplified = approximate_polygon(contour, SIMPLIFY_PX)
    ring = simplified if len(simplified) >= 4 else contour
    r0, c0 = region.bbox[:2]
    lon, lat = cell.pixel_to_lonlat(ring[:, 0] + r0 - 0.5, ring[:, 1] + c0 - 0.5)
    x, y = np.round(lon, 7), np.round(lat, 7)
    if np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]) < 0:  # shoelace: negative means clockwise
        x, y = x[::-1], y[::-1]
    return {"type": "Polygon", "coordinates": [np.column_stack([x, y]).tolist()]}


def _region_record(region: Region, probability: float, positive: bool, cell: SceneCell, m_per_px: float) -> RegionRecord:
    r0, c0, r1, c1 = region.bbox
    (west, east), (north, south) = cell.pixel_to_lonlat(np.array([r0, r1]), np.array([c0, c1]))
    return RegionRecord(
        label=region.label,
        probability=float(probability),
        positive=positive,
        area_m2=round(region.area_px * m_per_px**2, 3),
        bbox=Bounds(float(west), float(south), float(east), float(north)),
        polygon=region_outline(region, cell) if positive else None,
    )


def _thumbnail(image: np.ndarray) -> np.ndarray:
    from PIL import Image

    picture = Image.fromarray(image)
    picture.thumbnail((OVERLAY_PX, OVERLAY_PX), Image.Resampling.LANCZOS)
    return np.asarray(picture)


def analyse(scene: Scene, detector) -> SceneRecord:
    """Detect mining in a loaded scene and gather everything the store keeps about it."""
    from ..model.detect import overlay

    if scene.status != "ok":
        return SceneRecord(scene.scene_id, scene.status, scene.bounds, error=scene.reason, capture_date=scene.capture_date)
    m_per_px = scene.m_per_px
    try:
        detection = detector.run(scene.image, m_per_px)
    except AmberHunterError as exc:
        return SceneRecord(scene.scene_id, "failed", scene.bounds, error=str(exc), capture_date=scene.capture_date)
    result, seg = detection.result, detection.segmentation
    positive = set(result.positive_labels)  # aggregate's decision, not a second one on rounded values
    regions = tuple(
        _region_record(region, p, region.label in positive, scene.cell, m_per_px)
        for region, p in zip(seg.regions, result.probabilities)
    )
    return SceneRecord(
        scene.scene_id,
        "done",
        scene.bounds,
        capture_date=scene.capture_date,
        result=result,
        regions=regions,
        embeddings=detection.features,
        embedder=detector.embedder.name,
        overlay=_thumbnail(overlay(scene.image, seg, result)) if result.flagged else None,
    )


# --- the loop ----------------------------------------------------------------------------------


def prefetch(cells: Iterable[SceneCell], source: TileSource, workers: int) -> Iterator[Scene]:
    """Load scenes in a pool of ``workers`` threads, yielding them in order.

    At most ``workers`` scenes are being fetched or waiting while the caller works on the one it
    was given, so memory is bounded by ``workers + 1`` scenes whatever the number of cells.
    """
    with ThreadPoolExecutor(workers, thread_name_prefix="amber-fetch") as pool:
        window = deque()
        try:
            for cell in cells:
                window.append(pool.submit(load_scene, cell, source))
                if len(window) > workers:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for future in window:
                future.cancel()


def open_tiles(config: RunConfig, store: RunStore) -> TileSource:
    """The config's tile source; HTTP sources go through the on-disk tile cache."""
    source = open_source(config.tiles, max_rps=config.max_rps, api_key_env=config.api_key_env, date_header=config.date_header)
    if config.is_http:
        return CachedTileSource(source, config.tile_cache or store.tile_cache_dir)
    return source


@contextlib.contextmanager
def _logging_to(path: Path) -> Iterator[None]:
    """Send the package's log records to the run's log file for the duration of the scan."""
    package = logging.getLogger("amber_hunter")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    level = package.level
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)
        handler.close()


@contextlib.contextmanager
def _stop_request() -> Iterator[threading.Event]:
    """An event the first Ctrl-C sets (the loop stops after the scene in flight); a second Ctrl-C
    raises KeyboardInterrupt at once. Signal handlers only exist in the main thread; elsewhere
    Ctrl-C keeps its default behaviour."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log.warning("interrupt: stopping after the scene in flight (press Ctrl-C again to stop now)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def scan(
    config: RunConfig,
    run_dir: str | Path,
    *,
    force: bool = False,
    retry_failed: bool = False,
    progress: Callable[[int], Progress] | None = None,
) -> ScanSummary:
    """Scan ``config.area`` into ``run_dir``, resuming whatever an earlier call left pending.

    Scenes that failed in an earlier session are done again only with ``retry_failed``, so that a
    plain resume never hammers a source that refuses some tiles for good.

    ``progress`` is called once with the number of pending scenes and must return something with
    ``update()`` and ``close()`` (e.g. ``lambda total: tqdm(total=total, unit="scene")``).
    """
    from ..model.detect import Detector

    started = time.monotonic()
    processed, interrupted = 0, False
    with RunStore(run_dir, config, force=force) as store, _logging_to(store.log_path):
        # The model and the source are checked before any scene is fetched: a typo must fail now,
        # not after a night of failed scenes.
        detector = Detector.load(config.model, min_positive=config.min_positive)
        with open_tiles(config, store) as source, _stop_request() as stop:
            source.check_zoom(config.zoom)
            store.add_scenes(scene_grid(config.area, config.zoom, config.scene_tiles))
            if retry_failed:
                log.info("requeued %d failed scenes", store.retry_failed())
            total = store.status().pending
            log.info("scan %s: %d scenes pending, tiles from %s, model %s", store.run_dir, total, source.describe(),
                     config.model or "default")
            bar = progress(total) if progress else None
            try:
                for scene in prefetch((cell_from_id(i) for i in store.pending()), source, config.workers):
                    record = analyse(scene, detector)
                    store.record(record)
                    processed += 1
                    if record.status != "done":
                        log.info("scene %s %s: %s", record.scene_id, record.status, record.error)
                    elif record.result.flagged:
                        log.info("scene %s flagged: %d positive superpixels", record.scene_id, record.result.n_positive)
                    if bar:
                        bar.update()
                    if stop.is_set():
                        interrupted = True
                        break
            finally:
                if bar:
                    bar.close()
        status = store.status()
        store.note("stop", f"{'interrupted' if interrupted else 'finished'} after {processed} scenes")
        log.info("%s after %d scenes: %d done, %d failed, %d pending, %d flagged", "interrupted" if interrupted else "finished",
                 processed, status.done, status.failed, status.pending, status.flagged)
    return ScanSummary(Path(run_dir), processed, status, interrupted, time.monotonic() - started)
