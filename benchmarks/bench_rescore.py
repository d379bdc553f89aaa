"""Rescoring a run from its stored embeddings against the scan that produced it (issue 9).

The study needed two weeks to reprocess 450,000 images after its readers' corrections; the claim
of ``amber_hunter.run.rescore`` is that a run rescored from the embeddings it stored takes minutes.
This measures that claim on the same scenes, with the same model, in the same process and session,
so the ratio holds even though the machine is shared:

* **Region.** The offline demo region (``training/build_demo_region.py``) laid ``--repeat`` times
  (16 by default: 96 scenes), served over HTTP on 127.0.0.1 by a thread of this process that counts
  requests, as a user's tile server would be.
* **Scan (the baseline).** ``amber_hunter.run.scan.scan`` in this process into a fresh run
  directory (its tile cache empty, so every tile really goes over HTTP: 16 requests per scene),
  timed from the call to its return, model loading included. A warm-up ``Detector.load`` first
  imports the package, XGBoost and the bundle (untimed); a CNN embedder builds its network (and
  imports TensorFlow) lazily at the first scene, which the scan's time includes, as a CLI scan's
  would. ``steady_s_per_scene`` (from the run's event times, the first scene left out) is the
  per-scene rate without it. ``--scan-rounds`` scans, median (default 1: a default-model scan of
  96 scenes takes about 25 minutes on a loaded 2-core box); each must flag the same scenes, once
  per repeat of the grid.
* **Rescore.** ``rescore_run`` on a fresh copy of the first scan's run directory every round (the
  copy is not timed), so every round starts from the same state: no model versions yet, so each
  round also pays the copy of the scan's model as ``v1``. ``--rounds`` rounds (>= 3), median. Three
  models, interleaved round by round (the order rotates):

  - ``same``: the scan's own model. Nothing changes; this is the pure cost of reading every stored
    embedding, predicting, re-deciding every scene and committing.
  - ``retrained``: the model a real feedback loop makes. On a copy of the run, the first flagged
    scene is reported as not mining (a polygon over the scene), ``import_feedback`` maps it onto
    the scene's superpixels and ``retrain`` builds the next version on the shared dataset (its
    crops' embeddings from the embedding cache, as the CLI does) plus those hard negatives. That
    retrain is timed once (it rescores the run itself too) and its bundle is what the rounds use.
  - ``looser``: the scan's model with its threshold lowered until 5 % of the superpixels the scan
    called negative become positive, a bigger change than a feedback retrain usually makes.

  A rescore reads a scene's stored SLIC label map when it gains a positive superpixel, for its
  outline (a run scanned before label maps were stored segments it again from the tiles; the
  profile round counts both); it draws no map picture (``map.html`` draws pictures from the tiles
  when it is written). Every rescore must
  make no tile request (the server's count is checked) and decide as expected: ``same`` changes
  nothing, ``retrained`` makes the retrain's own diff, ``looser`` only adds.
* **Memory.** RSS of this process is sampled from ``/proc/self/status`` every 10 ms during each
  rescore; the peak minus the RSS just before is recorded (a lower bound: the process reuses heap
  freed by the scan and earlier rounds). ``rescore_run`` streams the shards batch by batch and
  keeps 12 bytes a superpixel; the float32 vectors per scene are projected too, for comparison.
* **Profile.** One extra round of each model runs under ``cProfile`` (not counted in the times):
  the share of the rescore spent reading the Parquet shards, predicting, reading the scene rows,
  reading label maps, outlining new positives, committing and writing the diff.
* **Projection to 450,000 scenes** (the study's count): rescore seconds per scene x 450,000 (the
  fixed costs, model load and the v1 copy, are spread over the scenes, so it errs high), the
  embeddings' bytes on disk per scene x 450,000, the shards per scene x 450,000, the stored label
  maps' bytes per scene x 450,000 and the embeddings' float32 size in memory per scene x 450,000.
  Per-scene costs are assumed linear, which this benchmark cannot test at that scale.

The machine is shared: the load average is recorded at every measurement; judge absolute seconds
by it, and the ratio (scan / rescore, medians of the same session) over them.

    python benchmarks/bench_rescore.py [--models fast default] [--repeat 16] [--rounds 3] \
        [--scan-rounds 1] [--out benchmarks/results-rescore.json] [--workdir DIR] [--data DIR] \
        [--cache-dir DIR]
    python benchmarks/bench_rescore.py --rederive --out benchmarks/results-rescore.json [--workdir DIR]

``--out`` is merged: a model measured now replaces that model's entry and leaves the others, so
``fast`` and ``default`` can be measured in separate invocations. ``--rederive`` measures nothing:
it recomputes the medians, ratios and projections from the raw rounds in ``--out`` (and the
profiles from the ``.prof`` files a kept ``--workdir`` holds). Exit code 0 when every check
passed, 2 when a scan or a rescore did something else than expected.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import importlib.util
import json
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's amber_hunter, installed or not

#: The study's image count, for the projection.
STUDY_SCENES = 450_000
TILES_PER_SCENE = 16
MIN_ROUNDS = 3
#: The looser model turns this share of the scan's negative superpixels positive.
LOOSER_SHARE = 0.05
TARGET_RATIO = 50
RSS_SAMPLE_S = 0.01
#: Functions whose cumulative time the profile reports, by (file suffix, function name).
PROFILED = {
    "read embeddings (Parquet)": ("run/store.py", "embeddings"),
    "stored vectors (Parquet -> numpy, index)": ("run/rescore.py", "_stored_vectors"),
    "predict (XGBoost, linear heads)": ("model/classify.py", "predict_proba"),
    "load the model bundle": ("model/classify.py", "load_bundle"),
    "copy the scan's model as v1": ("run/rescore.py", "ensure_first_version"),
    "read scene rows": ("run/store.py", "scenes"),
    "read superpixel rows (per scene)": ("run/store.py", "regions"),
    "decide scenes": ("run/rescore.py", "_decide"),
    "stored label maps of scenes with new positives": ("run/resegment.py", "scene_labels"),
    "segment again from stored tiles (runs without label maps)": ("run/resegment.py", "resegment"),
    "outlines of new positives": ("run/scan.py", "region_outline"),
    "write diff.geojson + diff.json": ("run/rescore.py", "_write_diff"),
    "commit (apply_rescore)": ("run/store.py", "apply_rescore"),
}


def log(message: str) -> None:
    """Progress on stderr, with the time and load, so a long run can be watched."""
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {message}", file=sys.stderr, flush=True)


def _load(name: str, path: Path):
    """A script of this repo as a module (``training/`` and ``benchmarks/`` are not packages)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


