"""Embeddings in shards at 500,000-scene scale (issue 10, Build 6): rescore speed from shards
against the scan's speed, memory that stays flat as the run grows, disk per scene, float16 against
float32, and ``status`` on a 500,000-scene store.

* **float16 or float32.** On a real run of the demo region (``training/run_demo.py``, the bundled
  default model; ``--demo-run``) every stored vector is scored from float32 and from float16 by the
  run's model: the scenes whose flag changes, the largest probability change, the superpixels that
  cross the threshold. The same on the 860 labelled crops of the shared dataset with the ``fast``
  (texture) model (``--crops``; their embeddings from the embedding cache). And the bytes per scene
  of the demo run's real vectors under several Parquet encodings.
* **Synthetic runs** of ``--small`` and ``--large`` scenes x ``--superpixels`` superpixels at the
  default model's width, written through ``RunStore.record`` (the scan's own path: staged, sealed
  into shards). The vectors are the demo run's real ones, each row scaled by random noise (1 +- 5 %),
  so the model's probabilities are spread as on real scenes; the noise makes them compress less
  than real ones (the real bytes per scene are the figure above). Each scene's stored verdicts are
  the model's own, so a rescore with the same model must change nothing: that checks the shards'
  exactness at scale. Timed: scenes/s through the store.
* **Rescore.** ``rescore_run`` with the run's own model, in a fresh subprocess per round (its peak
  RSS from ``getrusage``), ``--rounds`` rounds per run interleaved, median. The rounds run on the
  same run directory (each adds a model version; the verdicts do not change). The large run's peak
  RSS must be within 10 % of the small run's. Rescore seconds per scene are set against the scan's
  per-scene seconds of the default model from ``benchmarks/results-rescore.json`` (issue 9's 96-scene
  HTTP scan); the acceptance asks for >= 50x.
* **status** on a store of ``--status-scenes`` scene rows and as many scene events (plain SQL
  inserts), median of 7 calls, against the previous version's queries (a pass over the scene and
  event rows) run on the same database.

The machine is shared: load averages are recorded; ratios are measured in the same run.

    python benchmarks/bench_shards.py [--demo-run DIR] [--small 1000] [--large 10000] [--superpixels 30] \
        [--rounds 3] [--status-scenes 500000] [--workdir DIR] [--out benchmarks/results-shards.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amber_hunter.geo.tiles import Bounds, SceneCell
from amber_hunter.model.classify import bundled_model_path, load_bundle
from amber_hunter.model.detect import SceneResult
from amber_hunter.run.config import RunConfig
from amber_hunter.run.store import RegionRecord, RunStore, SceneRecord

BOX = Bounds(26.0, 50.0, 26.01, 50.01)
#: The previous store's status queries (one Parquet file per scene, schema 2), for comparison.
OLD_STATUS = [
    "SELECT status, COUNT(*) FROM scenes WHERE in_grid GROUP BY status",
    ("SELECT SUM(in_grid AND status = 'done' AND flagged), SUM(in_grid AND status = 'done' AND valid_fraction < 1), "
     "SUM(NOT in_grid) FROM scenes"),
    ("SELECT MAX(e.ts) FROM events e WHERE e.kind = 'start' AND EXISTS "
     "(SELECT 1 FROM events s WHERE s.kind = 'scene' AND s.ts >= e.ts)"),
    "SELECT COUNT(*), MIN(ts), MAX(ts) FROM events WHERE kind = 'scene' AND ts >= 0",
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {message}", file=sys.stderr, flush=True)


def real_vectors(run: Path) -> tuple[list[tuple[str, int]], np.ndarray]:
    """The stored vectors of a run, of either layout (shards, or one file per scene)."""
    import pyarrow.parquet as pq

    if any((run / "embeddings").glob("shard-*.parquet")) or not any((run / "embeddings").glob("*.parquet")):
        with RunStore(run) as store:
            keys, vectors = [], []
            for batch in store.embedding_batches():
                keys += list(zip(batch.scene_ids, batch.labels.tolist()))
                vectors.append(batch.vectors)
        return keys, np.concatenate(vectors)
    table = pq.read_table(run / "embeddings")
    vectors = np.asarray(table.column("vector").combine_chunks().flatten().to_numpy(), np.float32)
    return list(zip(table.column("scene_id").to_pylist(), table.column("label").to_pylist())), \
        vectors.reshape(table.num_rows, -1)


def _flips(bundle, v32: np.ndarray) -> dict:
    p32 = bundle.predict_proba(v32)
    p16 = bundle.predict_proba(v32.astype(np.float16).astype(np.float32))
    t = bundle.metadata.threshold
    return {"rows": len(v32), "dim": v32.shape[1], "max_abs_value": float(np.abs(v32).max()),
            "float16_overflows": int(np.isinf(v32.astype(np.float16)).sum()),
            "max_abs_dp": float(np.abs(p16 - p32).max()), "median_abs_dp": float(np.median(np.abs(p16 - p32))),
            "crossing_threshold": int(((p16 >= t) != (p32 >= t)).sum()), "threshold": t,
            "_p32": p32, "_p16": p16}


def compact_form(demo_run: Path, crops: Path | None, min_positive: int) -> dict:
    """float16 against float32 on the demo run and the labelled crops; bytes per scene by encoding."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys, v32 = real_vectors(demo_run)
    bundle = load_bundle(bundled_model_path("default"))
    demo = _flips(bundle, v32)
    t = bundle.metadata.threshold
    scenes = sorted({s for s, _ in keys})

    def flags(p):
        return {s: sum(x >= t for (k, _), x in zip(keys, p) if k == s) > min_positive for s in scenes}

    f32, f16 = flags(demo.pop("_p32")), flags(demo.pop("_p16"))
    demo |= {"scenes": len(scenes), "flagged_float32": sorted(s for s in scenes if f32[s]),
             "scenes_flag_changed_by_float16": sorted(s for s in scenes if f32[s] != f16[s]),
             "zero_fraction": float((v32 == 0).mean())}
    sizes = {}
    split = {"use_dictionary": False, "use_byte_stream_split": ["vector.list.element"]}
    for name, array, options in [("float32 snappy (the old per-scene files)", v32, {}),
                                 ("float32 zstd", v32, {"compression": "zstd"}),
                                 ("float32 byte-stream-split + zstd (the shards)", v32, {"compression": "zstd", **split}),
                                 ("float16 snappy", v32.astype(np.float16), {}),
                                 ("float16 byte-stream-split + zstd", v32.astype(np.float16), {"compression": "zstd", **split})]:
        buf = io.BytesIO()
        pq.write_table(pa.table({"vector": pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), v32.shape[1])}),
                       buf, **options)
        sizes[name] = {"bytes_per_scene": round(buf.tell() / len(scenes)), "of_raw_float32": round(buf.tell() / v32.nbytes, 3)}
    result = {"demo_run": {"run": str(demo_run), "model": "default", **demo}, "bytes_per_scene": sizes}
    if crops is not None:
        from amber_hunter.learn.cache import embed_files
        from amber_hunter.learn.dataset import load_dataset

        fast = load_bundle(bundled_model_path("fast"))
        dataset = load_dataset([crops])
        features, _ = embed_files(dataset.paths, fast.build_embedder(), None)
        flips = _flips(fast, np.asarray(features, np.float32))
        del flips["_p32"], flips["_p16"]
        result["crops_fast_model"] = {"data": str(crops), **flips}
    return result


