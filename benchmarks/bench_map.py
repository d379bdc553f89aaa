"""map.html with 10,000 detections (issue 11): the page's size and the time it takes to open in
headless Chromium (Debian's chromium + chromedriver, through Selenium), median of 3.

A synthetic run is written straight into a RunStore: 10,000 flagged scenes on a 100x100 grid of
zoom-18 scene cells, each with 3 positive superpixels (20-vertex outlines) and capture dates over
three years, plus 500 failed and 500 no-imagery scenes. It has no tiles, so the export makes no
imagery: what is measured is the page. "Open" runs from ``driver.get`` of the file:// URL to the
page's script having drawn everything (``amber.ready``) and the marker clusters being on the map,
with no console error and no request leaving the machine.

    python benchmarks/bench_map.py [--scenes 10000] [--rounds 3] [--out benchmarks/results-map.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's amber_hunter, installed or not
sys.path.insert(0, str(ROOT / "tests"))  # the Selenium helper shared with the browser test

ZOOM, SIZE = 18, 4


def synthetic_run(run_dir: Path, n: int) -> None:
    import mercantile
    import numpy as np

    from amber_hunter.geo.tiles import SceneCell
    from amber_hunter.model.detect import SceneResult
    from amber_hunter.run.config import RunConfig
    from amber_hunter.run.store import RegionRecord, RunStore, SceneRecord

    side = math.ceil(math.sqrt(n * 1.1))
    t = mercantile.tile(26.0, 51.0, ZOOM)
    x0, y0 = t.x & ~(SIZE - 1), t.y & ~(SIZE - 1)
    cells = [SceneCell(ZOOM, x0 + SIZE * (k % side), y0 + SIZE * (k // side), SIZE) for k in range(side * side)]
    w, n_ = cells[0].bounds.west, cells[0].bounds.north
    e, s = cells[-1].bounds.east, cells[-1].bounds.south
    config = RunConfig(aoi=f"{w + 1e-7},{s + 1e-7},{e - 1e-7},{n_ - 1e-7}", tiles=str(run_dir / "no-tiles"),
                       zoom=ZOOM, scene_tiles=SIZE)
    rng = np.random.default_rng(0)
    with RunStore(run_dir, config) as store:
        store.add_scenes(cells)
        for k, cell in enumerate(cells):
            b = cell.bounds
            if k >= n:
                status = "failed" if k % 2 else "no-imagery"
                store.record(SceneRecord(cell.scene_id, status, b, error="synthetic"))
                continue
            regions = []
            for label in (1, 2, 3):
                cx, cy = rng.uniform(200, 800, 2)
                angles = np.linspace(0, 2 * np.pi, 21)
                rows, cols = cy + 60 * np.sin(angles), cx + 60 * np.cos(angles)
                lon, lat = cell.pixel_to_lonlat(rows, cols)
                ring = np.round(np.column_stack([lon, lat]), 7).tolist()
                ring[-1] = ring[0]
                regions.append(RegionRecord(label, 0.9 + 0.03 * label, True, 5000.0,
                                            b, {"type": "Polygon", "coordinates": [ring[::-1]]}))
            result = SceneResult(True, 3, 30, [0.93, 0.96, 0.99], [1, 2, 3], 0.8, 2, 0.99, 39000, 15000.0)
            store.record(SceneRecord(cell.scene_id, "done", b, result=result, regions=tuple(regions),
                                     capture_date=dt.date(2014 + k % 3, 6, 1), valid_fraction=1.0))


def open_page(page: Path, profile: Path) -> dict:
    import chromium

    browser = chromium.Browser(profile)
    try:
        start = time.perf_counter()
        browser.driver.get(page.as_uri())
        browser.wait("return !!(window.amber && window.amber.ready) && document.querySelectorAll('.marker-cluster').length > 0",
                     "the page never got ready")
        seconds = time.perf_counter() - start
        errors, outside = browser.errors(), browser.outside_requests()
        clusters = browser.js("return document.querySelectorAll('.marker-cluster').length")
    finally:
        browser.quit()
    return {"open_s": round(seconds, 3), "console_errors": len(errors), "outside_requests": len(outside),
            "clusters_drawn": clusters}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results-map.json")
    args = parser.parse_args(argv)
    from amber_hunter.export.writers import export

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        synthetic_run(tmp / "run", args.scenes)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        paths, summary = export(tmp / "run", tmp / "out", basemap="none")
        export_s = time.perf_counter() - t0
        html_bytes = paths.map.stat().st_size
        rounds = [open_page(paths.map, tmp / f"profile{i}") for i in range(args.rounds)]
    result = {
        "scenes_flagged": summary.scenes_flagged,
        "html_bytes": html_bytes,
        "html_mb": round(html_bytes / 1e6, 2),
        "open_median_s": statistics.median(r["open_s"] for r in rounds),
        "rounds": rounds,
        "export_s": round(export_s, 2),
        "synthetic_run_s": round(build_s, 2),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average": [round(x, 2) for x in os.getloadavg()]},
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    ok = result["open_median_s"] < 5 and html_bytes < 5e6 and all(r["console_errors"] == r["outside_requests"] == 0
                                                                   for r in rounds)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
