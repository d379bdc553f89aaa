"""Scan speed against the study's own loop (issue 10's benchmarks), on the same scenes in the same run.

What it measures, for every model in ``--models`` (``default``, ``balanced``, ``fast``, ``resnet50-random`` or a
bundle folder), every scene count in ``--scenes`` (the 6-scene demo grid laid K times) and every
``--workers`` count:

* ``amber-hunter scan`` over HTTP with a **warm tile cache**: the real CLI in its own process, into
  a fresh run directory, reading tiles through one shared ``--tile-cache`` that an untimed scan
  filled first. Wall time (start-up and model loading included), the run's own steady rate from
  its event times (``store scenes/s``, the first scene and so model loading left out), CPU time
  and peak RSS (``os.wait4`` on the pid and on the fork server it leaves, which holds its workers'
  figures: ``bench_scan.run_cli``), and the run's per-stage seconds when ``RunStatus`` has
  ``stage_seconds`` (read through ``RunStore``'s API only; empty otherwise).
* **The reference baseline**: ``benchmarks/study_loop.py``, our implementation of the study's
  per-scene loop (decode, float64, SLIC(30, 35, 1), bbox crops resized to 224 with
  nearest-neighbour, random-weight ResNet50 at batch 64, XGBoost, flag at more than 2), in its own
  process on the same scenes: each scene cell of the demo region as one 1024 px PNG, which the
  loop reads and decodes per scene. Its model building is excluded from its time, as the issue
  says, so the ratios against a scan that pays its own start-up err against the scan.
* **Ratios within a round**: each scan's scenes/s divided by the baseline's scenes/s of the same
  round and scene count (``x baseline``: scan wall time, start-up included; ``x baseline steady``:
  the store's rate), and the baseline loop's CPU seconds per scene over the scan process's
  (``x baseline CPU``: hardly moved by outside load, but blind to how many cores a side keeps
  busy). Medians over the rounds.

How it is run:

* The regions are built with ``training/build_demo_region.py``. The K-times region's tiles are the
  first K rows of the largest one's, so one static server (bench_scan's, 127.0.0.1, a thread of
  this process) serves the largest region's tiles to all of them, and one tile cache holds them
  all. The server counts requests: a timed scan that makes any is reported as a wrong result.
* ``resnet50-random`` is a bundle trained by ``amber-hunter train --embedder resnet50
  --resnet-weights random`` on the labelled crops (``--resnet-model DIR`` reuses one) and scanned
  with ``--allow-random``: ResNet50 with random weights on both sides, equal FLOPs per crop.
* Configurations are interleaved round by round in a rotating order, the baseline of each scene
  count among them; ``--runs`` rounds (3 or more for medians). The load average is recorded at
  every measurement. Peak RSS at the largest scene count is checked against the smallest (same
  model and workers): it must stay within 10 %.

    python benchmarks/bench_speed.py [--models default fast resnet50-random] [--scenes 24,96] \
        [--workers 1,2] [--runs 3] [--json benchmarks/results-speed.json] [--workdir DIR] \
        [--data DIR] [--cache-dir DIR] [--resnet-model DIR] [--no-warmup] [--keep-runs]

The exit code is 0 when every scan and baseline ran, with every scene done and the same flags in
every round, 1 when only the memory check failed, 2 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
# CLI subprocesses must import this checkout's amber_hunter too, installed or not.
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])

# After the path above; brings bench_scan (its server, CLI runner and store reader), machine() and log().
import bench_rescore

bench_scan = bench_rescore.bench_scan
log = bench_rescore.log
_f = bench_scan._f

STUDY_LOOP = HERE / "study_loop.py"
BASELINE = "baseline"
RANDOM_RESNET = "resnet50-random"
MIN_RUNS = 3


@dataclass(frozen=True)
class Config:
    """One measured configuration: a model's scan at some workers, or the baseline (``workers`` 0)."""

    model: str
    scenes: int
    workers: int

    @property
    def name(self) -> str:
        if self.model == BASELINE:
            return f"baseline, {self.scenes} scenes"
        return f"{self.model}, {self.scenes} scenes, workers {self.workers}"


@dataclass(frozen=True)
class Region:
    """A demo region: its folder (aoi.geojson, scenes.json) and the baseline's scene files in scene order."""

    path: Path
    names: dict[str, str]
    scene_files: tuple[Path, ...]


# --------------------------------------------------------------------------------------------
# Setup: regions, scene files, the warm tile cache, the random-ResNet50 bundle


