"""Screenshots of ``amber-hunter explore`` for the README, taken in headless Chromium.

    python docs/make_screenshots.py [--data ../shared/datasets/texty-amber] [--work DIR]

Writes ``docs/explore-dataset.png`` (the shared dataset with the bundled default model, coloured
by out-of-fold confusion cell, a false positive's panel open with its Grad-CAM heatmap),
``docs/explore-panel.png`` (that panel alone) and ``docs/explore-run.png`` (a scan of the demo
region with the bundled texture model, coloured by probability, a flagged superpixel's panel open). The run is
scanned from the demo region's tile folder into ``--work`` (a temporary folder by default).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "training")]  # this checkout, and the demo-region builder


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--window-size=1280,1150", "--hide-scrollbars"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def _wait(driver, script: str, *args, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not driver.execute_script(script, *args):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for: {script[:80]}")
        time.sleep(0.1)


def _shoot(points, out: Path, pick, panel: Path | None = None) -> None:
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    from amber_hunter.explore.server import ExploreApp, start_in_thread
    from amber_hunter.learn.labels import LabelStore

    with tempfile.TemporaryDirectory() as tmp:
        store = LabelStore(Path(tmp) / "labels.sqlite")
        server, url = start_in_thread(ExploreApp(points, store))
        driver = _browser()
        try:
            driver.get(url)
            while not driver.execute_script("return !!(window.amber && window.amber.ready)"):
                time.sleep(0.05)
            i = pick(points)
            driver.execute_script("amber.openPanel(arguments[0])", i)
            while driver.execute_script("return amber.panelReady") != i:
                time.sleep(0.05)
            _wait(driver, """const im = document.getElementById('p-context');
                const ns = [...document.querySelectorAll('#p-neighbours img')];
                return im.complete && im.naturalWidth > 0 && ns.length > 0 && ns.every(n => n.complete && n.naturalWidth > 0);""")
            x, y = driver.execute_script("""const pv = Object.values(Bokeh.index)[0];
                const rv = [...pv.renderer_views.values()].find(r => r.model.name === 'dots');
                const b = pv.el.getBoundingClientRect(), i = arguments[0];
                return [b.left + rv.glyph.sx[i], b.top + rv.glyph.sy[i]];""", i)
            actions = ActionBuilder(driver)
            actions.pointer_action.move_to_location(int(x), int(y))
            actions.perform()
            _wait(driver, """const out = [];
                (function walk(n) { if (!n || !n.querySelectorAll) return; out.push(...n.querySelectorAll('img.amber-thumb'));
                  for (const el of n.querySelectorAll('*')) if (el.shadowRoot) walk(el.shadowRoot); })(document);
                return out.some(im => im.complete && im.naturalWidth > 0);""")
            if points.bundle.classifier.heads:  # a CNN model: wait for the Grad-CAM picture
                _wait(driver, """const im = document.getElementById('p-gradcam');
                    return amber.gradcamReady === arguments[0] && im.complete && im.naturalWidth > 0;""", i)
            time.sleep(0.3)
            driver.save_screenshot(str(out))
            if panel is not None:
                driver.find_element("id", "panel").screenshot(str(panel))
                print(f"wrote {panel}")
        finally:
            driver.quit()
            server.shutdown()
            server.server_close()
            store.close()
    print(f"wrote {out}")


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "texty-amber"))
    parser.add_argument("--work", default=None, help="Folder for the demo region and run (default: temporary).")
    parser.add_argument("--cache-dir", default=None, help="Embedding cache (default: the user cache).")
    args = parser.parse_args()

    from amber_hunter.explore.data import load_dataset_points, load_run_points

    docs = ROOT / "docs"
    points = load_dataset_points([args.data], "default", cache_dir=args.cache_dir)
    _shoot(points, docs / "explore-dataset.png",
           lambda p: int(np.flatnonzero(np.array(p.cell) == "FP")[np.argmax(p.probability[np.array(p.cell) == "FP"])]),
           panel=docs / "explore-panel.png")

    from build_demo_region import build_demo_region

    from amber_hunter.run.config import RunConfig
    from amber_hunter.run.scan import scan

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        region = build_demo_region(work / "demo-region", data=args.data)
        run = work / "demo-run"
        if not (run / "run.sqlite").is_file():
            scan(RunConfig(aoi=str(region.out / "aoi.geojson"), tiles=str(region.out / "tiles"), zoom=18,
                           scene_tiles=4, model="fast"), run)
        run_points = load_run_points(run)
        _shoot(run_points, docs / "explore-run.png",
               lambda p: int(np.argmax(np.where(p.flagged, p.probability, -1))))


if __name__ == "__main__":
    main()