def build_run(run: Path, n_scenes: int, superpixels: int, base: np.ndarray, seed: int) -> dict:
    """A synthetic run written through RunStore.record, its verdicts the default model's own."""
    bundle = load_bundle(bundled_model_path("default"))
    config = RunConfig(aoi="26.24,50.61,26.27,50.63", tiles=str(run.parent), model=str(bundled_model_path("default")))
    rng = np.random.default_rng(seed)
    cells = [SceneCell(18, 4 * k, 88196, 4) for k in range(n_scenes)]
    threshold, min_positive = bundle.metadata.threshold, config.min_positive
    record_s = 0.0
    started = time.perf_counter()
    with RunStore(run, config) as store:
        store.add_scenes(cells)
        for first in range(0, n_scenes, 128):  # predicted 128 scenes at a time, recorded one by one
            chunk = cells[first:first + 128]
            vectors = (base[rng.integers(0, len(base), superpixels * len(chunk))]
                       * rng.uniform(0.95, 1.05, (superpixels * len(chunk), base.shape[1]))).astype(np.float32)
            probs = bundle.predict_proba(vectors)
            for k, cell in enumerate(chunk):
                rows = slice(k * superpixels, (k + 1) * superpixels)
                p = probs[rows]
                positive = p >= threshold
                n_pos = int(positive.sum())
                regions = tuple(RegionRecord(g + 1, float(p[g]), bool(positive[g]), 100.0, BOX) for g in range(superpixels))
                result = SceneResult(flagged=n_pos > min_positive, n_positive=n_pos, n_superpixels=superpixels,
                                     probabilities=p.tolist(), positive_labels=[g + 1 for g in np.flatnonzero(positive)],
                                     threshold=threshold, min_positive=min_positive, max_probability=float(p.max()),
                                     positive_area_px=100 * n_pos, positive_area_m2=100.0 * n_pos)
                t = time.perf_counter()
                store.record(SceneRecord(cell.scene_id, "done", BOX, result=result, regions=regions,
                                         embeddings=vectors[rows], embedding_labels=tuple(range(1, superpixels + 1)),
                                         embedder=bundle.metadata.embedder, model=config.model_hash, valid_fraction=1.0))
                record_s += time.perf_counter() - t
        t = time.perf_counter()
    close_s = time.perf_counter() - t  # the last seal, on the store's normal exit
    with RunStore(run) as store:
        shards = store._db.execute("SELECT COUNT(*), SUM(bytes), SUM(rows) FROM shards").fetchone()
        flagged = store.status().flagged
    return {"scenes": n_scenes, "superpixels_per_scene": superpixels, "dim": int(base.shape[1]),
            "build_s": time.perf_counter() - started, "record_s": record_s + close_s,
            "store_scenes_per_s": n_scenes / (record_s + close_s), "shards": shards[0],
            "shard_bytes_per_scene": shards[1] / n_scenes, "rows": shards[2], "flagged": flagged,
            "sqlite_bytes": sum(p.stat().st_size for p in run.glob("run.sqlite*"))}