def build_regions(counts: list[int], work: Path, data: Path | None) -> dict[int, Region]:
    """The demo region for every scene count, and each example scene as one 1024 px PNG for the baseline."""
    from PIL import Image

    from amber_hunter.images import read_rgb
    from amber_hunter.learn.data import find_texty_dataset

    builder = bench_scan.load_builder()
    example = find_texty_dataset(data) / "example"
    scenes_dir = work / "scenes"
    scenes_dir.mkdir(parents=True, exist_ok=True)
    for name in builder.EXAMPLES:
        target = scenes_dir / f"{name}.png"
        if not target.is_file():
            Image.fromarray(builder.pad_scene(read_rgb(example / f"{name}.png"))).save(target)
    regions = {}
    for count in counts:
        built = builder.build_demo_region(work / f"demo-{count}", repeat=count // bench_scan.SCENES_PER_REPEAT, data=data)
        names = bench_scan.scene_names(built.out)
        regions[count] = Region(built.out, names, tuple(scenes_dir / names[s.scene_id] for s in built.scenes))
    largest = regions[max(counts)]
    for count, region in regions.items():
        if not set(region.names) <= set(largest.names):
            raise SystemExit(f"bench_speed: the {count}-scene region is not part of the {max(counts)}-scene one; "
                             "build_demo_region's layout changed, serve each region on its own")
    return regions


def scan_args(config: Config, model: str, region: Region, port: int, run_dir: Path, tile_cache: Path) -> list[str]:
    args = ["scan", "--aoi", str(region.path / "aoi.geojson"),
            "--tiles", f"http://127.0.0.1:{port}/tiles/{{z}}/{{x}}/{{y}}.png",
            "--run", str(run_dir), "--model", model, "--workers", str(config.workers), "--tile-cache", str(tile_cache)]
    return args + (["--allow-random"] if config.model == RANDOM_RESNET else [])


def random_resnet_model(work: Path, args) -> str:
    """The random-weight ResNet50 bundle: ``--resnet-model``, or one trained with the CLI now."""
    if args.resnet_model:
        return bench_scan.check_model(str(args.resnet_model))
    out = work / "models" / RANDOM_RESNET
    if not (out / "model.json").is_file():
        from amber_hunter.learn.data import find_texty_dataset

        cache = args.cache_dir or work / "embedding-cache"
        train = ["train", str(find_texty_dataset(args.data)), "--embedder", "resnet50", "--resnet-weights", "random",
                 "--out", str(out), "--cache-dir", str(cache)]
        log(f"training the {RANDOM_RESNET} bundle (embeds the 860 crops: minutes)")
        result = bench_scan.run_cli(train, work, work / "train-resnet50-random.log")
        if result["returncode"] != 0:
            raise SystemExit(f"bench_speed: amber-hunter {' '.join(train)} exited with {result['returncode']}:\n"
                             f"{result['output']}")
        log(f"trained {out} in {result['wall_s']:.0f} s")
    return str(out)


# --------------------------------------------------------------------------------------------
# One measurement


class TreeRss:
    """Peak of the summed VmRSS of every descendant of this process, sampled from /proc.

    ``ru_maxrss`` is the peak of one process: with ``--workers 2`` the scan's worker processes hold
    memory beside it. Their sum over-counts pages shared since the fork, so it is an upper bound,
    where ``ru_maxrss`` is a lower one. Linux only; 0 elsewhere.
    """

    def __init__(self, every_s: float = 0.25):
        self.every_s = every_s
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _descendants_kb(root: int) -> int:
        parents = bench_scan.proc_parents()
        tree, frontier = set(), {root}
        while frontier:
            frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - tree
            tree |= frontier
        return sum(bench_scan._vm_kb(pid, "VmRSS") or 0 for pid in tree)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, self._descendants_kb(os.getpid()))
            self._stop.wait(self.every_s)

    def __enter__(self):
        if Path("/proc/self/stat").is_file():
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024


def stage_seconds(run_dir: Path) -> dict[str, float] | None:
    """The run's seconds per scene in each stage (``RunStatus.stage_seconds`` over ``timed_scenes``),
    or None where the store records no timings."""
    from amber_hunter.run.store import RunStore

    with RunStore(run_dir) as store:
        status = store.status()
    stages, timed = getattr(status, "stage_seconds", None), getattr(status, "timed_scenes", 0)
    if stages is None or not timed:
        return None
    return {k: v / timed for k, v in dataclasses.asdict(stages).items()}


