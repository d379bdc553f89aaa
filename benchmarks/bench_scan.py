"""Region-scan benchmark: throughput (scenes/s) and peak memory of ``amber-hunter scan`` over HTTP.

What issue 3's acceptance asks for, measured on the offline demo region:

* scan throughput and peak RSS at ``--workers 1`` and ``--workers 2`` on the 6-scene demo region;
* the peak RSS of a region with 4x as many scenes (the demo grid laid 4 times, 24 scenes) stays
  within 10 % of the 6-scene run's at the same workers: memory must not grow with the region.

How it is measured:

* The regions are built with ``training/build_demo_region.py`` and served each by its own
  ``ThreadingHTTPServer`` on 127.0.0.1 (a thread of this process, stopped at the end). Every scan
  goes over HTTP into a fresh run directory, so its tile cache is empty and every tile is really
  downloaded; the server counts the requests to prove it.
* Each scan is the real CLI (``amber-hunter scan``) in its own process. Its peak RSS is that
  process's own ``ru_maxrss``, read with ``os.wait4`` on its pid (``RUSAGE_CHILDREN`` would be the
  maximum over all children so far). Its CPU time (user + system) comes from the same call, plus
  that of the processes that outlive it and are adopted by this one (Linux's child subreaper,
  :func:`_reap_orphans`): the fork server that starts ``--workers`` processes and reaps them, so
  its rusage holds theirs. The peak RSS is the larger of the scan's and theirs.
  ``/proc/<pid>/status`` is also sampled during the run, to show whether RSS climbs scene after
  scene (``rss growth``: peak RSS over the last third of the scene phase, from the first scene
  committed to the last, minus the peak over its first third; start-up is left out).
* Wall time includes interpreter start, imports and model loading, which no subprocess can
  exclude. So every scan is followed by a **baseline**: the same command again on the finished run
  directory, which has no pending scene and measures start-up plus resume overhead. ``net
  scenes/s`` is scenes / (scan - baseline), paired within the round; ``ratio`` is scan / baseline.
  ``store scenes/s`` is the rate from the run's own events: (n - 1) / (last scene - first scene),
  the steady rate once the first scene is out, model load excluded. ``CPU s/scene`` is the scan's
  CPU time (user + system) minus its baseline's, per scene: it hardly moves with outside load, so
  it is the column to compare across machines and runs when the wall times are noisy.
* Results are read through ``RunStore``'s API only (``status()``, ``events()``, ``scenes()``), never
  its SQLite tables. Each scan must exit 0 with every scene done (none failed, partial or dropped)
  and flag the same scenes as the first scan, once per repeat of the grid: which scenes that is
  depends on the model (the fast model before its retrain missed positive2) and is printed with the table.
* One warm-up scan (not counted) fills the page cache, then configurations are interleaved round by
  round (rotating their order), so a burst of outside load spreads over all of them. The machine is
  shared: the load average at start and end goes into the JSON; judge absolute seconds by it.

    python benchmarks/bench_scan.py [--model fast|default|DIR] [--runs 3] [--repeat-large 4] [--json OUT]

The exit code is 0 when every scan ran and the memory check passed, 1 when the memory check
failed, 2 when a scan failed or returned wrong or inconsistent counts.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILDER = REPO / "training" / "build_demo_region.py"
#: The demo region holds 3 positive and 3 negative scenes per repeat.
SCENES_PER_REPEAT = 6
TILES_PER_SCENE = 16
#: Peak RSS of the large region may exceed the small one's by at most this share.
RSS_TOLERANCE = 0.10
MIN_RUNS = 3
RSS_SAMPLE_S = 0.05


# --------------------------------------------------------------------------------------------
# Demo regions and their HTTP servers


def load_builder():
    """``training/build_demo_region.py`` as a module (``training/`` is not a package)."""
    spec = importlib.util.spec_from_file_location("build_demo_region", BUILDER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


class _QuietHandler(SimpleHTTPRequestHandler):
    """Static files, no access log; counts requests on the server."""

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        with self.server.lock:
            self.server.hits[self.path.split("?", 1)[0]] += 1
        super().do_GET()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()

    def requests(self) -> int:
        with self.lock:
            return sum(self.hits.values())


@contextlib.contextmanager
def serve(root: Path) -> Iterator[_Server]:
    """A static HTTP server on 127.0.0.1 (free port) over ``root`` for the ``with`` block."""
    server = _Server(root)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --------------------------------------------------------------------------------------------
# One scan in its own process


def cli_command() -> list[str]:
    """The ``amber-hunter`` entry point of this interpreter (not a pyenv shim, which adds a shell)."""
    script = Path(sys.executable).parent / "amber-hunter"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from amber_hunter.cli import main; sys.exit(main())"]


def _vm_kb(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class RssSampler:
    """Samples a process's VmRSS from /proc while it runs (Linux only; silent elsewhere)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            kb = _vm_kb(self.pid, "VmRSS")
            if kb is not None:
                self.samples.append((time.time(), kb))  # the clock of the store's event times
            self._stop.wait(RSS_SAMPLE_S)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def rss_growth_mb(samples: list[tuple[float, int]], first: float, last: float) -> float | None:
    """Peak RSS over the last third of ``[first, last]`` minus the peak over its first third, in MB."""
    third = (last - first) / 3
    early = [kb for t, kb in samples if first <= t <= first + third]
    late = [kb for t, kb in samples if last - third <= t <= last]
    return (max(late) - max(early)) / 1024 if early and late else None