# The counting static server of bench_scan: one implementation of "serve the demo over HTTP".
bench_scan = _load("bench_scan", REPO / "benchmarks" / "bench_scan.py")


def machine() -> dict:
    """What ran this: CPU, memory, Python and the libraries whose speed the rescore depends on."""
    import numpy
    import pyarrow
    import xgboost

    cpu = next((line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem = next((int(line.split()[1]) // 1024 for line in _lines("/proc/meminfo") if line.startswith("MemTotal")), None)
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "memory_mb": mem, "platform": platform.platform(),
            "python": platform.python_version(), "numpy": numpy.__version__, "pyarrow": pyarrow.__version__,
            "xgboost": xgboost.__version__}


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _rss_kb() -> int:
    for line in _lines("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class PeakRss:
    """Peak RSS of this process during a ``with`` block, sampled from /proc (Linux only)."""

    def __init__(self):
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_kb())
            self._stop.wait(RSS_SAMPLE_S)

    def __enter__(self):
        self.start = self.peak = _rss_kb()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_kb())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 1024


def folder_bytes(folder: Path) -> tuple[int, int, int]:
    """(files, apparent bytes, bytes allocated on disk) of everything under ``folder``."""
    files = apparent = allocated = 0
    for path in folder.rglob("*"):
        if path.is_file():
            st = path.stat()
            files += 1
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return files, apparent, allocated


class ScanProgress:
    """The ``progress`` object ``scan`` wants: prints every ``every`` scenes, with the rate."""

    def __init__(self, total: int, label: str, every: int = 8):
        self.total, self.label, self.every, self.done = total, label, every, 0
        self.t0 = time.perf_counter()
        log(f"{label}: {total} scenes to scan")

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.done % self.every == 0 or self.done == self.total:
            elapsed = time.perf_counter() - self.t0
            left = elapsed / self.done * (self.total - self.done)
            log(f"{self.label}: {self.done}/{self.total} scenes, {elapsed:.0f} s ({elapsed / self.done:.1f} s/scene, "
                f"~{left / 60:.1f} min left)")

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------


def flagged_names(run: Path, names: dict[str, str]) -> list[str]:
    """The examples (positive1.png...) whose scenes are flagged, each named once: every repeat of
    the grid must flag the same ones, which the scene count checks."""
    from amber_hunter.run.store import RunStore

    with RunStore(run) as store:
        return sorted({names[s.scene_id] for s in store.scenes(flagged_only=True)})


def run_scan(model: str, region, server, run: Path, label: str) -> dict:
    """One timed scan of the region over HTTP into ``run``; its counts from the run's store."""
    from amber_hunter.run.config import RunConfig
    from amber_hunter.run.scan import scan
    from amber_hunter.run.store import RunStore

    config = RunConfig(aoi=str(region.out / "aoi.geojson"),
                       tiles=f"http://127.0.0.1:{server.server_port}{'/tiles/{z}/{x}/{y}.png'}",
                       zoom=18, scene_tiles=4, model=model)
    load, before = os.getloadavg(), server.requests()
    t0, c0 = time.perf_counter(), time.process_time()
    summary = scan(config, run, progress=lambda total: ScanProgress(total, label))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    with RunStore(run) as store:
        status = store.status()
        events = store.events()
    scene_ts = sorted(e.ts for e in events if e.kind == "scene")
    steady = (scene_ts[-1] - scene_ts[0]) / (len(scene_ts) - 1) if len(scene_ts) > 1 else None
    return {"wall_s": wall, "cpu_s": cpu, "s_per_scene": wall / status.done if status.done else None,
            "steady_s_per_scene": steady, "processed": summary.processed, "done": status.done,
            "failed": status.failed, "partial": status.partial, "flagged": status.flagged,
            "requests": server.requests() - before, "loadavg_start": load, "loadavg_end": os.getloadavg()}


def run_stats(run: Path) -> dict:
    """Superpixels and their probabilities, read through the store's API."""
    from amber_hunter.run.store import RunStore

    with RunStore(run) as store:
        scenes = [s for s in store.scenes() if s.status == "done"]
        probs = [(g.probability, g.positive) for s in scenes for g in store.regions(s.scene_id)
                 if g.probability is not None]
        n_emb = store.embeddings().num_rows
        label_maps = store.segmentation_bytes()
    return {"scenes": len(scenes), "superpixels_scored": len(probs), "embeddings": n_emb, "label_map_bytes": label_maps,
            "positive": sum(p for _, p in probs), "negative_probabilities": sorted(p for p, pos in probs if not pos)}


def looser_model(model: str, negatives: list[float], out: Path) -> tuple[Path, float, float]:
    """The scan's model with a threshold that makes ``LOOSER_SHARE`` of the scan's negative
    superpixels positive: a copy of the bundle with only ``threshold`` changed."""
    from amber_hunter.model.classify import load_bundle, resolve_model, save_bundle

    bundle = load_bundle(resolve_model(model))
    k = max(1, round(LOOSER_SHARE * len(negatives)))
    threshold = float(negatives[-k])  # the k highest negatives reach it (>= threshold is positive)
    metadata = dataclasses.replace(bundle.metadata, threshold=threshold)
    return save_bundle(dataclasses.replace(bundle, metadata=metadata), out), bundle.metadata.threshold, threshold


def retrained_model(model: str, source_run: Path, work: Path, args) -> tuple[Path, dict]:
    """The model a real feedback loop makes: on a copy of the run, one flagged scene (the first in
    grid order) is reported as not mining with a polygon over the whole scene, and ``retrain``
    builds the next version on the shared dataset plus that report. Its bundle (``models/v2``) is
    kept for the rescore rounds; the retrain's own time and diff are recorded (one round)."""
    from amber_hunter.feedback.reports import import_feedback
    from amber_hunter.feedback.retrain import retrain
    from amber_hunter.learn.data import find_texty_dataset
    from amber_hunter.learn.labels import LabelStore
    from amber_hunter.run.store import RunStore

    run = work / "runs" / f"{model}-retrain"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(source_run, run)
    with RunStore(run) as store:
        scene = next(s for s in store.scenes(flagged_only=True))
    b = scene.bounds
    report = work / f"{model}-report.geojson"
    report.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"verdict": "not-mining", "note": "bench_rescore: a reader's report"},
        "geometry": {"type": "Polygon", "coordinates": [[[b.west, b.south], [b.east, b.south], [b.east, b.north],
                                                          [b.west, b.north], [b.west, b.south]]]}}]}))
    labels_path = work / f"{model}-labels.sqlite"
    labels_path.unlink(missing_ok=True)
    data = find_texty_dataset(args.data)
    with LabelStore(labels_path) as labels:
        t0 = time.perf_counter()
        imported = import_feedback(run, report, labels)
        t1 = time.perf_counter()
        done = retrain(run, data=[data], labels=labels, cache_dir=args.cache_dir)
        t2 = time.perf_counter()
    folder = work / "models" / f"{model}-retrained"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(run / "models" / f"v{done.version}", folder)
    summary = done.diff.summary()
    info = {"reported_scene": scene.scene_id, "import_s": t1 - t0, "retrain_s": t2 - t1,
            "note": "one round; retrain_s includes loading the training crops' embeddings from the embedding cache "
                    "(--cache-dir, default the user's; warm here), two grouped out-of-fold fits (before, after), the "
                    "final fit and the rescore of the whole run",
            "superpixels_reported": imported.superpixels, "crops": done.crops, "run_superpixels": done.run_superpixels,
            "before": dataclasses.asdict(done.before), "after": dataclasses.asdict(done.after),
            "feedback_right": done.feedback_right,
            "diff": {k: summary[k] for k in ("added", "removed", "kept")},
            "reported_scene_flagged_after": scene.scene_id in {s.scene_id for s in _flagged(run)}}
    shutil.rmtree(run, ignore_errors=True)
    return folder, info


