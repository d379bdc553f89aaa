"""Worker processes of a scan on one machine: decoding, SLIC and hand-made features, one scene per core.

SLIC, PNG decoding and the texture features are single-threaded Python and numpy, so one process
uses one core; the CNN is multi-threaded already. A scan with ``--workers N`` therefore runs N
worker processes that turn fetched tiles into prepared scenes, while the main process fetches
(in threads, behind the run's one rate limiter and tile cache), runs the CNN over several scenes
at once and is the one writer of the run store.

Workers are never forked from the scan itself: the main process may hold TensorFlow's thread
pools and the fetch threads, which a forked child would inherit in an undefined state. They are
forked from multiprocessing's *fork server* (on Linux), a fresh process, without TensorFlow or
fetch threads, that imports the detector's modules once (:data:`PRELOAD`), so a worker starts in
milliseconds; started with ``spawn`` instead, each one paid ~3 s of CPU for the same imports
(xgboost alone pulls in scikit-learn and pandas), which on 2 cores is ~3 s of a short scan's wall
time. Elsewhere workers are spawned (macOS: forking after its Accelerate and OpenMP libraries
are loaded is unsafe). A forked worker gets the scan's environment of now (:func:`_start`), as
a spawned one would, not the fork server's; multiprocessing itself gives it the scan's folder
and ``sys.path``.

Each worker loads the model once, in its initializer, without building the CNN (the embedder
builds it lazily and only the main process embeds with it). Workers ignore SIGINT, so the scan's
own Ctrl-C handling (finish the scene in flight, then stop) is not cut short by a
KeyboardInterrupt in every child.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from ..errors import ConfigError, RunAbortError
from .config import MAX_WORKERS, RunConfig
from .scenes import FetchedScene

log = logging.getLogger(__name__)

#: Memory a worker process needs at its peak (imports, one 1024 px scene, its SLIC and features):
#: measured ~330 MB resident on the demo scenes, with headroom.
WORKER_MB = 500

#: How often a worker checks that its scan is still alive.
PARENT_POLL_S = 0.5

#: Modules the fork server imports before it forks any worker: everything a worker runs but the
#: CNN, which only the main process builds. None of them imports TensorFlow.
PRELOAD = ("amber_hunter.run.scan", "amber_hunter.model.detect", "xgboost")

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


PROC = Path("/proc")


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited. A scan killed with ``kill -9`` stays a
    zombie until its parent reaps it, and ``kill(pid, 0)`` still finds a zombie: a parent that
    first waits for the scan's output pipes, which the workers hold open, would wait forever.
    So where there is a ``/proc``, its state is read; elsewhere only existence can be checked."""
    if (PROC / "self" / "stat").is_file():
        try:
            state = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X")
    try:  # pragma: no cover - no /proc (macOS)
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # PermissionError: a reused pid, not our scan
        return False
    return True


def _exit_with(scan: int, parent: int) -> None:
    """End this worker when the scan that started it is gone. A scan killed with ``kill -9`` cannot
    stop its workers; without this they would live on, holding its memory and its output pipes.

    A spawned worker's ``parent`` (its parent at start) is the scan, and changes when the scan
    dies. A forked worker's is the fork server, which lives on until the scan *and* its workers
    are gone (each worker holds the server's keep-alive pipe), so there the scan's own state
    decides (:func:`_running`). It also covers a scan that died while this worker was starting.
    """
    while os.getppid() == parent and _running(scan):
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def context() -> multiprocessing.context.BaseContext:
    """The fork server with :data:`PRELOAD` on Linux, else ``spawn`` (see the module docstring).

    The preload is read when the server starts, once per process: in a process whose fork
    server already runs (started by other code, or Python's default start method elsewhere),
    workers fork from that one and import what it lacks themselves.
    """
    if not sys.platform.startswith("linux"):  # pragma: no cover - the tests run on Linux
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread for the block: a process started meanwhile inherits the mask,
    so a Ctrl-C sent to the whole process group cannot kill it before it ignores SIGINT."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def start_server() -> None:
    """Start the fork server now, so that it imports :data:`PRELOAD` on one core while the scan
    loads its model on another, and the first worker is forked at once (the first scene was
    stored ~2 s sooner on the demo). A no-op where workers are spawned or the server already runs.

    The price: a scan refused after this (a model or source that fails its checks) or with
    nothing left to do leaves the server to finish its imports, ~3 s of one core, before it sees
    the scan is gone and exits; a caller reading the scan's output through a pipe waits for it.
    """
    if context().get_start_method() != "forkserver":  # pragma: no cover - not Linux
        return
    from multiprocessing import forkserver

    with _sigint_blocked():
        forkserver.ensure_running()


def _start(scan: int, environ: dict, model: str | None, min_positive: int, allow_random: bool,
           settings: dict) -> None:
    global _detector, _settings
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by ScenePool._submit until now
    threading.Thread(target=_exit_with, args=(scan, os.getppid()), daemon=True, name="amber-parent-watch").start()
    # The fork server's environment is the scan's when the server started, which in a long-lived
    # process (a notebook, the tests) may be long ago: the cache folders, AMBER_HUNTER_* and
    # OpenMP settings must be the scan's of now.
    os.environ.clear()
    os.environ.update(environ)
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
            config.workers, mp_context=context(), initializer=_start,
            initargs=(os.getpid(), dict(os.environ), config.model, config.min_positive, config.allow_random,
                      settings),
        )

    def _submit(self, fetched: FetchedScene):
        """Submit one scene. A worker process is started on a submit, and a Ctrl-C (sent to the
        whole process group) reaching it before its initializer ignores SIGINT would kill it and
        break the pool: SIGINT stays blocked while it starts, which it inherits (through the fork
        server, started with the same mask by :func:`start_server` or the first submit)."""
        with _sigint_blocked():
            return self._pool.submit(_prepare, fetched)

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
