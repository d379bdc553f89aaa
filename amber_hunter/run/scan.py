"""Region scan: every scene of an area through fetch → stitch → detect → store, resumably.

The loop is built for overnight runs. Tiles are fetched by a small thread pool a few scenes
ahead; decoding, SLIC and the hand-made features run in ``--workers`` processes
(:mod:`.workers`), and the CNN in this process over several scenes at once; or whole scenes run
on a dask.distributed cluster (:mod:`.cluster`). Every queue is bounded, so memory does not grow
with the region, and this process is the run store's one writer. Each scene is committed as soon
as it is done, so a kill loses only the scenes in flight, and a rerun of the same command picks up
the pending ones. The first Ctrl-C stores the scene in hand and stops; a second one stops at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..errors import AmberHunterError, RunAbortError
from ..geo.tiles import Bounds, SceneCell, scene_grid
from ..model.segment import Region

if TYPE_CHECKING:  # scikit-image and XGBoost load with the detector, not with this module
    from ..model.detect import Prepared
from ..sources import CachedTileSource, TileSource, open_source
from .config import RunConfig
from .scenes import TILE_SIZE, FetchedScene, Scene, assemble_scene, cell_from_id, fetch_scene, scene_error, zoom_up
from .store import STAGES, RegionRecord, RunStatus, RunStore, SceneRecord, StageTimes, current_model_config

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
    #: The commonest reasons scenes of the run failed, with counts (see RunStore.failure_reasons).
    failures: list[tuple[str, int]] = field(default_factory=list)


# --- per scene ---------------------------------------------------------------------------------


def _ring(contour: np.ndarray, offset: tuple[int, int], cell: SceneCell, side: int, ccw: bool) -> list:
    """One closed contour of a crop as a lon/lat ring, simplified, inside the scene, wound ``ccw``."""
    import shapely

    # Douglas-Peucker, as skimage's approximate_polygon, but in GEOS: 70x faster, and a rescore
    # outlines every superpixel that turns positive (vertices differ from skimage's within 1 px).
    simplified = shapely.get_coordinates(shapely.simplify(shapely.linestrings(contour), SIMPLIFY_PX,
                                                          preserve_topology=False))
    ring = simplified if len(simplified) >= 4 else contour
    # Padded index i is crop pixel i - 1, and level 0.5 runs along pixel edges: edge coordinate i - 0.5.
    rows = np.clip(ring[:, 0] + offset[0] - 0.5, 0, side)
    cols = np.clip(ring[:, 1] + offset[1] - 0.5, 0, side)
    lon, lat = cell.pixel_to_lonlat(rows, cols)
    b = cell.bounds
    x, y = np.clip(np.round(lon, 7), b.west, b.east), np.clip(np.round(lat, 7), b.south, b.north)
    if (np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]) > 0) != ccw:  # shoelace: positive is counter-clockwise
        x, y = x[::-1], y[::-1]
    return np.column_stack([x, y]).tolist()


def region_outline(region: Region, cell: SceneCell) -> dict:
    """A superpixel's outline as a GeoJSON Polygon in lon/lat: its outer ring counter-clockwise,
    then one clockwise ring per hole (RFC 7946), every vertex inside the scene.

    A superpixel can wrap around another (a pond inside a pit field), and an outline without the
    hole would claim the inner one's ground too. The contour runs along pixel edges (level 0.5
    between inside and outside pixel centres) of the mask padded by one pixel.
    """
    from skimage.measure import find_contours

    contours = find_contours(np.pad(region.mask, 1).astype(np.float32), 0.5)
    areas = [abs(np.dot(c[:-1, 0], c[1:, 1]) - np.dot(c[1:, 0], c[:-1, 1])) / 2 for c in contours]
    outer = int(np.argmax(areas))
    side = cell.size * TILE_SIZE
    offset = region.bbox[:2]
    rings = [_ring(contours[outer], offset, cell, side, ccw=True)]
    # Other closed contours of a connected superpixel are its holes' edges; open or tiny ones are noise.
    rings += [_ring(c, offset, cell, side, ccw=False) for i, c in enumerate(contours)
              if i != outer and areas[i] >= 1.0 and np.allclose(c[0], c[-1])]
    return {"type": "Polygon", "coordinates": rings}


def _region_record(region: Region, probability: float | None, positive: bool, cell: SceneCell, m_per_px: float,
                   note: str | None = None) -> RegionRecord:
    r0, c0, r1, c1 = region.bbox
    (west, east), (north, south) = cell.pixel_to_lonlat(np.array([r0, r1]), np.array([c0, c1]))
    return RegionRecord(
        label=region.label,
        probability=probability,
        positive=positive,
        area_m2=round(region.area_px * m_per_px**2, 3),
        bbox=Bounds(float(west), float(south), float(east), float(north)),
        polygon=region_outline(region, cell) if positive else None,
        note=note,
    )


def _thumbnail(image: np.ndarray) -> np.ndarray:
    from PIL import Image

    picture = Image.fromarray(image)
    picture.thumbnail((OVERLAY_PX, OVERLAY_PX), Image.Resampling.LANCZOS)
    return np.asarray(picture)


def unanalysed(scene: Scene, timings: StageTimes | None = None) -> SceneRecord:
    """The record of a scene that has no image to analyse (no imagery, skipped, failed to load)."""
    return SceneRecord(scene.scene_id, scene.status, scene.bounds, error=scene.reason, capture_date=scene.capture_date,
                       valid_fraction=scene.valid_fraction, timings=timings)


def failed(scene: Scene, exc: Exception, timings: StageTimes | None = None) -> SceneRecord:
    """The record of a scene whose detection raised: its reason is kept, the run goes on."""
    return SceneRecord(scene.scene_id, "failed", scene.bounds, error=scene_error(exc), capture_date=scene.capture_date,
                       valid_fraction=scene.valid_fraction, timings=timings)


def conclude(scene: Scene, prepared: Prepared, features: np.ndarray, detector, model: str | None,
             timings: StageTimes) -> SceneRecord:
    """Classify a prepared scene from its full features and gather everything the store keeps.

    ``timings`` holds the stages before this one; the classifier, the outlines of the positive
    superpixels, the map picture and the packing of the label map are timed here as ``classify``.
    """
    from ..model.detect import MAX_NODATA, overlay
    from ..model.segment import pack_labels

    started = time.perf_counter()
    m_per_px = scene.m_per_px
    detection = detector.finish(prepared, features)
    result, seg = detection.result, detection.segmentation
    positive = set(result.positive_labels)  # aggregate's decision, not a second one on rounded values
    unscored = set(result.unscored_labels)
    note = f"crop more than {MAX_NODATA:.0%} nodata, not scored"
    regions = tuple(
        _region_record(region, p, region.label in positive, scene.cell, m_per_px,
                       note if region.label in unscored else None)
        for region, p in zip(seg.regions, result.probabilities)
    )
    picture = _thumbnail(overlay(scene.image, seg, result)) if result.flagged else None
    return SceneRecord(
        scene.scene_id,
        "done",
        scene.bounds,
        result=result,
        regions=regions,
        embeddings=detection.features,
        embedding_labels=tuple(detection.feature_labels),
        embedder=detector.embedder.name,
        overlay=picture,
        segmentation=pack_labels(seg.labels),
        model=model,
        capture_date=scene.capture_date,
        valid_fraction=scene.valid_fraction,
        timings=dataclasses.replace(timings, classify=time.perf_counter() - started),
    )


@dataclass(frozen=True)
class Outcome:
    """A scene after the stages that run one scene per core: either its finished ``record``, or
    the ``prepared`` scene waiting for the CNN, which runs over several scenes at once."""

    record: SceneRecord | None = None
    scene: Scene | None = None
    prepared: Prepared | None = None
    timings: StageTimes = field(default_factory=StageTimes)


def prepare_loaded(scene: Scene, detector, model: str | None, timings: StageTimes) -> Outcome:
    """SLIC and the hand-made features of a loaded scene; a texture-only model also classifies
    it here, so its scenes never wait for a CNN batch."""
    if scene.status != "ok":
        return Outcome(unanalysed(scene, timings))
    try:
        prepared = detector.prepare(scene.image, scene.m_per_px, scene.valid)
        timings = dataclasses.replace(timings, slic=prepared.slic_s, embed=prepared.handmade_s)
        if detector.needs_cnn:
            return Outcome(scene=scene, prepared=prepared, timings=timings)
        return Outcome(conclude(scene, prepared, detector.features([prepared])[0], detector, model, timings))
    except RunAbortError:
        raise
    except Exception as exc:  # noqa: BLE001 - one bad scene never stops a night's run
        return Outcome(failed(scene, exc, timings))


def prepare_fetched(fetched: FetchedScene, detector, model: str | None, *, tile_size: str, min_valid: float) -> Outcome:
    """Decode and stitch a fetched scene, then :func:`prepare_loaded`: the work of a scan's
    worker processes."""
    started = time.perf_counter()
    scene = assemble_scene(fetched, tile_size=tile_size, min_valid=min_valid)
    return prepare_loaded(scene, detector, model, StageTimes(fetch=fetched.seconds, decode=time.perf_counter() - started))


def finish_batch(outcomes: list[Outcome], detector, model: str | None) -> list[SceneRecord]:
    """The CNN over the superpixels of several prepared scenes at once, then each scene's verdict.

    The CNN's time is shared among the scenes by their number of superpixels. If the batch fails,
    its scenes are redone one by one, so only the scene at fault is recorded as failed.
    """
    started = time.perf_counter()
    try:
        features = detector.features([o.prepared for o in outcomes])
    except RunAbortError:
        raise
    except Exception as exc:  # noqa: BLE001 - one bad scene never stops a night's run
        if len(outcomes) > 1:
            return [record for o in outcomes for record in finish_batch([o], detector, model)]
        return [failed(outcomes[0].scene, exc, outcomes[0].timings)]
    seconds = time.perf_counter() - started
    total = sum(len(o.prepared.regions) for o in outcomes) or 1
    records = []
    for o, f in zip(outcomes, features):
        timings = dataclasses.replace(o.timings, embed=o.timings.embed + seconds * len(o.prepared.regions) / total)
        try:
            records.append(conclude(o.scene, o.prepared, f, detector, model, timings))
        except RunAbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad scene never stops a night's run
            records.append(failed(o.scene, exc, timings))
    return records


def analyse(scene: Scene, detector, model: str | None = None, timings: StageTimes | None = None) -> SceneRecord:
    """Detect mining in a loaded scene, all in this process, and gather what the store keeps.

    Any error while detecting fails this scene only, with its reason recorded: one odd scene must
    not stop a night's run. Whole-run failures (:class:`RunAbortError`) still stop it.
    """
    return finish_one(prepare_loaded(scene, detector, model, timings or StageTimes()), detector, model)


def finish_one(outcome: Outcome, detector, model: str | None) -> SceneRecord:
    """The record of one prepared scene: its own when preparing ended it, else after its CNN."""
    return outcome.record or finish_batch([outcome], detector, model)[0]


# --- the loop ----------------------------------------------------------------------------------


def prefetch(cells: Iterable[SceneCell], source: TileSource, threads: int, tile_size: str) -> Iterator[FetchedScene]:
    """Fetch the tiles of scenes in a pool of ``threads`` threads, yielding them in order.

    At most ``threads`` scenes are being fetched or waiting while the caller works on the one it
    was given, so memory is bounded whatever the number of cells. When the caller stops early (a
    second Ctrl-C, a whole-run error), the source is cancelled, so threads asleep in a retry
    back-off wake up at once, and the pool is left without waiting for them.
    """
    pool = ThreadPoolExecutor(threads, thread_name_prefix="amber-fetch")
    window: deque = deque()
    finished = False
    try:
        for cell in cells:
            window.append(pool.submit(fetch_scene, cell, source, tile_size=tile_size))
            if len(window) > threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
        finished = True
    finally:
        if not finished:
            source.cancel()
        pool.shutdown(wait=finished, cancel_futures=True)


def in_batches(outcomes: Iterable[Outcome], detector, model: str | None, scenes: int) -> Iterator[SceneRecord]:
    """Records from outcomes: finished ones as they come, prepared ones through the CNN ``scenes``
    at a time (:func:`finish_batch`)."""
    waiting: list[Outcome] = []
    for outcome in outcomes:
        if outcome.record is not None:
            yield outcome.record
            continue
        waiting.append(outcome)
        if len(waiting) >= scenes:
            yield from finish_batch(waiting, detector, model)
            waiting = []
    if waiting:
        yield from finish_batch(waiting, detector, model)


def open_tiles(config: RunConfig) -> TileSource:
    """The config's tile source, checked for the scan's zoom, without touching the run directory:
    a typo in ``--tiles`` must leave no run behind that the corrected command would then refuse."""
    source = open_source(config.tiles, max_rps=config.max_rps, api_key_env=config.api_key_env,
                         date_header=config.date_header, subdomains=config.subdomains, scheme=config.scheme)
    try:
        source.check_zoom(config.zoom - zoom_up(config.tile_size))
    except BaseException:
        source.close()
        raise
    return source


def cached(source: TileSource, config: RunConfig, store: RunStore) -> TileSource:
    """HTTP sources go through the on-disk tile cache (by default inside the run directory)."""
    if not config.is_http:
        return source
    return CachedTileSource(source, config.tile_cache or store.tile_cache_dir, max_bytes=config.tile_cache_max_bytes)


#: Prepared scenes that go through the CNN together: enough crops (~30 a scene) for full batches.
CNN_SCENES = 4


def fetch_threads(workers: int) -> int:
    """Threads fetching tiles: waiting on the network costs no core, so a few more than workers."""
    return workers + 2


@contextlib.contextmanager
def scene_records(config: RunConfig, store: RunStore, source: TileSource, detector) -> Iterator[Iterator[SceneRecord]]:
    """The records of the run's pending scenes, from where the config says to compute them.

    - ``workers == 1``: everything in this process.
    - ``workers > 1``: tiles fetched in threads here; decoding, SLIC and the hand-made features in
      worker processes (:class:`~.workers.ScenePool`); the CNN here, over several scenes at once.
    - ``cluster``: whole scenes on a dask.distributed cluster (:mod:`.cluster`); this process
      only writes the store.

    Whatever the source, records come back one per scene, and this process is the one writer.
    Leaving the context stops the fetch threads and worker processes at once.
    """
    ids = store.pending()
    if config.cluster:
        from .cluster import cluster_records, open_cluster

        with open_cluster(config.cluster) as client:
            records = cluster_records(client, ids, config, tile_cache=config.tile_cache or store.tile_cache_dir)
            with contextlib.closing(records):
                yield records
        return
    fetched = prefetch((cell_from_id(i) for i in ids), source, fetch_threads(config.workers), config.tile_size)
    with contextlib.closing(fetched), contextlib.ExitStack() as stack:
        if config.workers == 1:
            outcomes = (prepare_fetched(f, detector, config.model_hash, tile_size=config.tile_size,
                                        min_valid=config.min_valid) for f in fetched)
        else:
            from .workers import ScenePool

            outcomes = stack.enter_context(ScenePool(config)).outcomes(fetched, window=2 * config.workers + CNN_SCENES)
        records = in_batches(outcomes, detector, config.model_hash, CNN_SCENES)
        with contextlib.closing(records):
            yield records


def log_stage_times(status: RunStatus) -> None:
    """Where the run's time went, per stage, summed over its scenes (CPU-parallel stages can add up
    to more than the wall time)."""
    if not status.timed_scenes:
        return
    t = status.stage_seconds
    parts = ", ".join(f"{name} {getattr(t, name) / status.timed_scenes:.2f}" for name in STAGES)
    log.info("seconds per scene over %d scenes: %s", status.timed_scenes, parts)


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

    A scan refused before its first scene is recorded (a bad model or source, a server that never
    answers) leaves ``run_dir`` as it was: the model and the source are checked before the run
    directory is touched, and a run directory this call created is removed again. Otherwise the
    corrected command would be refused as a "changed config" of a run that never ran.
    """
    from ..model.detect import Detector

    started = time.monotonic()
    processed, interrupted = 0, False
    # Checked before any scene is fetched, and before the run directory exists: a typo must fail
    # now, leaving nothing behind, not after a night of failed scenes.
    config = current_model_config(run_dir, config)
    if config.cluster:  # the workers load the model and check it against the run's; not this process
        detector = None
    else:
        if config.workers > 1:
            from .workers import check_memory, start_server

            check_memory(config.workers)
            start_server()  # its imports overlap this process's loading of the model
        detector = Detector.load(config.model, min_positive=config.min_positive, allow_random=config.allow_random)
    created = not Path(run_dir).exists()
    try:
        with open_tiles(config) as raw, RunStore(run_dir, config, force=force) as store, \
                _logging_to(store.log_path), _stop_request() as stop:
            source = cached(raw, config, store)
            dropped = store.add_scenes(scene_grid(config.area, config.zoom, config.scene_tiles))
            if dropped:
                log.info("%d scenes of an earlier grid are dropped from this run", dropped)
            if retry_failed:
                log.info("requeued %d failed scenes", store.retry_failed())
            total = store.status().pending
            log.info("scan %s: %d scenes pending, tiles from %s, model %s", store.run_dir, total, source.describe(),
                     config.model or "default")
            bar = progress(total) if progress else None
            try:
                with scene_records(config, store, source, detector) as records:
                    for record in records:
                        store.record(record)
                        processed += 1
                        if record.status != "done":
                            log.info("scene %s %s: %s", record.scene_id, record.status, record.error)
                        elif record.result.flagged:
                            log.info("scene %s flagged: %d positive superpixels", record.scene_id,
                                     record.result.n_positive)
                        if bar:
                            bar.update()
                        if stop.is_set():
                            interrupted = True
                            break
            except RunAbortError as exc:
                store.note("abort", f"stopped after {processed} scenes: {exc}")
                log.error("stopped after %d scenes: %s", processed, exc)
                raise
            finally:
                if bar:
                    bar.close()
            status = store.status()
            log_stage_times(status)
            failures = store.failure_reasons()
            store.note("stop", f"{'interrupted' if interrupted else 'finished'} after {processed} scenes")
            log.info("%s after %d scenes: %d done, %d failed, %d pending, %d flagged",
                     "interrupted" if interrupted else "finished", processed, status.done, status.failed,
                     status.pending, status.flagged)
    except AmberHunterError:
        if created and processed == 0:  # a refused scan: nothing of this run is worth keeping
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return ScanSummary(Path(run_dir), processed, status, interrupted, time.monotonic() - started, failures)