def _flagged(run: Path):
    from amber_hunter.run.store import RunStore

    with RunStore(run) as store:
        return list(store.scenes(flagged_only=True))


def time_rescore(source_run: Path, model: Path | str, copy: Path, server, profile: Path | None = None) -> dict:
    """Copy ``source_run`` to ``copy`` (untimed), then time ``rescore_run`` on the copy."""
    from amber_hunter.run.rescore import rescore_run

    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(source_run, copy)
    os.sync()  # the copy's dirty pages are written now, not during the timed rescore
    load, before = os.getloadavg(), server.requests()
    profiler = cProfile.Profile() if profile else None
    with PeakRss() as rss:
        t0, c0 = time.perf_counter(), time.process_time()
        if profiler:
            profiler.enable()
        diff = rescore_run(copy, model)
        if profiler:
            profiler.disable()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if profiler:
        profiler.dump_stats(profile)
    summary = diff.summary()
    result = {"wall_s": wall, "cpu_s": cpu, "rss_growth_mb": rss.growth_mb, "requests": server.requests() - before,
              "loadavg_1m": load[0], "added": summary["added"], "removed": summary["removed"], "kept": summary["kept"],
              "outlines_missing": summary["outlines_missing"],
              # each has its label map read, for the new positives' outlines
              "scenes_with_new_positives": len({scene for scene, _ in diff.added.superpixels})}
    shutil.rmtree(copy, ignore_errors=True)
    return result


