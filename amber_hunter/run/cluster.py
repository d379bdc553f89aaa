"""Region scans on a dask.distributed cluster, when one machine is not enough.

The driver (the machine running ``amber-hunter scan``) keeps the run store and is its only
writer: workers fetch, decode and detect, and send each scene's :class:`SceneRecord` back. So a
run scanned on a cluster is the same run directory as a local one, and resumes either way.

Each task carries a scene id and a small :class:`WorkerSetup` (the run's settings), never a
model: every worker process loads the tile source and the detector once, on its first scene of
a run, and keeps them for the next (:func:`process_scene`). At most ``in_flight`` scenes are
submitted at once, so neither the scheduler nor the driver holds the whole region, and results
are gathered as they complete, in any order.

A worker that dies mid-scene is not this module's business: the scheduler reschedules its tasks
on other workers. Only a scene whose worker died ``distributed.scheduler.allowed-failures + 1``
times (3 + 1 by default; a scene that eats all memory, say) comes back as a failed scene, with
that reason, so one poisonous scene cannot stop a night's run. Whole-run failures raised on a
worker (:class:`RunAbortError`: a refused API key, a full disk, a worker without the model) stop
the run as they do locally.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AmberHunterError, ClusterError, ConfigError, RunAbortError
from ..geo.tiles import Area
from ..sources import CachedTileSource, TileSource
from .config import MAX_WORKERS, RunConfig, model_hash
from .scenes import cell_from_id, fetch_scene, scene_error
from .store import SceneRecord

if TYPE_CHECKING:
    from distributed import Client, Future

    from ..model.detect import Detector

log = logging.getLogger(__name__)

#: Seconds to wait for the scheduler's answer: a wrong address must fail well within 10 s.
CONNECT_TIMEOUT = 8
#: Runs whose tile source and detector a worker process keeps loaded at once (two drivers may
#: share a cluster); the least recently used one is dropped beyond that.
MAX_RUNS_PER_WORKER = 2
#: How often the driver counts the cluster's threads again, to size its default window.
RECOUNT_SECONDS = 30

_TCP = re.compile(r"tcp://(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):(\d{1,5})")
_LOCAL = re.compile(r"local:(\d+)")


def local_workers(address: str) -> int | None:
    """The N of ``local:N``, None for ``tcp://HOST:PORT``; anything else is refused, so a typo
    fails before a run directory exists."""
    if (match := _LOCAL.fullmatch(address)) is not None:
        n = int(match.group(1))
        if not 1 <= n <= MAX_WORKERS:  # as for --workers
            raise ConfigError(f"--cluster {address}: a local cluster has 1 to {MAX_WORKERS} worker processes; "
                              "use e.g. --cluster local:2")
        return n
    if (match := _TCP.fullmatch(address)) is None or not 1 <= int(match.group(1)) <= 65535:
        raise ConfigError(f"--cluster {address!r} is neither tcp://HOST:PORT nor local:N; use e.g. "
                          "--cluster tcp://scheduler-host:8786 (the address 'dask scheduler' prints) or --cluster local:4")
    return None


@contextlib.contextmanager
def open_cluster(address: str) -> Iterator[Client]:
    """A client of the cluster at ``address`` for the ``with`` block.

    ``tcp://HOST:PORT`` connects to a running scheduler, giving up after :data:`CONNECT_TIMEOUT`
    seconds; ``local:N`` starts N single-threaded worker processes on this machine and stops them
    on exit. Neither becomes dask's default client: nothing else in the process is redirected.
    """
    n = local_workers(address)  # before importing distributed: a malformed address is refused at once
    from distributed import Client, LocalCluster

    if n is not None:
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster, set_as_default=False) as client:
            yield client
        return
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
    except OSError:  # distributed's connect timeout, a refused connection and an unknown host alike
        raise ClusterError(f"no dask scheduler answered at {address} within {CONNECT_TIMEOUT} s; start one there with "
                           "'dask scheduler', check the host, the port and the firewall, or use --cluster local:N") from None
    with client:
        if not client.nthreads():
            log.warning("the scheduler at %s has no workers yet; scenes wait until one joins ('dask worker %s')",
                        address, address)
        yield client


# --- worker side -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker needs to scan the scenes of one run, sent with each task (a few hundred bytes).

    ``config`` is the run's, with its area cut to the bounding box: workers never use the area,
    and a GeoJSON area's polygons would otherwise travel with every scene. ``tile_cache`` is the
    folder an HTTP source is cached in, as every worker sees it (None for local sources).
    """

    config: RunConfig
    tile_cache: str | None


def worker_setup(config: RunConfig, tile_cache: str | Path | None) -> WorkerSetup:
    """The setup of ``config``'s run; ``tile_cache`` counts for HTTP sources only, as in a local scan."""
    return WorkerSetup(replace(config, area=Area(config.area.bounds)),
                       str(tile_cache) if config.is_http and tile_cache is not None else None)


_loaded: dict[WorkerSetup, tuple[TileSource, Detector]] = {}
_loading = threading.Lock()


def _worker_name() -> str:
    from distributed import get_worker

    try:
        return f"worker {get_worker().address}"
    except ValueError:  # called outside a worker (a test, or the driver itself)
        return "this process"