def run_baseline(files: tuple[Path, ...], out: Path, log_path: Path) -> dict:
    """``study_loop.py`` on ``files`` in its own process: its JSON figures plus the process's wall time and peak RSS."""
    with open(log_path, "wb") as sink:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(STUDY_LOOP), *map(str, files), "--json", str(out)],
                                stdout=sink, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"bench_speed: study_loop.py exited with {code}:\n{log_path.read_text(errors='replace')[-2000:]}")
    loop = json.loads(out.read_text())
    n = loop["scenes"]
    return {"wall_s": wall, "process_cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mb": bench_scan._maxrss_mb(ru),
            "loop_s": loop["seconds"], "cpu_s": loop["cpu_s"], "scenes_per_s": loop["scenes_per_s"],
            "stage_seconds": {k: v / n for k, v in loop["stage_seconds"].items()},
            "model_build_s": loop["model_build_s"], "done": n}


class Bench:
    def __init__(self, models: dict[str, str], regions: dict[int, Region], server, work: Path, keep: bool):
        self.models = models
        self.regions = regions
        self.server = server
        self.work = work
        self.tile_cache = work / "tile-cache"
        self.keep = keep
        self.problems: list[str] = []
        #: Per model, the scenes (by example name) its first scan flagged; later scans must agree.
        self.flagged_ref: dict[str, list[str]] = {}
        self._n = 0

    def warm(self) -> dict:
        """One untimed scan of the largest region with the cheapest model, to fill the shared tile cache."""
        count = max(self.regions)
        config = Config("fast", count, 1)
        result = self._scan(config, bench_scan.check_model("fast"), "warm-up")
        if result["requests"] != bench_scan.TILES_PER_SCENE * count:
            self.problems.append(f"warm-up made {result['requests']} tile requests, "
                                 f"expected {bench_scan.TILES_PER_SCENE * count}")
        return result

    def _scan(self, config: Config, model: str, label: str) -> dict:
        self._n += 1
        run_dir = self.work / "runs" / f"{self._n:03d}-{label}"
        args = scan_args(config, model, self.regions[config.scenes], self.server.server_port, run_dir, self.tile_cache)
        before = self.server.requests()
        result = bench_scan.run_cli(args, self.work, run_dir.with_suffix(".log"))
        result["requests"] = self.server.requests() - before
        if result["returncode"] != 0:
            raise SystemExit(f"bench_speed: {config.name} ({label}) exited with {result['returncode']}:\n"
                             f"{result['output']}")
        result.update(bench_scan.store_timings(run_dir, self.regions[config.scenes].names))
        result["stage_seconds"] = stage_seconds(run_dir)
        if not self.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        return {k: v for k, v in result.items() if k not in ("output", "rss_samples", "scene_times")}

    def measure(self, config: Config, round_: int) -> dict:
        load = os.getloadavg()[0]
        with TreeRss() as tree:
            if config.model == BASELINE:
                self._n += 1
                stem = self.work / "runs" / f"{self._n:03d}-baseline-{config.scenes}"
                result = run_baseline(self.regions[config.scenes].scene_files, stem.with_suffix(".json"),
                                      stem.with_suffix(".log"))
            else:
                label = f"{Path(config.model).name}-{config.scenes}-w{config.workers}"  # a bundle folder: its name
                result = self._scan(config, self.models[config.model], label)
                self._check(config, round_, result)
        result["tree_rss_mb"] = tree.peak_mb
        return {"config": config.name, "model": config.model, "scenes": config.scenes, "workers": config.workers,
                "round": round_, "loadavg_1m": load, "result": result}

    def _check(self, config: Config, round_: int, scan: dict) -> None:
        ref = self.flagged_ref.setdefault(config.model, scan["flagged_scenes"])
        repeat = config.scenes // bench_scan.SCENES_PER_REPEAT
        expect = {"done": config.scenes, "pending": 0, "failed": 0, "partial": 0, "dropped": 0,
                  "processed": config.scenes, "flagged": len(ref) * repeat, "flagged_scenes": ref}
        wrong = {k: scan[k] for k, v in expect.items() if scan[k] != v}
        if scan["requests"]:
            wrong["tile requests (a warm cache makes none)"] = scan["requests"]
        if wrong:
            self.problems.append(f"{config.name} round {round_}: expected {expect}, got {wrong}")


# --------------------------------------------------------------------------------------------
# Summary


