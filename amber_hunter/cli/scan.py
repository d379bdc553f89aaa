"""The ``scan``, ``status`` and ``export`` commands: option parsing and printing over the scan API.

They are registered on the ``amber-hunter`` group in :mod:`amber_hunter.cli`, which turns an
:class:`~amber_hunter.errors.AmberHunterError` into one line and exit code 2. Heavy modules are
imported inside the commands, so ``status`` and ``export`` never load TensorFlow or XGBoost.
"""

from __future__ import annotations

import sys

import click

from . import MIN_POSITIVE_HELP
from .progress import Progress, progress_every_option

#: Exit code of a scan that finished with failed scenes: the run is usable, but not whole.
EXIT_FAILED_SCENES = 1


def _failure_lines(failures: list[tuple[str, int]]) -> list[str]:
    return [f"  {count} x {reason}" for reason, count in failures]


@click.command()
@click.option("--aoi", required=True, help="Area of interest: W,S,E,N in degrees, or a GeoJSON polygon file.")
@click.option("--tiles", required=True,
              help="Tile source: URL template with {z}/{x}/{y} (or {-y}, {q}, {s}), a folder, a folder path template "
                   "such as /data/{z}/{x}/{y}.jpg, or FILE.mbtiles.")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="Run directory; rerun to resume.")
@click.option("--zoom", type=int, default=18, show_default=True,
              help="Zoom whose 256 px tiles set the pixel scale (18: ~0.38 m/px at 50 N), whatever the source's tile size.")
@click.option("--scene-tiles", type=int, default=4, show_default=True, help="Scene side in 256 px tiles (4: 1024 px scenes).")
@click.option("--tile-size", type=click.Choice(["auto", "256", "512", "512@2x"]), default="auto", show_default=True,
              help="The source's tiles: auto takes 256 px tiles, and larger ones as high-DPI copies; 512 means 512 px "
                   "tiles one zoom up (fetched at --zoom minus 1).")
@click.option("--scheme", type=click.Choice(["xyz", "tms"]), default=None,
              help="Row numbering of a tile folder (default: from its tilemapresource.xml, else xyz).")
@click.option("--subdomains", default=None, help="Values of {s} in the URL, comma-separated (default a,b,c; Bing: t0,t1,t2,t3).")
@click.option("--model", default=None, help="Model bundle folder or bundled name (default: the bundled model).")
@click.option("--workers", type=int, default=None,
              help="Worker processes for decoding, SLIC and texture features (default: all cores); the CNN runs "
                   "batched across scenes in the main process.")
@click.option("--cluster", default=None, metavar="ADDRESS",
              help="Run scenes on a dask.distributed cluster: tcp://HOST:8786 for a running scheduler, or local:N to "
                   "start N worker processes here. The run directory stays on this machine.")
@click.option("--allow-random", is_flag=True, help="Accept a model trained on random-weight ResNet50 features (benchmarks).")
@click.option("--min-positive", type=int, default=2, show_default=True, metavar="N", help=MIN_POSITIVE_HELP)
@click.option("--min-valid", type=float, default=0.25, show_default=True,
              help="Skip a scene when less than this share of its pixels holds imagery (transparent, missing or blank tiles).")
@click.option("--max-rps", type=float, default=None, help="Requests per second per provider (HTTP sources), over all its subdomains.")
@click.option("--api-key-env", default=None, help="Environment variable holding the API key for {key} in the URL.")
@click.option("--date-header", default=None, help="Response header carrying the imagery capture date.")
@click.option("--tile-cache", type=click.Path(file_okay=False), default=None, help="Tile cache (default: RUN_DIR/tiles-cache).")
@click.option("--tile-cache-max-gb", type=float, default=None,
              help="Keep the tile cache under this many GB, pruning the least recently used tiles (default: no limit).")
