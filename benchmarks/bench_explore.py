"""Timing of ``amber-hunter explore`` (issue 8): time to first render on the shared dataset with a
cold and a warm cache, projecting 50,000 synthetic points, and the page with 50,000 points in
Chromium (first render, then a filter change redrawn). Median of 3 rounds each.

The 50,000-point page repeats the shared dataset's points (with their real thumbnails) at
jittered positions: what is measured is the browser's side, not the projection.

"First render" runs from loading the data (embedding, out-of-fold predictions, UMAP) to the page
being ready in headless Chromium with every point drawn. Each round runs in a fresh Python
process, so numba's compilation and imports are counted as a user meets them. Cold rounds start
from an empty embedding and projection cache; warm rounds reuse one filled beforehand.

    python benchmarks/bench_explore.py [--data ../shared/datasets/texty-amber] [--rounds 3] \
        [--out benchmarks/results-explore.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's amber_hunter, installed or not


def first_render(data: str, cache: str) -> dict:
    """One round, in this process: load, serve, open in Chromium, wait for every point drawn."""
    start = time.perf_counter()
    from amber_hunter.explore.data import load_dataset_points
    from amber_hunter.explore.server import ExploreApp, start_in_thread

    points = load_dataset_points([data], "fast", cache_dir=cache)
    loaded = time.perf_counter()
    server, url = start_in_thread(ExploreApp(points))
    driver = _chromium()
    try:
        browser_up = time.perf_counter()
        driver.get(url)
        while not driver.execute_script("return !!(window.amber && window.amber.ready)"):
            time.sleep(0.02)
        drawn = driver.execute_script(_DRAWN_JS)
        ready = time.perf_counter()
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()
    assert drawn == len(points)
    return {"total_s": ready - start, "load_s": loaded - start, "page_s": ready - browser_up, "points": len(points),
            **{k: round(v, 3) for k, v in points.timings.items()}}


def _chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--window-size=1300,950"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def _repeated(points, n: int):
    """``points`` repeated to ``n`` points at jittered positions: every per-point field indexed."""
    import dataclasses

    import numpy as np

    rng = np.random.default_rng(0)
    m = len(points)
    idx = np.arange(n) % m
    changes = {}
    for f in dataclasses.fields(points):
        value = getattr(points, f.name)
        if isinstance(value, np.ndarray) and len(value) == m:
            changes[f.name] = value[idx]
        elif isinstance(value, list) and len(value) == m and f.name not in ("roots", "tree_names"):
            changes[f.name] = [value[i] for i in idx]
    spread = points.xy.std(axis=0)
    changes["xy"] = (points.xy[idx] + rng.normal(0, 0.3, (n, 2)) * spread).astype(np.float32)
    return dataclasses.replace(points, **changes)


def render_large(data: str, cache: str, n: int) -> dict:
    """The page with ``n`` points: time to every point drawn, then to a filter change redrawn."""
    from amber_hunter.explore.data import load_dataset_points
    from amber_hunter.explore.server import ExploreApp, start_in_thread

    points = _repeated(load_dataset_points([data], "fast", method="pca", cache_dir=cache), n)
    server, url = start_in_thread(ExploreApp(points))
    driver = _chromium()
    try:
        start = time.perf_counter()
        driver.get(url)
        while not driver.execute_script("return !!(window.amber && window.amber.ready)"):
            time.sleep(0.02)
        drawn = driver.execute_script(_DRAWN_JS)
        ready = time.perf_counter()
        driver.execute_script("const e = document.getElementById('pmin'); e.value = '0.5'; e.dispatchEvent(new Event('input'))")
        while (shown := driver.execute_script(_DRAWN_JS)) == drawn:
            time.sleep(0.01)
        filtered = time.perf_counter()
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()
    assert drawn == n and 0 < shown < n, (drawn, shown)
    return {"total_s": ready - start, "render_s": ready - start, "filter_s": filtered - ready, "points": n,
            "shown_after_filter": shown}


_DRAWN_JS = """const pv = Object.values(Bokeh.index)[0];
    return [...pv.renderer_views.values()].find(r => r.model.name === 'dots').glyph.sx.length"""


def project_synthetic(n: int) -> dict:
    from amber_hunter.explore.data import synthetic_points

    start = time.perf_counter()
    xy = synthetic_points(n)
    return {"total_s": time.perf_counter() - start, "points": len(xy)}


def _round(kind: str, *args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--round", kind, *args], capture_output=True, text=True, check=False,
                         env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if out.returncode != 0:
        raise SystemExit(f"round {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "texty-amber"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--synthetic", type=int, default=50_000)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results-explore.json"))
    parser.add_argument("--round", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.round in ("cold", "warm"):
        print(json.dumps(first_render(args.data, args.cache)))
        return
    if args.round == "project":
        print(json.dumps(project_synthetic(args.synthetic)))
        return
    if args.round == "large":
        print(json.dumps(render_large(args.data, args.cache, args.synthetic)))
        return

    results: dict = {"rounds": args.rounds, "data": args.data, "machine": {
        "cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version()}}
    work = Path(tempfile.mkdtemp(prefix="bench-explore-"))
    try:
        cold = []
        for k in range(args.rounds):
            cache = work / f"cold-{k}"
            cold.append(_round("cold", "--data", args.data, "--cache", str(cache)))
            print(f"cold round {k + 1}: {cold[-1]['total_s']:.1f} s", file=sys.stderr)
        warm_cache = work / "cold-0"  # filled by the first cold round
        warm = []
        for k in range(args.rounds):
            warm.append(_round("warm", "--data", args.data, "--cache", str(warm_cache)))
            print(f"warm round {k + 1}: {warm[-1]['total_s']:.1f} s", file=sys.stderr)
        project = []
        for k in range(args.rounds):
            project.append(_round("project", "--synthetic", str(args.synthetic)))
            print(f"UMAP of {args.synthetic} points, round {k + 1}: {project[-1]['total_s']:.1f} s", file=sys.stderr)
        large = []
        for k in range(args.rounds):
            large.append(_round("large", "--data", args.data, "--cache", str(warm_cache), "--synthetic", str(args.synthetic)))
            print(f"page with {args.synthetic} points, round {k + 1}: render {large[-1]['render_s']:.1f} s, "
                  f"filter {large[-1]['filter_s']:.2f} s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, rows in (("first_render_cold", cold), ("first_render_warm", warm), ("project_synthetic", project),
                       ("page_synthetic", large)):
        results[name] = {"median_s": round(statistics.median(r["total_s"] for r in rows), 2), "runs": rows}
    results["page_synthetic"]["median_filter_s"] = round(statistics.median(r["filter_s"] for r in large), 3)
    results["machine"]["load_average_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v["median_s"] for k, v in results.items() if isinstance(v, dict) and "median_s" in v}))


if __name__ == "__main__":
    main()
