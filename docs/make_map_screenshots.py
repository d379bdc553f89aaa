"""Screenshots of the demo run's map.html for the README: the overview, and a detection's popup.

    python docs/make_map_screenshots.py [--out-dir docs] [--work DIR] [--model fast]

Runs the end-to-end demo (``training/run_demo.py``: the six example scenes as a tiny tile server,
scanned over HTTP) with ``--basemap none``, so the map's background is the run's own imagery,
then opens ``map.html`` in headless Chromium (Selenium) and saves ``docs/map-overview.png`` and
``docs/map-popup.png``. ``--work`` keeps the demo folder between calls (a rerun resumes it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "training"), str(ROOT / "tests")]


def shoot(page: Path, out_dir: Path, profile: Path) -> list[Path]:
    import chromium

    browser = chromium.Browser(profile, size=(1280, 860))
    try:
        browser.driver.get(page.as_uri())
        browser.wait("return !!(window.amber && window.amber.ready)", "the page never got ready")
        time.sleep(2.0)  # imagery overlays load after the move
        overview = out_dir / "map-overview.png"
        browser.driver.save_screenshot(str(overview))
        scene = browser.js("const a = window.AMBER.scenes; return a.length ? a[0][0] : null")
        if scene is None:
            raise SystemExit("the demo run flagged no scene: nothing to show in a popup")
        browser.js("const m = amber.markers[arguments[0]]; amber.map.setView(m.getLatLng(), 17);"
                   "setTimeout(() => m.openPopup(), 800)", scene)
        browser.wait("const im = document.querySelector('.amber-picture'); return im && im.complete && im.naturalWidth > 0",
                     "the popup's picture did not load")
        browser.wait("const el = document.querySelector('.amber-sp'); return el && !el.textContent.includes('loading')",
                     "outlines never loaded")
        browser.js("const p = document.querySelector('.leaflet-popup'); if (p) p.scrollIntoView();")
        time.sleep(1.5)
        popup = out_dir / "map-popup.png"
        browser.driver.save_screenshot(str(popup))
        assert browser.errors() == [] and browser.outside_requests() == []
    finally:
        browser.quit()
    return [overview, popup]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "docs")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--model", default="fast", help="model for the demo scan (default: the bundled fast model)")
    args = parser.parse_args(argv)
    from run_demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        result = run_demo(work, model=args.model, basemap="none")
        for path in shoot(result.paths.map, args.out_dir, Path(tmp) / "profile"):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