def with_ratios(runs: list[dict]) -> None:
    """Add to every scan its scenes/s over the baseline's of the same round and scene count."""
    base = {(r["round"], r["scenes"]): r["result"]["scenes_per_s"] for r in runs if r["model"] == BASELINE}
    base_cpu_per_scene = {(r["round"], r["scenes"]): r["result"]["cpu_s"] / r["scenes"]
                          for r in runs if r["model"] == BASELINE}
    for r in runs:
        res = r["result"]
        if r["model"] == BASELINE:
            continue
        res["scenes_per_s"] = r["scenes"] / res["wall_s"]
        b = base.get((r["round"], r["scenes"]))
        res["x_baseline"] = res["scenes_per_s"] / b if b else None
        res["x_baseline_steady"] = res["store_rate"] / b if b and res["store_rate"] else None
        base_cpu = base_cpu_per_scene.get((r["round"], r["scenes"]))
        res["x_baseline_cpu"] = base_cpu / (res["cpu_s"] / r["scenes"]) if base_cpu else None


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(config: Config, runs: list[dict]) -> dict:
    results = [r["result"] for r in runs]
    stages = [res["stage_seconds"] for res in results if res.get("stage_seconds")]
    row = {
        "config": config.name, "model": config.model, "scenes": config.scenes, "workers": config.workers,
        "runs": len(runs),
        "loadavg_1m": _median(r["loadavg_1m"] for r in runs),
        "scenes_per_s": _median(res["scenes_per_s"] for res in results),
        "wall_s": _median(res["wall_s"] for res in results),
        "peak_rss_mb": _median(res["peak_rss_mb"] for res in results),
        "tree_rss_mb": _median(res["tree_rss_mb"] for res in results),
        "cpu_s_per_scene": _median(res["cpu_s"] / config.scenes for res in results),
        "stage_seconds": {k: _median(s.get(k) for s in stages) for k in stages[0]} if stages else None,
    }
    if config.model != BASELINE:
        row.update({
            "store_scenes_per_s": _median(res["store_rate"] for res in results),
            "x_baseline": _median(res["x_baseline"] for res in results),
            "x_baseline_steady": _median(res["x_baseline_steady"] for res in results),
            "x_baseline_cpu": _median(res["x_baseline_cpu"] for res in results),
            "tile_requests": max(res["requests"] for res in results),
        })
    return row


def memory_checks(rows: list[dict]) -> list[dict]:
    """Peak RSS at the largest scene count against the smallest, per model and workers."""
    counts = sorted({r["scenes"] for r in rows})
    checks = []
    if len(counts) < 2:
        return checks
    by_key = {(r["model"], r["workers"], r["scenes"]): r for r in rows if r["model"] != BASELINE}
    for (model, workers, scenes), small in sorted(by_key.items()):
        large = by_key.get((model, workers, counts[-1]))
        if scenes == counts[0] and large:
            growth = large["peak_rss_mb"] / small["peak_rss_mb"] - 1
            checks.append({"model": model, "workers": workers, "small": small["peak_rss_mb"],
                           "large": large["peak_rss_mb"], "growth": growth,
                           "passed": growth <= bench_scan.RSS_TOLERANCE})
    return checks


def print_table(rows: list[dict]) -> None:
    head = ("config", "runs", "load", "scenes/s", "store scenes/s", "x baseline", "x baseline steady",
            "x baseline CPU", "CPU s/scene", "peak RSS MB", "tree RSS MB", "s/scene by stage")
    lines = [head] + [(
        r["config"], str(r["runs"]), _f(r["loadavg_1m"], ".1f"), _f(r["scenes_per_s"], ".3f"),
        _f(r.get("store_scenes_per_s"), ".3f"), _f(r.get("x_baseline"), ".2f"), _f(r.get("x_baseline_steady"), ".2f"),
        _f(r.get("x_baseline_cpu"), ".2f"), _f(r["cpu_s_per_scene"], ".2f"), _f(r["peak_rss_mb"], ".0f"), _f(r["tree_rss_mb"], ".0f"),
        ", ".join(f"{k} {v:.2f}" for k, v in (r["stage_seconds"] or {}).items() if v is not None),
    ) for r in rows]
    lines.insert(1, ["---"] * len(head))
    print("\n".join("| " + " | ".join(line) + " |" for line in lines))


# --------------------------------------------------------------------------------------------


def interleaved(configs: list[Config], rounds: int) -> Iterator[tuple[int, Config]]:
    """(round, config) for every config in every round, the order rotated by one each round, so
    that a burst of outside load spreads over all configurations instead of hitting one."""
    for round_ in range(1, rounds + 1):
        k = (round_ - 1) % len(configs)
        for config in configs[k:] + configs[:k]:
            yield round_, config