def _maxrss_mb(ru) -> float:
    # Linux reports kilobytes, macOS bytes.
    return ru.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


#: ``prctl`` option making a process the adopter of its descendants' orphans (linux/prctl.h).
PR_SET_CHILD_SUBREAPER = 36


def _adopt_orphans() -> bool:
    """Make this process adopt the orphans of the scans it runs, so their CPU time can be counted.

    A scan's ``--workers`` are forked by multiprocessing's fork server, which the scan starts but
    never waits for: the workers' CPU time lands in the server's rusage, and the server, orphaned
    when the scan exits, would be reaped by init with it. False where there is no ``prctl``.
    """
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


@dataclass
class Orphans:
    """What the adopted orphans reaped since the last call left: CPU seconds and the largest peak
    RSS (each with their own reaped children's, which is where the fork server's workers are)."""

    cpu_s: float = 0.0
    maxrss_mb: float = 0.0
    still_running: int = 0


def _reap_orphans(wait_s: float) -> Orphans:
    """Reap every child of this process but the running scan: the orphans a scan left, which
    exit within a second of it (the fork server, once its workers are gone). Waits up to
    ``wait_s`` for them; any still running then are counted and left (the caller warns), so a
    stuck process costs a warning, not a benchmark's hours."""
    out, deadline = Orphans(), time.monotonic() + wait_s
    while True:
        try:
            pid, _, ru = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return out
        if pid:
            out.cpu_s += ru.ru_utime + ru.ru_stime
            out.maxrss_mb = max(out.maxrss_mb, _maxrss_mb(ru))
        elif time.monotonic() >= deadline:
            out.still_running = sum(ppid == os.getpid() for ppid in proc_parents().values())
            return out
        else:
            time.sleep(0.05)