def profile_breakdown(path: Path) -> dict:
    """Cumulative seconds of the functions in PROFILED, and their share of the whole rescore."""
    stats = pstats.Stats(str(path)).stats
    total = next((ct for (file, _, name), (_, _, _, ct, _) in stats.items()
                  if file.endswith("run/rescore.py") and name == "rescore_run"), None)
    parts = {}
    for what, (suffix, name) in PROFILED.items():
        # the outermost match: a name can match a wrapper and the function it calls (predict_proba)
        ct, calls = max(((v[3], v[1]) for (file, _, fn), v in stats.items() if file.endswith(suffix) and fn == name),
                        default=(0.0, 0))
        parts[what] = {"s": round(ct, 4), "share": round(ct / total, 4) if total else None, "calls": calls}
    top = sorted(((v[3], f"{Path(file).name}:{line} {fn}") for (file, line, fn), v in stats.items()),
                 reverse=True)[:25]
    return {"total_s": total, "parts": parts, "top_cumulative": [{"s": round(s, 4), "function": f} for s, f in top]}


def measure_model(model: str, region, server, work: Path, args) -> tuple[dict, list[str]]:
    """Scan(s), then interleaved rescore rounds of the same and the looser model; one model's entry."""
    from amber_hunter.model.classify import load_bundle, resolve_model
    from amber_hunter.model.detect import Detector

    problems: list[str] = []
    names = bench_scan.scene_names(region.out)
    n_scenes = len(region.scenes)
    loadavg_start = os.getloadavg()
    t0 = time.perf_counter()
    Detector.load(model)  # imports and a first load, untimed; a CNN is built lazily, in the first scene
    log(f"{model}: warm-up load {time.perf_counter() - t0:.1f} s (imports; not counted)")

    scans, flagged_ref = [], None
    for k in range(1, args.scan_rounds + 1):
        run = work / "runs" / f"{model}-scan{k}"
        shutil.rmtree(run, ignore_errors=True)
        result = run_scan(model, region, server, run, f"scan {model} {k}/{args.scan_rounds}")
        result["flagged_scenes"] = flagged_names(run, names)
        scans.append(result)
        log(f"scan {model} {k}: {result['wall_s']:.1f} s, {result['s_per_scene']:.2f} s/scene, "
            f"{result['flagged']} flagged, {result['requests']} tile requests")
        if flagged_ref is None:
            flagged_ref = result["flagged_scenes"]
        if (result["done"] != n_scenes or result["failed"] or result["partial"]
                or result["requests"] != TILES_PER_SCENE * n_scenes or result["flagged_scenes"] != flagged_ref
                or result["flagged"] != len(flagged_ref) * args.repeat):
            problems.append(f"{model} scan {k}: {result['done']} done of {n_scenes}, {result['failed']} failed, "
                            f"{result['partial']} partial, {result['requests']} requests, flagged {result['flagged']}")
        if k > 1:
            shutil.rmtree(run, ignore_errors=True)  # only the first scan's run is rescored
    source = work / "runs" / f"{model}-scan1"
    stats = run_stats(source)
    files, apparent, allocated = folder_bytes(source / "embeddings")
    looser, old_threshold, new_threshold = looser_model(model, stats.pop("negative_probabilities"),
                                                       work / "models" / f"{model}-looser")
    log(f"{model}: {stats['embeddings']} stored embeddings in {files} shards, {apparent / 1e6:.1f} MB; looser threshold "
        f"{old_threshold:.3f} -> {new_threshold:.3f}")

    log(f"{model}: retraining after a reader's report (one round)")
    retrained, retrain_info = retrained_model(model, source, work, args)
    log(f"{model}: retrain {retrain_info['retrain_s']:.1f} s (import {retrain_info['import_s']:.1f} s); its diff "
        f"{retrain_info['diff']}")

    variants = {"same": resolve_model(model), "retrained": retrained, "looser": looser}
    rounds = {name: [] for name in variants}
    for r in range(1, args.rounds + 1):
        k = (r - 1) % len(variants)  # rotate which goes first
        order = list(variants)[k:] + list(variants)[:k]
        for name in order:
            result = time_rescore(source, variants[name], work / "runs" / f"{model}-rescore", server)
            result["round"] = r
            rounds[name].append(result)
            log(f"rescore {model} {name} round {r}: {result['wall_s']:.2f} s, +{result['rss_growth_mb']:.0f} MB, "
                f"scenes +{result['added']['scenes']} -{result['removed']['scenes']}, superpixels "
                f"+{result['added']['superpixels']} -{result['removed']['superpixels']}")
    profiles = {}
    for name, path in variants.items():
        prof = work / f"{model}-{name}.prof"
        time_rescore(source, path, work / "runs" / f"{model}-rescore", server, profile=prof)
        profiles[name] = profile_breakdown(prof)
        log(f"profile {model} {name}: " + ", ".join(f"{k} {v['s']:.2f} s" for k, v in profiles[name]["parts"].items()
                                                     if v["s"] >= 0.01))

    for name, results in rounds.items():
        for res in results:
            changed = res["added"]["superpixels"] + res["removed"]["superpixels"] + res["removed"]["scenes"]
            if res["requests"]:
                problems.append(f"{model} rescore {name} round {res['round']}: {res['requests']} tile requests")
            if name == "same" and (changed or res["added"]["scenes"]):
                problems.append(f"{model} rescore same round {res['round']}: the scan's own model changed verdicts")
            if name == "retrained" and [res[k] for k in ("added", "removed", "kept")] != [
                    retrain_info["diff"][k] for k in ("added", "removed", "kept")]:
                problems.append(f"{model} rescore retrained round {res['round']}: another diff than the retrain's own")
            if name == "looser" and (res["removed"]["superpixels"] or not res["added"]["superpixels"]):
                problems.append(f"{model} rescore looser round {res['round']}: expected additions only")

    entry = {
        "model": model, "scenes": n_scenes, "repeat": args.repeat, "loadavg_start": loadavg_start,
        "loadavg_end": os.getloadavg(),
        "scan": {"rounds": len(scans), "flagged_scenes": flagged_ref, "runs": scans},
        "run": {**stats, "dim": load_bundle(resolve_model(model)).metadata.dim, "embedding_shards": files,
                "embeddings_bytes": apparent, "embeddings_bytes_on_disk": allocated},
        "retrain": retrain_info,
        "looser_threshold": {"scan": old_threshold, "looser": new_threshold, "share_of_negatives": LOOSER_SHARE},
        "rescore_models": {name: str(path) for name, path in variants.items()},
        "profile": profiles, "rounds": rounds,
    }
    return derive(entry), problems


