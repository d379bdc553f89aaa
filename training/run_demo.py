"""The end-to-end demo: build the demo region, serve it over HTTP, scan it, export the map.

    python training/run_demo.py [--out DIR] [--model MODEL] [--basemap osm|none|URL] [--data DATA_DIR]

This is the README's main command. It runs the whole region-scan path, offline, against a real
tile server: the demo region (the six Texty example scenes as zoom-18 tiles, see
``build_demo_region.py``) is built into ``DIR/demo-region`` unless it is already there, served by a
static HTTP server on 127.0.0.1 at a free port, scanned over HTTP into ``DIR/demo-run`` and
exported to ``DIR/demo-export`` (``map.html``, ``detections.geojson``, ``summary.json``).

The demo's scenes have known labels (``scenes.json``), so the run checks itself: it exits 1 unless
every positive scene is flagged and no negative one is. Running it again resumes the scan in
``DIR/demo-run``. The server gets a new port on every start, so a run that differs from this one
only in that port is resumed, not refused; one made with another model is refused.

The map's base layer is OpenStreetMap by default, which needs the internet; the detections, the
imagery layer and the pictures are files in ``map_files/`` beside ``map.html`` and show offline
too. ``--basemap none`` drops the base layer.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from build_demo_region import SCENE_TILES, ZOOM, build_demo_region

from amber_hunter.errors import AmberHunterError, ConfigError, RunStoreError
from amber_hunter.export.writers import ExportPaths, ExportSummary, check_basemap, export
from amber_hunter.run.config import RunConfig
from amber_hunter.run.scan import ScanSummary, scan
from amber_hunter.run.store import RunStore
from amber_hunter.run.workers import default_workers

#: Where the tiles sit under the served folder, as a URL template.
TILE_PATH = "/tiles/{z}/{x}/{y}.png"


class _QuietHandler(SimpleHTTPRequestHandler):
    """Serves files without logging each request: the scan's progress bar is what to watch."""

    def log_message(self, format, *args):
        pass


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """Serve ``folder`` on 127.0.0.1 at a free port for the ``with`` block; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@dataclass(frozen=True)
class DemoResult:
    """What the demo did: the scan, the export, the sources of the flagged scenes, and one line per
    scene whose outcome differs from its label."""

    scan: ScanSummary
    paths: ExportPaths
    summary: ExportSummary
    flagged: list[str]
    problems: list[str]


def _force_resume(run: Path, config: RunConfig) -> bool:
    """Whether ``run`` must be forced to take ``config``: it was scanned from this demo's server on
    another port, or it has no finished scene yet (an earlier start failed, e.g. on a missing
    model). A finished scan with another model is refused, with a fix that fits the demo."""
    try:
        with RunStore(run) as store:
            changed = store.config.differences(config)
            status = store.status()
    except RunStoreError:
        return False  # a new run
    others = [name for name in changed if name != "tiles"]
    if others and status.pending < status.total:
        raise ConfigError(f"{run} holds a demo scan made with another {', '.join(others)}; "
                          "delete it or choose another --out")
    return bool(changed)


def check_flags(run: Path, scenes_json: Path) -> tuple[list[str], list[str]]:
    """The sources of the flagged scenes, and one line per scene whose outcome is not the expected one."""
    expected = json.loads(scenes_json.read_text())["scenes"]
    with RunStore(run) as store:
        scenes = {s.scene_id: s for s in store.scenes()}
    flagged, problems = [], []
    for scene_id, info in expected.items():
        scene, name = scenes.get(scene_id), f"{info['source']} ({scene_id})"
        if scene is None:
            problems.append(f"{name} is not in the run")
        elif scene.status != "done":
            problems.append(f"{name} was not scanned ({scene.status}: {scene.error})")
        elif scene.flagged != (info["label"] == "positive"):
            problems.append(f"{name} is {info['label']} but was {'flagged' if scene.flagged else 'not flagged'}")
        if scene is not None and scene.flagged:
            flagged.append(info["source"])
    return flagged, problems


def run_demo(out: Path, model: str | None = None, basemap: str = "osm", data: Path | None = None) -> DemoResult:
    """Build, serve, scan and export the demo region under ``out`` (see the module docstring)."""
    from tqdm import tqdm

    check_basemap(basemap)  # before the scan, not after it
    region = build_demo_region(out / "demo-region", data=data)
    run, export_dir = out / "demo-run", out / "demo-export"
    with serve(region.out) as url:
        config = RunConfig(aoi=str(region.out / "aoi.geojson"), tiles=url + TILE_PATH, zoom=ZOOM,
                           scene_tiles=SCENE_TILES, model=model, workers=default_workers())
        print(f"demo: scanning {len(region.scenes)} scenes served from {url}", file=sys.stderr)
        scanned = scan(config, run, force=_force_resume(run, config), progress=lambda total: tqdm(
            total=total, unit="scene", desc="scanning", file=sys.stderr, disable=None))
        paths, summary = export(run, export_dir, basemap=basemap)
    flagged, problems = check_flags(run, region.out / "scenes.json")
    return DemoResult(scanned, paths, summary, flagged, problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for the region, the run and the export")
    parser.add_argument("--model", help="model bundle folder or bundled name (default: the bundled default model)")
    parser.add_argument("--basemap", default="osm", help="map background: osm (online), none, or an XYZ URL template")
    parser.add_argument("--data", type=Path, help="the texty-amber dataset folder (default: searched)")
    args = parser.parse_args(argv)
    try:
        result = run_demo(args.out, args.model, args.basemap, args.data)
    except AmberHunterError as exc:
        print(f"run_demo: error: {exc}", file=sys.stderr)
        return 2
    if result.scan.interrupted:
        print(f"demo: interrupted; rerun the same command to resume {args.out / 'demo-run'}", file=sys.stderr)
        return 130
    s = result.summary
    print(f"demo: {result.scan.processed} scenes scanned now, {s.scenes_scanned} in all; {s.scenes_flagged} flagged "
          f"({', '.join(result.flagged) or 'none'}); {s.positive_superpixel_ha:.2f} ha of positive superpixels "
          f"(upper bound), {s.disturbed_ha:.2f} ha disturbed ground (estimate)")
    base = {"osm": " (base map: OpenStreetMap, online only)", "none": ""}.get(args.basemap, " (base map: online tiles)")
    print(f"map: {result.paths.map}{base}")
    if result.problems:
        print("demo: expected flags not met: " + "; ".join(result.problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
