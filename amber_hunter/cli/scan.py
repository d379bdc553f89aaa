"""The ``scan``, ``status`` and ``export`` commands: option parsing and printing over the scan API.

They are registered on the ``amber-hunter`` group in :mod:`amber_hunter.cli`, which turns an
:class:`~amber_hunter.errors.AmberHunterError` into one line and exit code 2. Heavy modules are
imported inside the commands, so ``status`` and ``export`` never load TensorFlow or XGBoost.
"""

from __future__ import annotations

import sys

import click


@click.command()
@click.option("--aoi", required=True, help="Area of interest: W,S,E,N in degrees, or a GeoJSON polygon file.")
@click.option("--tiles", required=True, help="Tile source: URL template with {z}/{x}/{y} (or {-y}, {q}), a folder, or FILE.mbtiles.")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="Run directory; rerun to resume.")
@click.option("--zoom", type=int, default=18, show_default=True)
@click.option("--scene-tiles", type=int, default=4, show_default=True, help="Scene side in tiles (4: 1024 px scenes).")
@click.option("--model", default=None, help="Model bundle folder or bundled name (default: the bundled model).")
@click.option("--workers", type=int, default=1, show_default=True, help="Threads fetching scenes ahead of detection.")
@click.option("--min-positive", type=int, default=2, show_default=True,
              help="Flag a scene when more than this many superpixels are positive.")
@click.option("--max-rps", type=float, default=None, help="Requests per second per host (HTTP sources).")
@click.option("--api-key-env", default=None, help="Environment variable holding the API key for {key} in the URL.")
@click.option("--date-header", default=None, help="Response header carrying the imagery capture date.")
@click.option("--tile-cache", type=click.Path(file_okay=False), default=None, help="Tile cache (default: RUN_DIR/tiles-cache).")
@click.option("--force", is_flag=True, help="Resume even though result-deciding settings changed.")
@click.option("--retry-failed", is_flag=True, help="Also redo the scenes that failed in earlier sessions.")
def scan(aoi, tiles, run_dir, zoom, scene_tiles, model, workers, min_positive, max_rps, api_key_env, date_header,
         tile_cache, force, retry_failed):
    """Scan an area tile by tile for mining; rerun the same command to resume."""
    from tqdm import tqdm

    from ..run.config import RunConfig
    from ..run.scan import scan as run_scan

    config = RunConfig(aoi=aoi, tiles=tiles, zoom=zoom, scene_tiles=scene_tiles, model=model, min_positive=min_positive,
                       workers=workers, max_rps=max_rps, api_key_env=api_key_env, date_header=date_header,
                       tile_cache=tile_cache)
    summary = run_scan(config, run_dir, force=force, retry_failed=retry_failed, progress=lambda total: tqdm(
        total=total, unit="scene", desc="scanning", file=sys.stderr, disable=None, smoothing=0.1))
    s = summary.status
    click.echo(f"{run_dir}: {summary.processed} scenes this run; {s.done} done, {s.failed} failed, "
               f"{s.no_imagery} without imagery, {s.skipped} skipped, {s.pending} pending; {s.flagged} flagged")
    if s.failed:
        click.echo(f"{s.failed} scenes failed (reasons in {run_dir}/log.txt); "
                   "rerun with --retry-failed to try them again", err=True)
    if summary.interrupted:
        click.echo(f"interrupted: rerun the same command to resume {run_dir}", err=True)
        sys.exit(130)


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
def status(run_dir):
    """Print a run's scene counts, flagged scenes and speed (works while a scan is running)."""
    from ..run.store import RunStore

    with RunStore(run_dir) as store:
        s = store.status()
    rate = f"{s.rate:.2f} scenes/s" if s.rate else "n/a"
    click.echo(f"done {s.done}  failed {s.failed}  no-imagery {s.no_imagery}  skipped {s.skipped}  "
               f"pending {s.pending}  total {s.total}  flagged {s.flagged}  rate {rate}")


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the outputs.")
@click.option("--registry", type=click.Path(dir_okay=False), default=None, help="GeoJSON of licensed areas to cross-check.")
@click.option("--basemap", default="osm", show_default=True,
              help="Map background: osm (OpenStreetMap, online), none (fully offline), or an XYZ URL template.")
def export(run_dir, out_dir, registry, basemap):
    """Write detections.geojson, summary.json and map.html for a run."""
    from ..export.writers import export as run_export

    paths, summary = run_export(run_dir, out_dir, registry, basemap)
    licence = "" if summary.scenes_unlicensed is None else f", {summary.scenes_unlicensed} outside licensed areas"
    click.echo(f"{summary.scenes_flagged} of {summary.scenes_scanned} scenes flagged{licence}; "
               f"{summary.damaged_ha:.2f} ha suspected")
    click.echo(f"map: {paths.map}")