def derive(entry: dict) -> dict:
    """The medians, ratios and 450,000-scene projections of ``entry``, from its raw measurements
    only (``scan.runs``, ``rounds``, ``run``), so ``--rederive`` can recompute them unmeasured."""
    from amber_hunter.model.classify import load_bundle, resolve_model

    n_scenes, scans, run = entry["scenes"], entry["scan"]["runs"], entry["run"]
    models = entry.get("rescore_models") or {name: row["model"] for name, row in entry["rescore"].items()}
    scan_s = statistics.median(s["wall_s"] for s in scans)
    entry["scan"].update({
        "note": ("one scan only (--scan-rounds 1): the baseline is that scan's time" if len(scans) == 1
                 else f"median of {len(scans)} scans"),
        "median_s": scan_s, "s_per_scene": scan_s / n_scenes,
        "cpu_s_per_scene": statistics.median(s["cpu_s"] for s in scans) / n_scenes,
        "steady_s_per_scene": statistics.median(s["steady_s_per_scene"] for s in scans)})
    rows = {}
    for name, results in entry["rounds"].items():
        wall = [res["wall_s"] for res in results]
        med = statistics.median(wall)
        per_scene = med / n_scenes
        first = results[0]
        rows[name] = {
            "model": models[name], "rounds": len(results), "median_s": med, "min_s": min(wall), "max_s": max(wall),
            "cpu_s": statistics.median(res["cpu_s"] for res in results), "s_per_scene": per_scene,
            "ratio_scan_over_rescore": scan_s / med, "meets_target": scan_s / med >= TARGET_RATIO,
            # in this process, after the scan and earlier rounds: freed heap is reused, so a lower bound
            "rss_growth_mb": statistics.median(res["rss_growth_mb"] for res in results),
            "changed": {"scenes_added": first["added"]["scenes"], "superpixels_added": first["added"]["superpixels"],
                        "scenes_with_new_positives": first["scenes_with_new_positives"],
                        "scenes_removed": first["removed"]["scenes"],
                        "superpixels_removed": first["removed"]["superpixels"]},
            "projection_450k": {"rescore_s": per_scene * STUDY_SCENES, "rescore_h": per_scene * STUDY_SCENES / 3600},
        }
    for name, row in rows.items():
        # A scene's label map is read for its new positives' outlines: the profile round (the same
        # rescore from the same copy) counted the calls.
        parts = entry.get("profile", {}).get(name, {}).get("parts", {})
        calls = parts.get("stored label maps of scenes with new positives", {})
        row["changed"]["scenes_outlined"] = calls.get("calls")
        # ("segment again from stored tiles": the part's name in results measured before label maps were stored)
        row["changed"]["scenes_segmented_again"] = parts.get(
            "segment again from stored tiles (runs without label maps)",
            parts.get("segment again from stored tiles", {})).get("calls")
        if name != "same" and calls.get("calls") and "same" in rows:
            row["s_per_scene_outlined"] = (row["median_s"] - rows["same"]["median_s"]) / calls["calls"]
    entry["rescore"] = rows
    dim = run.get("dim") or load_bundle(resolve_model(entry["model"])).metadata.dim
    run["dim"] = dim
    per_scene_bytes = run["embeddings_bytes"] / n_scenes
    vectors_per_scene = run["embeddings"] / n_scenes * dim * 4  # float32, as rescore_run holds them
    run.update({
        "superpixels_per_scene": run["embeddings"] / n_scenes,
        "embeddings_bytes_per_scene": per_scene_bytes,
        "embeddings_bytes_per_superpixel": run["embeddings_bytes"] / run["embeddings"] if run["embeddings"] else None,
        "vectors_bytes_per_scene_in_memory": vectors_per_scene,
        "projection_450k": {
            "embeddings_gb": per_scene_bytes * STUDY_SCENES / 1e9,
            "embeddings_gb_on_disk": run["embeddings_bytes_on_disk"] / n_scenes * STUDY_SCENES / 1e9,
            "shards": run["embedding_shards"] / n_scenes * STUDY_SCENES,
            "vectors_in_memory_gb": vectors_per_scene * STUDY_SCENES / 1e9,
            "label_maps_gb": (None if run.get("label_map_bytes") is None  # measured before label maps were stored
                              else run["label_map_bytes"] / n_scenes * STUDY_SCENES / 1e9),
            "memory_note": "rescore_run streams the shards batch by batch and keeps (scene, label, probability), "
                           "12 bytes a superpixel; vectors_in_memory_gb is what holding them all would take",
        }})
    return entry


