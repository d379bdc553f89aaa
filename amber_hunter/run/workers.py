"""Worker processes of a scan on one machine: decoding, SLIC and hand-made features, one scene per core.

SLIC, PNG decoding and the texture features are single-threaded Python and numpy, so one process
uses one core; the CNN is multi-threaded already. A scan with ``--workers N`` therefore runs N
worker processes that turn fetched tiles into prepared scenes, while the main process fetches
(in threads, behind the run's one rate limiter and tile cache), runs the CNN over several scenes
at once and is the one writer of the run store.

Workers are started with ``spawn``, not ``fork``: the main process may hold TensorFlow's thread
pools, which a forked child would inherit in an undefined state. Each worker loads the model once,
in its initializer, without building the CNN (the embedder builds it lazily and only the main
process embeds with it). Workers ignore SIGINT, so the scan's own Ctrl-C handling (finish the
scene in flight, then stop) is not cut short by a KeyboardInterrupt in every child.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from ..errors import ConfigError, RunAbortError
from .config import MAX_WORKERS, RunConfig
from .scenes import FetchedScene

log = logging.getLogger(__name__)

#: Memory a worker process needs at its peak (imports, one 1024 px scene, its SLIC and features):
#: measured ~330 MB resident on the demo scenes, with headroom.
WORKER_MB = 500

#: How often a worker checks that its scan is still alive.
PARENT_POLL_S = 0.5

_detector = None  # the worker process's model, loaded once by _start
_settings: dict = {}


def available_mb() -> float | None:
    """Memory the system can give without swapping (``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def check_memory(workers: int) -> None:
    """Refuse a worker count the machine cannot hold: an out-of-memory kill mid-run is worse."""
    available = available_mb()
    if available is not None and workers * WORKER_MB > available:
        fit = max(1, int(available // WORKER_MB))
        raise ConfigError(f"--workers {workers} needs about {workers * WORKER_MB / 1024:.1f} GB, but only "
                          f"{available / 1024:.1f} GB is available; use --workers {fit} or fewer")


def default_workers() -> int:
    """Worker processes when ``--workers`` is not given: every core this process may use (its CPU
    affinity, which containers restrict), but no more than the limit of 64 and than free memory
    holds, so the plain command runs on a big node and on a laptop alike. Only a count the user
    asks for is refused (:func:`check_memory`)."""
    from ..model.embed.cnn import usable_cores  # here: the CNN module's imports wait for a scan

    cores = usable_cores()
    available = available_mb()
    fits = cores if available is None else max(1, int(available // WORKER_MB))
    n = max(1, min(cores, MAX_WORKERS, fits))
    if n < cores:
        log.info("using %d worker processes for %d cores (memory or the limit of %d)", n, cores, MAX_WORKERS)
    return n


def _exit_with(parent: int) -> None:
    """End this worker when the scan that started it is gone. A scan killed with ``kill -9`` cannot
    stop its workers; without this they would live on, holding its memory and its output pipes."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def _start(parent: int, model: str | None, min_positive: int, allow_random: bool, settings: dict) -> None:
    global _detector, _settings
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by ScenePool._submit until now
    # The scan's pid comes from the scan itself: if it died while this worker was starting, our
    # own getppid() would already name the process that adopted us.
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="amber-parent-watch").start()
    from ..model.detect import Detector

    _detector = Detector.load(model, min_positive=min_positive, allow_random=allow_random)
    _settings = settings


def _prepare(fetched: FetchedScene):
    from .scan import prepare_fetched

    return prepare_fetched(fetched, _detector, **_settings)


class ScenePool:
    """``config.workers`` processes preparing fetched scenes (:func:`~.scan.prepare_fetched`)."""

    def __init__(self, config: RunConfig):
        settings = {"model": config.model_hash, "tile_size": config.tile_size, "min_valid": config.min_valid}
        self._pool = ProcessPoolExecutor(
            config.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start,
            initargs=(os.getpid(), config.model, config.min_positive, config.allow_random, settings),
        )

    def _submit(self, fetched: FetchedScene):
        """Submit one scene. A worker process is started on a submit, and a Ctrl-C (sent to the
        whole process group) reaching it before its initializer ignores SIGINT would kill it and
        break the pool: SIGINT stays blocked while it starts, which it inherits."""
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return self._pool.submit(_prepare, fetched)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def outcomes(self, fetched: Iterable[FetchedScene], window: int) -> Iterator:
        """Prepared scenes, in the order given, with at most ``window`` in the workers at once, so
        memory stays bounded whatever the size of the region."""
        queue: deque = deque()
        try:
            for item in fetched:
                queue.append(self._submit(item))
                if len(queue) >= window:
                    yield queue.popleft().result()
            while queue:
                yield queue.popleft().result()
        except BrokenProcessPool:
            raise RunAbortError("a worker process died (out of memory, or killed); rerun the same command to resume, "
                                "with fewer --workers if memory is short") from None

    def close(self, *, at_once: bool = False) -> None:
        """Stop the workers: after their current scene, or ``at_once`` (a second Ctrl-C, a
        whole-run error), killing them, since nobody will read what they are computing."""
        if at_once:
            for process in list((self._pool._processes or {}).values()):  # no public way to stop busy workers
                process.kill()
        self._pool.shutdown(wait=not at_once, cancel_futures=True)

    def __enter__(self) -> ScenePool:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        self.close(at_once=exc_type is not None)