def _load(setup: WorkerSetup) -> tuple[TileSource, Detector]:
    """Open the run's tile source and load its detector in this worker process.

    A worker that cannot do either would fail every scene it is given, so that is a
    :class:`ClusterError` naming the worker, which stops the run. The model is checked by its
    content: a different bundle at the same path on one machine would silently mix two models.
    """
    from ..model.detect import Detector
    from .scan import open_tiles

    config, where = setup.config, _worker_name()
    try:
        found = model_hash(config.model)
        if found != config.model_hash:
            raise ClusterError(f"{where}: the model {config.model or 'default'} there has hash {found}, the run's has "
                               f"{config.model_hash}; copy the run's model bundle to the same path on every worker machine")
        detector = Detector.load(config.model, min_positive=config.min_positive, allow_random=config.allow_random)
        source = open_tiles(config)
    except ClusterError:
        raise
    except AmberHunterError as exc:
        raise ClusterError(f"{where}: {exc} (every worker must reach the run's tile source and model at the same "
                           "path or URL as the driver)") from None
    if setup.tile_cache is not None:
        source = CachedTileSource(source, setup.tile_cache, max_bytes=setup.config.tile_cache_max_bytes)
    log.info("%s: model %s loaded, tiles from %s", where, config.model or "default", source.describe())
    return source, detector


def _tools(setup: WorkerSetup) -> tuple[TileSource, Detector]:
    """The tile source and detector of ``setup``'s run, loaded once per worker process.

    An evicted run's source is not closed: another thread of this worker may still be using it,
    and dropping the last reference closes its connections anyway.
    """
    with _loading:  # a worker with several threads still loads the model once
        tools = _loaded.pop(setup, None) or _load(setup)
        _loaded[setup] = tools  # most recently used last
        while len(_loaded) > MAX_RUNS_PER_WORKER:
            del _loaded[next(iter(_loaded))]
    return tools


def process_scene(scene_id: str, setup: WorkerSetup) -> SceneRecord:
    """One scene, fetched and analysed on a worker exactly as a local scan does it, with the time
    of each stage."""
    from .scan import finish_one, prepare_fetched  # here, so that scan.py may import this module at its top

    source, detector = _tools(setup)
    config = setup.config
    fetched = fetch_scene(cell_from_id(scene_id), source, tile_size=config.tile_size)
    outcome = prepare_fetched(fetched, detector, config.model_hash, tile_size=config.tile_size,
                              min_valid=config.min_valid)
    return finish_one(outcome, detector, config.model_hash)


# --- driver side -------------------------------------------------------------------------------


def _record(future: Future, scene_id: str) -> SceneRecord:
    """A finished task's record; a task that erred becomes a failed scene, unless the error is
    about the whole run."""
    from distributed import KilledWorker

    if future.status == "finished":
        return future.result()
    if future.status != "error":  # cancelled or lost: the scheduler restarted or the connection dropped
        raise ClusterError(f"the cluster lost scene {scene_id} ({future.status}): the scheduler restarted or the "
                           "connection to it dropped; rerun the same command to resume")
    exc = future.exception()
    if isinstance(exc, RunAbortError):
        raise exc
    if isinstance(exc, KilledWorker):
        tries = exc.allowed_failures + 1  # each on another worker
        reason = (f"the worker scanning it died, {tries} time{'s' if tries > 1 else ''} in a row (out of memory?); "
                  "see the worker logs, then retry with --retry-failed")
    else:
        reason = scene_error(exc)
    return SceneRecord(scene_id, "failed", cell_from_id(scene_id).bounds, error=reason)


def cluster_records(client: Client, scene_ids: Iterable[str], config: RunConfig, *, tile_cache: str | Path | None,
                    in_flight: int | None = None) -> Iterator[SceneRecord]:
    """Scan ``scene_ids`` on the cluster behind ``client``, yielding each scene's record as it
    completes (in any order), exactly once per scene.

    ``tile_cache`` is where workers cache an HTTP source's tiles (``config.tile_cache``, or the
    run's own cache folder): explore and rescore read tiles from there later, so it should be a
    folder the driver sees too. At most ``in_flight`` scenes are on the cluster at once; by
    default twice its worker threads (so no worker waits while the driver stores a record),
    counted again every :data:`RECOUNT_SECONDS` so that workers joining a running scan get work.
    Closing the iterator early (an interrupt, a whole-run error) cancels the scenes in flight.
    """
    from distributed import as_completed

    if in_flight is not None and in_flight < 1:
        raise ConfigError(f"in_flight={in_flight} must be at least 1")

    def limit() -> int:
        return in_flight or max(2, 2 * sum(client.nthreads().values()))

    setup = worker_setup(config, tile_cache)
    run = uuid.uuid4().hex[:12]  # two runs on one cluster may scan the same scene: their keys must differ
    ids = iter(scene_ids)
    pending: dict[str, tuple[Future, str]] = {}  # task key -> (its future, its scene id)
    completed = as_completed(loop=client.loop)  # the client is not dask's default one

    def submit_up_to(n: int) -> None:
        while len(pending) < n and (scene_id := next(ids, None)) is not None:
            future = client.submit(process_scene, scene_id, setup, key=f"amber-scene-{run}-{scene_id}", pure=False)
            pending[future.key] = future, scene_id
            completed.add(future)

    try:
        n, counted = limit(), time.monotonic()
        submit_up_to(n)
        for future in completed:
            _, scene_id = pending.pop(future.key)
            record = _record(future, scene_id)
            future.release()  # the worker may drop the result now
            if time.monotonic() - counted > RECOUNT_SECONDS:
                n, counted = limit(), time.monotonic()
            submit_up_to(n)  # before yielding: the cluster works while the driver stores
            yield record
    finally:
        if pending and client.status == "running":  # a closed client has dropped its futures already
            client.cancel([future for future, _ in pending.values()])