def print_entry(entry: dict) -> None:
    scan = entry["scan"]
    run = entry["run"]
    print(f"\n{entry['model']}: {entry['scenes']} scenes, {run['embeddings']} stored embeddings, "
          f"{run['embeddings_bytes'] / 1e6:.1f} MB ({run['embeddings_bytes_per_scene'] / 1e3:.1f} kB/scene)")
    print(f"scan ({scan['note']}): {scan['median_s']:.1f} s, {scan['s_per_scene']:.2f} s/scene "
          f"(steady {scan['steady_s_per_scene']:.2f})")
    print("| rescore | median s (min-max) | s/scene | scan/rescore | RSS growth MB | changed | 450k scenes |")
    print("|---|---|---|---|---|---|---|")
    for name, r in entry["rescore"].items():
        c = r["changed"]
        print(f"| {name} | {r['median_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f}) | {r['s_per_scene'] * 1000:.1f} ms | "
              f"{r['ratio_scan_over_rescore']:.0f}x | {r['rss_growth_mb']:.0f} | scenes +{c['scenes_added']} "
              f"-{c['scenes_removed']}, superpixels +{c['superpixels_added']} -{c['superpixels_removed']} "
              f"({c.get('scenes_outlined')} scenes outlined, {c['scenes_segmented_again']} segmented again) | "
              f"{r['projection_450k']['rescore_h']:.2f} h |")
    t = entry["retrain"]
    print(f"retrain after one report: {t['retrain_s']:.1f} s (import {t['import_s']:.1f} s), diff {t['diff']}, "
          f"reported scene flagged after: {t['reported_scene_flagged_after']}")
    p = run["projection_450k"]
    maps = "not measured" if p.get("label_maps_gb") is None else f"{p['label_maps_gb']:.1f} GB"
    print(f"at 450,000 scenes: embeddings {p['embeddings_gb']:.1f} GB on disk ({p['shards']:.0f} shards), "
          f"label maps {maps}, {p['vectors_in_memory_gb']:.1f} GB as float32 if held at once (rescore_run streams them)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["fast"], help="bundled names (fast, default) or bundle folders")
    parser.add_argument("--repeat", type=int, default=16, help="lay the six demo scenes K times (6*K scenes; issue 9 asks >= 96)")
    parser.add_argument("--rounds", type=int, default=3, help=f"rescore rounds per model, >= {MIN_ROUNDS}")
    parser.add_argument("--scan-rounds", type=int, default=1, help="scans per model (the baseline), median")
    parser.add_argument("--out", type=Path, help="results JSON, merged by model")
    parser.add_argument("--workdir", type=Path, help="region, runs and profiles here, kept (default: a temporary folder)")
    parser.add_argument("--data", type=Path, help="texty-amber dataset folder (default: searched)")
    parser.add_argument("--rederive", action="store_true",
                        help="measure nothing: recompute the medians and projections of every model in --out "
                             "(and the profiles, from the .prof files in --workdir if given)")
    parser.add_argument("--cache-dir", type=Path,
                        help="embedding cache for the retrain's training crops (default: the user's, as the CLI)")
    args = parser.parse_args(argv)
    if args.rederive and not args.out:
        parser.error("--rederive needs --out")
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1 (issue 9 asks for 16: 96 scenes)")
    if args.scan_rounds < 1:
        parser.error("--scan-rounds must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rederive:
        return rederive(args.out, args.workdir, argv)
    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="amber-bench-rescore-"))
    (work / "runs").mkdir(parents=True, exist_ok=True)
    builder = _load("build_demo_region", REPO / "training" / "build_demo_region.py")
    problems: list[str] = []
    try:
        t0 = time.perf_counter()
        region = builder.build_demo_region(work / f"demo-x{args.repeat}", repeat=args.repeat, data=args.data)
        log(f"region: {len(region.scenes)} scenes in {region.out} ({time.perf_counter() - t0:.1f} s)")
        for model in args.models:
            with bench_scan.serve(region.out) as server:
                entry, found = measure_model(model, region, server, work, args)
            problems += found
            print_entry(entry)
            if args.out:
                write(args.out, entry, argv)
                log(f"wrote {args.out} ({model})")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    for problem in problems:
        print(f"WRONG RESULT: {problem}")
    return 2 if problems else 0