def _ints(text: str) -> list[int]:
    return sorted({int(part) for part in text.split(",") if part.strip()})


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["default", "fast", RANDOM_RESNET],
                        help=f"default, balanced, fast, {RANDOM_RESNET} or bundle folders")
    parser.add_argument("--scenes", type=_ints, default=[24, 96], help="scene counts, multiples of 6 (default 24,96)")
    parser.add_argument("--workers", type=_ints, default=[1, 2], help="scan --workers values (default 1,2)")
    parser.add_argument("--runs", type=int, default=MIN_RUNS, help=f"rounds; medians need >= {MIN_RUNS}")
    parser.add_argument("--json", type=Path, help="write rows, every run, the checks and the load here")
    parser.add_argument("--data", type=Path, help="texty-amber dataset folder (default: searched)")
    parser.add_argument("--workdir", type=Path, help="keep regions, tile cache, models and logs here")
    parser.add_argument("--cache-dir", type=Path, help=f"embedding cache for training the {RANDOM_RESNET} bundle")
    parser.add_argument("--resnet-model", type=Path, help=f"a {RANDOM_RESNET} bundle to reuse instead of training one")
    parser.add_argument("--keep-runs", action="store_true", help="keep every run directory (in --workdir)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the scan that fills the tile cache (a kept --workdir's is warm already)")
    args = parser.parse_args(argv)
    bad = [n for n in args.scenes if n <= 0 or n % bench_scan.SCENES_PER_REPEAT]
    if bad:
        parser.error(f"--scenes {bad[0]}: each count must be a positive multiple of {bench_scan.SCENES_PER_REPEAT}")
    if not args.workers or min(args.workers) < 1:
        parser.error("--workers: give counts of at least 1, comma-separated (1,2)")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.runs < MIN_RUNS:
        log(f"--runs {args.runs}: fewer than {MIN_RUNS} rounds, the figures are single measurements, not medians")
    loadavg_start = os.getloadavg()
    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="amber-bench-speed-"))
    (work / "runs").mkdir(parents=True, exist_ok=True)
    try:
        regions = build_regions(args.scenes, work, args.data)
        models = {m: random_resnet_model(work, args) if m == RANDOM_RESNET else bench_scan.check_model(m)
                  for m in args.models}
        configs = [Config(BASELINE, n, 0) for n in args.scenes] + [
            Config(m, n, w) for n in args.scenes for m in args.models for w in args.workers]
        with contextlib.ExitStack() as stack:
            server = stack.enter_context(bench_scan.serve(regions[max(args.scenes)].path))
            bench = Bench(models, regions, server, work, keep=args.keep_runs)
            warm = None if args.no_warmup else bench.warm()
            if warm:
                log(f"warm-up scan (tile cache filled, not counted): {warm['wall_s']:.1f} s, {warm['requests']} requests")
            runs = []
            for round_, config in interleaved(configs, args.runs):
                runs.append(bench.measure(config, round_))
                res = runs[-1]["result"]
                log(f"round {round_} {config.name}: {res['wall_s']:.1f} s wall, "
                    f"{res['peak_rss_mb']:.0f} MB, load {runs[-1]['loadavg_1m']:.1f}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    loadavg_end = os.getloadavg()
    with_ratios(runs)
    rows = [summarise(c, [r for r in runs if r["config"] == c.name]) for c in configs]
    checks = memory_checks(rows)
    print()
    print_table(rows)
    print()
    for check in checks:
        print(f"memory {check['model']} workers {check['workers']}: {check['large']:.0f} MB at {max(args.scenes)} "
              f"scenes vs {check['small']:.0f} MB at {min(args.scenes)}: {check['growth']:+.1%} "
              f"(limit +{bench_scan.RSS_TOLERANCE:.0%}): {'PASS' if check['passed'] else 'FAIL'}")
    print(f"load average (1, 5, 15 min): start {', '.join(f'{x:.2f}' for x in loadavg_start)}; "
          f"end {', '.join(f'{x:.2f}' for x in loadavg_end)}; {os.cpu_count()} CPUs")
    for model, flagged in bench.flagged_ref.items():
        print(f"{model} flags per {bench_scan.SCENES_PER_REPEAT} scenes: {', '.join(flagged) or 'none'}")
    for problem in bench.problems:
        print(f"WRONG RESULT: {problem}")
    if args.json:
        from amber_hunter import atomic

        atomic.write_json(args.json, {
            "command": [Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv)),
            "machine": bench_rescore.machine(),
            "models": models,
            "loadavg_start": loadavg_start,
            "loadavg_end": loadavg_end,
            "warm_up": warm,
            "rows": rows,
            "memory_checks": checks,
            "flagged_scenes": bench.flagged_ref,
            "problems": bench.problems,
            "runs": runs,
        })
        print(f"wrote {args.json}")
    if bench.problems:
        return 2
    return 0 if all(c["passed"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