@click.option("--force", is_flag=True, help="Resume even though result-deciding settings changed.")
@click.option("--retry-failed", is_flag=True, help="Also redo the scenes that failed in earlier sessions.")
@progress_every_option
def scan(aoi, tiles, run_dir, zoom, scene_tiles, tile_size, scheme, subdomains, model, workers, cluster, allow_random,
         min_positive, min_valid, max_rps, api_key_env, date_header, tile_cache, tile_cache_max_gb, force, retry_failed,
         progress_every):
    """Scan an area tile by tile for mining; rerun the same command to resume.

    Exits 0 when every scene was analysed (or had no imagery), 1 when some scenes failed (their
    commonest reasons are printed), 2 on a bad option or a failure of the whole run (a refused API
    key, a missing source, a tile server that stopped answering, a full disk), 130 when interrupted.
    """
    from ..run.config import RunConfig
    from ..run.scan import scan as run_scan
    from ..run.workers import default_workers

    config = RunConfig(aoi=aoi, tiles=tiles, zoom=zoom, scene_tiles=scene_tiles, model=model, min_positive=min_positive,
                       workers=default_workers() if workers is None else workers, cluster=cluster,
                       allow_random=allow_random, max_rps=max_rps, api_key_env=api_key_env, date_header=date_header,
                       tile_cache=tile_cache, tile_cache_max_gb=tile_cache_max_gb, tile_size=tile_size, scheme=scheme,
                       subdomains=subdomains, min_valid=min_valid)
    try:
        with Progress("scan", progress_every, "loading the model and opening the tile source") as progress:
            summary = run_scan(config, run_dir, force=force, retry_failed=retry_failed,
                               progress=progress.counter("scanning", "scene", smoothing=0.1))
    except KeyboardInterrupt:  # the second Ctrl-C: the scene in flight is lost, the rest is stored
        click.echo(f"\nstopped at once: rerun the same command to resume {run_dir}", err=True)
        sys.exit(130)
    s = summary.status
    partial = f" ({s.partial} partial)" if s.partial else ""
    click.echo(f"{run_dir}: {summary.processed} scenes this run; {s.done} done{partial}, {s.failed} failed, "
               f"{s.no_imagery} without imagery, {s.skipped} skipped, {s.pending} pending; {s.flagged} flagged")
    if s.dropped:
        click.echo(f"{s.dropped} scenes of an earlier grid were dropped (a forced change of area, zoom or scene size)")
    if summary.interrupted:
        click.echo(f"interrupted: rerun the same command to resume {run_dir}", err=True)
        sys.exit(130)
    if s.failed:
        what = "every scene failed" if s.failed == s.total else f"{s.failed} of {s.total} scenes failed"
        click.echo("\n".join([f"{what}; the commonest reasons:", *_failure_lines(summary.failures),
                               f"details in {run_dir}/log.txt; rerun with --retry-failed to try them again"]), err=True)
        sys.exit(EXIT_FAILED_SCENES)


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, for scripts that watch a run.")
def status(run_dir, as_json):
    """Print a run's scene counts, flagged scenes, speed and top failure reasons (works while a scan runs)."""
    import dataclasses
    import json

    from ..run.store import STAGES, RunStore

    with RunStore(run_dir) as store:
        s = store.status()
        failures = store.failure_reasons()
    if as_json:
        click.echo(json.dumps({**dataclasses.asdict(s), "failure_reasons": [
            {"reason": reason, "count": count} for reason, count in failures]}))
        return
    rate = f"{s.rate:.2f} scenes/s" if s.rate else "n/a"
    click.echo(f"done {s.done}  failed {s.failed}  no-imagery {s.no_imagery}  skipped {s.skipped}  "
               f"pending {s.pending}  total {s.total}  flagged {s.flagged}  partial {s.partial}  rate {rate}")
    if s.timed_scenes:
        n, t = s.timed_scenes, s.stage_seconds
        click.echo(f"seconds per scene ({n} timed scenes): " + "  ".join(
            f"{name} {getattr(t, name) / n:.2f}" for name in STAGES))
    if failures:
        click.echo("\n".join(["top failure reasons:", *_failure_lines(failures)]))


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the outputs.")
@click.option("--registry", type=click.Path(dir_okay=False), default=None, help="GeoJSON of licensed areas to cross-check.")
@click.option("--format", "formats", multiple=True, default=("geojson", "map"), show_default=True,
              type=click.Choice(["geojson", "map", "csv", "gpkg", "png", "all"]),
              help="Outputs besides summary.json; repeat the option, or 'all'.")
@click.option("--basemap", default="osm", show_default=True,
              help="Map background: osm (online), none (fully offline), or any URL template --tiles accepts "
                   "({z} {x} {y} {-y} {q} {s} {key}).")
@click.option("--basemap-subdomains", default="a,b,c", show_default=True, help="Values of {s} in --basemap.")
@click.option("--basemap-key-env", default=None,
              help="Environment variable holding {key} for --basemap (written into map.html: use a publishable key).")
@click.option("--no-imagery", is_flag=True,
              help="Do not read the run's tiles: no disturbed-ground estimate, no imagery layer; faster.")
def export(run_dir, out_dir, registry, formats, basemap, basemap_subdomains, basemap_key_env, no_imagery):
    """Write summary.json and the chosen formats (GeoJSON, map, CSV, GeoPackage, PNG) for a run."""
    from ..export.writers import export as run_export

    paths, summary = run_export(run_dir, out_dir, registry, basemap, formats=formats,
                                basemap_subdomains=tuple(s for s in basemap_subdomains.split(",") if s),
                                basemap_key_env=basemap_key_env, imagery=not no_imagery)
    licence = "" if summary.scenes_unlicensed is None else f", {summary.scenes_unlicensed} outside licensed areas"
    click.echo(f"{summary.scenes_flagged} of {summary.scenes_scanned} scenes flagged{licence}; "
               f"{summary.positive_superpixel_ha:.2f} ha of positive superpixels (upper bound), "
               f"{summary.disturbed_ha:.2f} ha disturbed ground (estimate, {summary.scenes_estimated} scenes measured)")
    if summary.scenes_dropped:
        click.echo(f"{summary.scenes_dropped} scenes of an earlier grid (a forced change of area, zoom or scene size) "
                   "are left out of the export")
    for name in ("map", "detections", "csv", "gpkg", "png", "summary"):
        if getattr(paths, name) is not None:
            click.echo(f"{name}: {getattr(paths, name)}")