def rederive(out: Path, workdir: Path | None, argv) -> int:
    """Recompute the derived figures of every model in ``out`` from its raw measurements (and its
    profiles from their ``.prof`` files, when ``workdir`` still holds them)."""
    from amber_hunter import atomic

    data = json.loads(out.read_text())
    for entry in data["models"].values():
        for name in entry["rounds"]:  # the profiles again, if --workdir still holds them
            prof = workdir / f"{entry['model']}-{name}.prof" if workdir else None
            if prof is not None and prof.is_file():
                entry.setdefault("profile", {})[name] = profile_breakdown(prof)
        derive(entry)
        entry["rederived"] = {"command": [Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv)),
                              "when": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        print_entry(entry)
    atomic.write_json(out, data)
    return 0


def write(out: Path, entry: dict, argv) -> None:
    """Merge ``entry`` into ``out`` by model, with the command and the machine."""
    from amber_hunter import atomic

    try:
        data = json.loads(out.read_text())
    except (OSError, ValueError):
        data = {}
    models = data.get("models", {})
    models[entry["model"]] = {**entry, "command": [Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv)),
                              "machine": machine(), "measured": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    atomic.write_json(out, {"what": "rescore_run from stored embeddings vs the scan that produced it (issue 9); "
                                    "see benchmarks/bench_rescore.py", "models": models})


if __name__ == "__main__":
    sys.exit(main())