RESCORE_CHILD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[3])
def rss_mb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024
from amber_hunter.run.rescore import rescore_run
before = rss_mb()
t = time.perf_counter()
diff = rescore_run(sys.argv[1], sys.argv[2])
wall = time.perf_counter() - t
print(json.dumps({"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_before_mb": before, "rss_end_mb": rss_mb(),
                  "summary": {k: v for k, v in diff.summary().items() if not k.startswith("scenes_")}}))
"""


def rescore_round(run: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", RESCORE_CHILD, str(run), str(bundled_model_path("default")), str(ROOT)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"loadavg_1m": os.getloadavg()[0]}


def status_timing(work: Path, n: int) -> dict:
    """status() on n scene rows and n scene events, against the old queries on the same database."""
    run = work / "status-run"
    shutil.rmtree(run, ignore_errors=True)
    with RunStore(run, RunConfig(aoi="26.24,50.61,26.27,50.63", tiles=str(work))) as store, store._db:
        store._db.executemany(
            "INSERT INTO scenes (scene_id, status, flagged, valid_fraction) VALUES (?, ?, ?, ?)",
            ((f"18/{4 * k}/0/4", ("done", "pending", "failed", "no-imagery")[k % 4], int(k % 9 == 0),
              1.0 - (k % 5 == 0) * 0.5) for k in range(n)))
        store._db.executemany("INSERT INTO events (ts, kind, scene_id, message) VALUES (?, 'scene', ?, 'done')",
                              ((1e9 + k, f"18/{4 * k}/0/4") for k in range(n)))
    db = sqlite3.connect(run / "run.sqlite")
    plans = {sql: [r[3] for r in db.execute(f"EXPLAIN QUERY PLAN {sql}")] for sql in OLD_STATUS}
    old, new = [], []
    for _ in range(7):  # interleaved
        t = time.perf_counter()
        for sql in OLD_STATUS:
            db.execute(sql).fetchall()
        old.append(time.perf_counter() - t)
        with RunStore(run) as store:
            t = time.perf_counter()
            status = store.status()
            new.append(time.perf_counter() - t)
    db.close()
    shutil.rmtree(run)
    return {"scene_rows": n, "event_rows": n, "status_ms_median": 1000 * statistics.median(new),
            "old_queries_ms_median": 1000 * statistics.median(old),
            "speedup": statistics.median(old) / statistics.median(new),
            "status": {"total": status.total, "done": status.done, "flagged": status.flagged, "partial": status.partial},
            "old_query_plans": plans}


def machine() -> dict:
    import pyarrow

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "pyarrow": pyarrow.__version__, "sqlite": sqlite3.sqlite_version}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-run", type=Path, required=True, help="a run of the demo region with the default model")
    parser.add_argument("--crops", type=Path, help="the labelled crops (texty-amber) for the fast-model float16 check")
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=10000)
    parser.add_argument("--superpixels", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--status-scenes", type=int, default=500_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-shards"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results-shards.json")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the synthetic runs of an earlier call in --workdir (their build figures too)")
    args = parser.parse_args(argv)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"what": "embeddings in shards at scale (issue 10, Build 6); see benchmarks/bench_shards.py",
                    "command": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
                    "machine": machine(), "loadavg_start": os.getloadavg()}

    log("status on a big store")
    result["status"] = status_timing(work, args.status_scenes)
    log(f"status: {result['status']['status_ms_median']:.2f} ms, old queries {result['status']['old_queries_ms_median']:.0f} ms")

    log("float16 vs float32")
    result["compact_form"] = compact_form(args.demo_run, args.crops, 2)
    log(json.dumps(result["compact_form"]["demo_run"], default=str)[:400])

    _, base = real_vectors(args.demo_run)
    runs = {}
    for name, n in (("small", args.small), ("large", args.large)):
        run = work / f"synthetic-{name}"
        built = work / f"synthetic-{name}.json"
        if not (args.reuse and built.is_file() and json.loads(built.read_text())["scenes"] == n):
            shutil.rmtree(run, ignore_errors=True)
            log(f"building the {name} run: {n} scenes")
            built.write_text(json.dumps(build_run(run, n, args.superpixels, base, seed=n)))
        runs[name] = {"build": json.loads(built.read_text()), "rounds": []}
        log(f"{name}: {runs[name]['build']}")
    for k in range(args.rounds):
        for name in (("small", "large") if k % 2 == 0 else ("large", "small")):
            r = rescore_round(work / f"synthetic-{name}")
            runs[name]["rounds"].append(r)
            log(f"rescore {name} round {k + 1}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB")
    scan = json.loads((ROOT / "benchmarks" / "results-rescore.json").read_text())["models"]["default"]["scan"]
    for name, entry in runs.items():
        rounds = entry["rounds"]
        wall = statistics.median(r["wall_s"] for r in rounds)
        entry["rescore"] = {
            "median_s": wall, "s_per_scene": wall / entry["build"]["scenes"],
            "peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in rounds),
            "rss_end_minus_before_mb_median": statistics.median(r["rss_end_mb"] - r["rss_before_mb"] for r in rounds),
            "changed_nothing": all(r["summary"]["added"]["superpixels"] == r["summary"]["removed"]["superpixels"] == 0
                                   for r in rounds),
            "ratio_scan_over_rescore": scan["s_per_scene"] / (wall / entry["build"]["scenes"])}
    small, large = runs["small"]["rescore"], runs["large"]["rescore"]
    result["synthetic"] = runs
    result["acceptance"] = {
        "scan_s_per_scene": scan["s_per_scene"],
        "scan_source": "benchmarks/results-rescore.json models.default.scan (96 demo scenes over HTTP, issue 9)",
        "rescore_s_per_scene_large": large["s_per_scene"],
        "rescore_over_scan_speed": large["ratio_scan_over_rescore"], "meets_50x": large["ratio_scan_over_rescore"] >= 50,
        "peak_rss_large_over_small": large["peak_rss_mb_median"] / small["peak_rss_mb_median"],
        "memory_flat_within_10pc": large["peak_rss_mb_median"] <= 1.1 * small["peak_rss_mb_median"],
        "projection_450k_rescore_h": 450_000 * large["s_per_scene"] / 3600}
    result["loadavg_end"] = os.getloadavg()
    result["measured"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    log(json.dumps(result["acceptance"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