def proc_parents() -> dict[int, int]:
    """Every process's parent pid, from /proc (empty elsewhere)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            # The command name may hold spaces and parentheses: split after its last ")".
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return parents


def run_cli(args: list[str], cwd: Path, log: Path) -> dict:
    """Run ``amber-hunter ARGS`` and return its wall time, CPU time and peak RSS (its adopted
    orphans' included: the fork server and its workers) and exit code.

    Orphans of anything this process ran before (a baseline, a build script) are reaped first,
    without waiting, so that none is counted against this scan.
    """
    adopting = _adopt_orphans()
    if adopting:
        _reap_orphans(wait_s=0)
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cli_command() + args, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        with RssSampler(proc.pid) as sampler:
            # wait4 gives this child's own rusage; Popen.wait would discard it.
            _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    orphans = _reap_orphans(wait_s=30) if adopting else Orphans()
    if orphans.still_running:
        print(f"bench: {orphans.still_running} processes of the scan still ran 30 s after it; their CPU is not "
              "counted", file=sys.stderr)
    return {
        "wall_s": wall,
        "cpu_s": ru.ru_utime + ru.ru_stime + orphans.cpu_s,
        "peak_rss_mb": max(_maxrss_mb(ru), orphans.maxrss_mb),
        "rss_samples": sampler.samples,
        "returncode": proc.returncode,
        "output": log.read_text(errors="replace")[-2000:],
    }


def store_timings(run_dir: Path, names: dict[str, str]) -> dict:
    """Scene counts, flagged scenes and event times of the run's latest session, read through
    ``RunStore``'s API, so the timings are the store's own, not this script's.

    ``names`` maps scene ids to their example's name (``scenes.json``), to say which were flagged.
    """
    from amber_hunter.run.store import RunStore

    with RunStore(run_dir) as store:
        status = store.status()
        events = store.events()
        flagged = sorted({names.get(s.scene_id, s.scene_id) for s in store.scenes(flagged_only=True)})
    starts = [e.ts for e in events if e.kind == "start"]
    start = starts[-1] if starts else None
    scene_ts = sorted(e.ts for e in events if e.kind == "scene" and start is not None and e.ts >= start)
    stops = [e.ts for e in events if e.kind == "stop" and start is not None and e.ts >= start]
    n = len(scene_ts)
    return {
        "done": status.done,
        "pending": status.pending,
        "failed": status.failed,
        "partial": status.partial,
        "dropped": status.dropped,
        "flagged": status.flagged,
        "flagged_scenes": flagged,
        "processed": n,
        "scene_times": scene_ts,
        # The store's rate of the latest session that processed scenes: (n - 1) / (last - first).
        "store_rate": status.rate if n else None,
        "first_scene_s": scene_ts[0] - start if n else None,
        "in_process_s": max(stops) - start if stops else None,
    }


# --------------------------------------------------------------------------------------------
# Configurations and rounds


@dataclass(frozen=True)
class Config:
    name: str
    repeat: int
    workers: int

    @property
    def scenes(self) -> int:
        return SCENES_PER_REPEAT * self.repeat


def scene_names(region: Path) -> dict[str, str]:
    """Scene id -> the example it shows (``positive2.png``...), from the region's ``scenes.json``."""
    return {scene_id: info["source"] for scene_id, info in json.loads((region / "scenes.json").read_text())["scenes"].items()}


def labelled_positives(region: Path) -> list[str]:
    scenes = json.loads((region / "scenes.json").read_text())["scenes"].values()
    return sorted({info["source"] for info in scenes if info["label"] == "positive"})


class Bench:
    def __init__(self, model: str, regions: dict[int, Path], servers: dict[int, _Server], work: Path, keep: bool):
        self.model = model
        self.regions = regions
        self.servers = servers
        self.work = work
        self.keep = keep
        self.names = {repeat: scene_names(path) for repeat, path in regions.items()}
        self.positives = labelled_positives(regions[min(regions)])
        self.problems: list[str] = []
        #: The scenes (by example name) that the first scan flagged; every later scan must agree.
        #: Which scenes a model flags is its own business (the fast model before its retrain
        #: missed positive2); a scan that flags others than the rest did is a wrong result.
        self.flagged_ref: list[str] | None = None
        self._n = 0

    def scan_args(self, config: Config, run_dir: Path) -> list[str]:
        region, server = self.regions[config.repeat], self.servers[config.repeat]
        return ["scan", "--aoi", str(region / "aoi.geojson"),
                "--tiles", f"http://127.0.0.1:{server.server_port}/tiles/{{z}}/{{x}}/{{y}}.png",
                "--run", str(run_dir), "--model", self.model, "--workers", str(config.workers)]

    def measure(self, config: Config, round_: int) -> dict:
        """One fresh scan of ``config`` and its zero-pending baseline rerun."""
        self._n += 1
        run_dir = self.work / "runs" / f"{self._n:03d}-{config.name}"
        args = self.scan_args(config, run_dir)
        server = self.servers[config.repeat]
        load = os.getloadavg()[0]

        before = server.requests()
        scan = run_cli(args, self.work, self.work / "runs" / f"{self._n:03d}-scan.log")
        scan["requests"] = server.requests() - before
        self._check(config, "scan", scan)
        scan.update(store_timings(run_dir, self.names[config.repeat]))
        if scan["processed"] >= 2:
            scan["rss_growth_mb"] = rss_growth_mb(scan["rss_samples"], scan["scene_times"][0], scan["scene_times"][-1])

        before = server.requests()
        base = run_cli(args, self.work, self.work / "runs" / f"{self._n:03d}-baseline.log")
        base["requests"] = server.requests() - before
        self._check(config, "baseline", base)
        base.update(store_timings(run_dir, self.names[config.repeat]))

        if self.flagged_ref is None:
            self.flagged_ref = scan["flagged_scenes"]
        # Each scene in the flagged set appears once per repeat of the demo grid.
        expect = {"done": config.scenes, "pending": 0, "failed": 0, "partial": 0, "dropped": 0,
                  "flagged": len(self.flagged_ref) * config.repeat, "flagged_scenes": self.flagged_ref}
        wrong = {k: scan[k] for k, v in expect.items() if scan[k] != v}
        if scan["processed"] != config.scenes or base["processed"] != 0:
            wrong["processed (scan, baseline)"] = (scan["processed"], base["processed"])
        if scan["requests"] != TILES_PER_SCENE * config.scenes or base["requests"] != 0:
            wrong["tile requests (scan, baseline)"] = (scan["requests"], base["requests"])
        if wrong:
            self.problems.append(f"{config.name} round {round_}: expected {expect}, got {wrong}")
        if not self.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        return {"config": config.name, "round": round_, "loadavg_1m": load, "scan": _trim(scan), "baseline": _trim(base)}

    def _check(self, config: Config, kind: str, result: dict) -> None:
        # scan exits 1 when some scenes failed, 2 on a bad option or a whole-run failure.
        if result["returncode"] != 0:
            what = {1: " (some scenes failed)", 2: " (bad option or whole-run failure)"}.get(result["returncode"], "")
            raise SystemExit(f"bench_scan: {config.name} {kind} exited with {result['returncode']}{what}:\n"
                             f"{result['output']}")


def _trim(result: dict) -> dict:
    trimmed = {k: v for k, v in result.items() if k not in ("output", "rss_samples", "scene_times")}
    trimmed["rss_samples"] = len(result["rss_samples"])
    return trimmed


def summarise(config: Config, runs: list[dict]) -> dict:
    scans = [r["scan"] for r in runs]
    bases = [r["baseline"] for r in runs]
    wall = [s["wall_s"] for s in scans]
    base = [b["wall_s"] for b in bases]
    net = [s["wall_s"] - b["wall_s"] for s, b in zip(scans, bases)]
    rss = [s["peak_rss_mb"] for s in scans]
    rates = [s["store_rate"] for s in scans if s["store_rate"] is not None]
    growth = [s["rss_growth_mb"] for s in scans if s.get("rss_growth_mb") is not None]
    cpu_net = [s["cpu_s"] - b["cpu_s"] for s, b in zip(scans, bases)]
    med = statistics.median
    return {
        "config": config.name,
        "scenes": config.scenes,
        "workers": config.workers,
        "runs": len(runs),
        "median_s": med(wall),
        "min_s": min(wall),
        "max_s": max(wall),
        "scenes_per_s": config.scenes / med(wall),
        "net_s": med(net),
        "net_scenes_per_s": config.scenes / med(net) if med(net) > 0 else None,
        "store_scenes_per_s": med(rates) if rates else None,
        "cpu_s": med(s["cpu_s"] for s in scans),
        "baseline_cpu_s": med(b["cpu_s"] for b in bases),
        "cpu_s_per_scene": med(cpu_net) / config.scenes,
        "peak_rss_mb": med(rss),
        "peak_rss_min_mb": min(rss),
        "peak_rss_max_mb": max(rss),
        "rss_growth_mb": med(growth) if growth else None,
        "baseline_s": med(base),
        "baseline_rss_mb": med(b["peak_rss_mb"] for b in bases),
        "ratio": med(s / b for s, b in zip(wall, base)),
    }


def memory_check(rows: dict[str, dict], small: str, large: str) -> dict:
    s, l = rows[small], rows[large]
    growth = l["peak_rss_mb"] / s["peak_rss_mb"] - 1
    return {
        "small": small,
        "large": large,
        "small_peak_rss_mb": s["peak_rss_mb"],
        "large_peak_rss_mb": l["peak_rss_mb"],
        "growth": growth,
        "growth_of_maxima": l["peak_rss_max_mb"] / s["peak_rss_max_mb"] - 1,
        "tolerance": RSS_TOLERANCE,
        "passed": growth <= RSS_TOLERANCE,
    }


def _f(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def print_table(rows: list[dict]) -> None:
    head = ("config", "scenes", "median s (min-max)", "scenes/s", "net scenes/s", "store scenes/s",
            "CPU s/scene", "peak RSS MB (min-max)", "rss growth MB", "baseline s", "scan/baseline")
    lines = [head] + [(
        r["config"], str(r["scenes"]),
        f"{r['median_s']:.1f} ({r['min_s']:.1f}-{r['max_s']:.1f})",
        f"{r['scenes_per_s']:.3f}", _f(r["net_scenes_per_s"], ".3f"), _f(r["store_scenes_per_s"], ".3f"),
        f"{r['cpu_s_per_scene']:.2f}",
        f"{r['peak_rss_mb']:.0f} ({r['peak_rss_min_mb']:.0f}-{r['peak_rss_max_mb']:.0f})",
        _f(r["rss_growth_mb"], "+.1f"), f"{r['baseline_s']:.2f}", f"{r['ratio']:.1f}",
    ) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines[1:]:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(line, widths)) + " |")


# --------------------------------------------------------------------------------------------


def check_model(model: str) -> str:
    """The --model value to pass to the CLI: a bundled name as is, a folder as an absolute path."""
    from amber_hunter.model.classify import BUNDLED_MODELS, resolve_model

    path = Path(model).expanduser()
    if model in BUNDLED_MODELS and not path.exists():
        resolved = resolve_model(model)
        if not (resolved / "model.json").is_file():
            raise SystemExit(f"bench_scan: the bundled model {model!r} is not built ({resolved} has no model.json); "
                             "train it with training/train_default_model.py or pass --model DIR")
        return model
    if not (path / "model.json").is_file():
        raise SystemExit(f"bench_scan: --model {model}: no model bundle there (no model.json)")
    return str(path.resolve())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fast",
                        help="fast (bundled texture model, default), default (bundled vgg16+texture) or a bundle DIR")
    parser.add_argument("--runs", type=int, default=3, help=f"timed runs per configuration, >= {MIN_RUNS}")
    parser.add_argument("--repeat-large", type=int, default=4, help="the large region lays the 6 demo scenes K times")
    parser.add_argument("--json", type=Path, help="write the rows, every run and the load average here")
    parser.add_argument("--data", type=Path, help="texty-amber dataset folder (default: searched)")
    parser.add_argument("--workdir", type=Path, help="keep regions and logs here (default: a temporary folder, removed)")
    parser.add_argument("--keep-runs", action="store_true", help="keep every run directory (in --workdir)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the uncounted warm-up scan")
    args = parser.parse_args(argv)
    if args.runs < MIN_RUNS:
        parser.error(f"--runs must be at least {MIN_RUNS}")
    if args.repeat_large < 2:
        parser.error("--repeat-large must be at least 2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    model = check_model(args.model)
    loadavg_start = os.getloadavg()
    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="amber-bench-scan-"))
    (work / "runs").mkdir(parents=True, exist_ok=True)
    builder = load_builder()
    configs = [Config("6 scenes, workers 1", 1, 1), Config("6 scenes, workers 2", 1, 2),
               Config(f"{SCENES_PER_REPEAT * args.repeat_large} scenes, workers 1", args.repeat_large, 1)]
    small, large = configs[0].name, configs[2].name
    try:
        regions = {}
        for repeat in sorted({c.repeat for c in configs}):
            t0 = time.perf_counter()
            region = builder.build_demo_region(work / f"demo-x{repeat}", repeat=repeat, data=args.data)
            regions[repeat] = region.out
            print(f"region x{repeat}: {len(region.scenes)} scenes in {region.out} ({time.perf_counter() - t0:.1f} s)",
                  file=sys.stderr)
        with contextlib.ExitStack() as stack:
            servers = {repeat: stack.enter_context(serve(path)) for repeat, path in regions.items()}
            bench = Bench(model, regions, servers, work, keep=args.keep_runs)
            print(f"model {model}; {args.runs} rounds of {len(configs)} configurations; load {loadavg_start}",
                  file=sys.stderr)
            if not args.no_warmup:
                warm = bench.measure(configs[0], round_=0)
                print(f"warm-up: {warm['scan']['wall_s']:.1f} s (not counted)", file=sys.stderr)
            runs = []
            for round_ in range(1, args.runs + 1):
                k = (round_ - 1) % len(configs)
                for config in configs[k:] + configs[:k]:
                    result = bench.measure(config, round_)
                    runs.append(result)
                    s, b = result["scan"], result["baseline"]
                    print(f"round {round_} {config.name}: {s['wall_s']:.1f} s, {s['peak_rss_mb']:.0f} MB, "
                          f"baseline {b['wall_s']:.2f} s, load {result['loadavg_1m']:.1f}", file=sys.stderr)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    loadavg_end = os.getloadavg()

    rows = [summarise(c, [r for r in runs if r["config"] == c.name]) for c in configs]
    check = memory_check({r["config"]: r for r in rows}, small, large)
    print()
    print_table(rows)
    print()
    verdict = "PASS" if check["passed"] else "FAIL"
    print(f"memory: {large} peak RSS {check['large_peak_rss_mb']:.0f} MB vs {small} {check['small_peak_rss_mb']:.0f} MB "
          f"(medians): {check['growth']:+.1%} (limit +{RSS_TOLERANCE:.0%}): {verdict}")
    print(f"load average (1, 5, 15 min): start {', '.join(f'{x:.2f}' for x in loadavg_start)}; "
          f"end {', '.join(f'{x:.2f}' for x in loadavg_end)}; {os.cpu_count()} CPUs")
    positives = bench.positives
    flagged = bench.flagged_ref or []
    missed = [name for name in positives if name not in flagged]
    extra = [name for name in flagged if name not in positives]
    print(f"flagged per {SCENES_PER_REPEAT} scenes: {len(flagged)} ({', '.join(flagged) or 'none'}); labelled positive: "
          f"{len(positives)}" + (f"; the model misses {', '.join(missed)}" if missed else "")
          + (f"; flags negative {', '.join(extra)}" if extra else ""))
    for problem in bench.problems:
        print(f"WRONG RESULT: {problem}")
    if args.json:
        from amber_hunter import atomic

        atomic.write_json(args.json, {
            "command": [Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv)),
            "model": model,
            "cli": cli_command(),
            "cpu_count": os.cpu_count(),
            "loadavg_start": loadavg_start,
            "loadavg_end": loadavg_end,
            "rows": rows,
            "memory_check": check,
            "flagged_scenes": flagged,
            "labelled_positives": positives,
            "problems": bench.problems,
            "runs": runs,
        })
        print(f"wrote {args.json}")
    if bench.problems:
        return 2
    return 0 if check["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
