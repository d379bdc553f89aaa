"""Progress of the long commands (``train``, ``evaluate``, ``scan``), wherever their output goes.

On a terminal, a tqdm bar. Off a terminal (a log file, CI, cron mail) tqdm turns itself off, and
a bar would be one endless line of carriage returns anyway, so a command that works for minutes
or a night would print nothing until it ends. There a thread prints one plain, self-contained
line every ``--progress-every`` seconds instead, whatever the command is doing at that moment:
loading TensorFlow, embedding, fitting, or waiting on a slow tile server.
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TextIO

import click

#: Seconds between two progress lines off a terminal, unless ``--progress-every`` says otherwise.
DEFAULT_EVERY = 30.0

progress_every_option = click.option(
    "--progress-every",
    type=click.FloatRange(min=0),
    default=DEFAULT_EVERY,
    show_default=True,
    envvar="AMBER_HUNTER_PROGRESS_EVERY",
    show_envvar=True,
    metavar="SECONDS",
    help="When output is not a terminal (a log file, CI, cron), print a progress line this often; 0: never.",
)


def _own_copy(stream: TextIO) -> TextIO:
    """A stream of its own on ``stream``'s file descriptor, or ``stream`` if it has none.

    TensorFlow is loaded with file descriptor 2 pointed at /dev/null, to silence the C++ lines it
    prints; progress lines written through a copy of the descriptor still get out meanwhile, and
    that is when a user most wonders whether the command is alive.
    """
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return stream
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding=getattr(stream, "encoding", None), errors="replace")


def duration(seconds: float) -> str:
    """``"45 s"``, ``"3 min 05 s"``, ``"2 h 07 min"``: as precise as a progress line needs."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class _Count:
    """What a scan reports its scenes to (``update``/``close``): the step's count, and the bar
    on a terminal."""

    def __init__(self, progress: Progress, bar):
        self._progress, self._bar = progress, bar

    def update(self, n: int = 1) -> None:
        self._progress.advance(n)
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Progress:
    """One command's progress: its current step, and how far the step has counted, if it counts.

    Use it as a context manager around the command's work: off a terminal, it prints
    ``"amber-hunter train: embedding 120/600 crops, 3.10 crops/s, about 2 min 35 s left; 1 min 02 s
    so far"`` every ``every`` seconds until the block ends (``every == 0``: never).
    """

    def __init__(self, command: str, every: float, first_step: str, stream: TextIO | None = None):
        self.command = command
        self.every = every
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = self.stream.isatty()
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._step, self._step_started, self._done, self._total, self._unit = first_step, self._started, 0, None, ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Progress:  # noqa: PYI034 - typing.Self needs Python 3.11
        if not self.terminal and self.every > 0:
            self.stream.flush()
            out = _own_copy(self.stream)
            self._thread = threading.Thread(target=self._beat, args=(out,), name="amber-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def step(self, name: str, total: int | None = None, unit: str = "") -> None:
        """Start the next step: ``name``, with ``total`` ``unit``s to count, or none."""
        with self._lock:
            self._step, self._step_started, self._done, self._total, self._unit = (
                name, time.monotonic(), 0, total, unit)
        if self.terminal and total is None:  # a counted step has its bar; this one gets its name
            print(f"{self.command}: {name}…", file=self.stream, flush=True)

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self._done += n

    def line(self) -> str:
        """The progress line as of now."""
        now = time.monotonic()
        with self._lock:
            step, started, done, total, unit = self._step, self._step_started, self._done, self._total, self._unit
        text = f"amber-hunter {self.command}: {step}"
        if total is not None:
            text += f" {done}/{total} {unit}s"
            rate = done / (now - started) if done and now > started else 0.0
            if rate:
                speed = f"{rate:.2f}" if rate < 10 else f"{rate:.0f}"
                text += f", {speed} {unit}s/s, about {duration((total - done) / rate)} left"
        return f"{text}; {duration(now - self._started)} so far"

    def _beat(self, out: TextIO) -> None:
        try:
            while not self._stop.wait(self.every):
                print(self.line(), file=out, flush=True)
        finally:
            if out is not self.stream:
                out.close()

    def items(self, name: str, unit: str, then: str) -> Callable[[Sequence], Iterator]:
        """A ``progress`` wrapper for a library loop over a list of work (embedding crops): the
        step ``name`` counts the items, and ``then`` is the step that follows when all are done."""

        def wrap(items: Sequence) -> Iterator:
            from tqdm import tqdm

            self.step(name, len(items), unit)
            bar = tqdm(items, desc=name, unit=unit, file=self.stream, disable=not self.terminal or not items)
            for item in bar:
                yield item
                self.advance()
            self.step(then)

        return wrap

    def counter(self, name: str, unit: str, **tqdm_options) -> Callable[[int], _Count]:
        """A ``progress`` factory for a loop that reports ``update()`` per item (a scan's scenes)."""

        def start(total: int) -> _Count:
            from tqdm import tqdm

            self.step(name, total, unit)
            bar = tqdm(total=total, desc=name, unit=unit, file=self.stream, **tqdm_options) if self.terminal else None
            return _Count(self, bar)

        return start
