"""Export a run: the library entry point :func:`export`, which reads the run once and writes the
formats asked for.

Everything is read from the run store (and, for the pixel-level damage estimate and the map's
imagery, from the run's own tiles, never the network), so an export can be made at any time, also
while a scan is still running, and never imports TensorFlow. Each file is written atomically: a
reader never sees half a file. One module per output: ``geojson``, ``summary``, ``tables`` (CSV,
GeoPackage), ``summary_png``, ``map``; ``detections`` reads the run, ``area`` measures damage.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import atomic
from ..errors import AmberHunterError, ConfigError
from ..run.store import RunStore
from .detections import RunDetections, collect, footprint_m2
from .geojson import feature_collection
from .map import MapFiles, check_basemap, write_map
from .registry import Registry, centroid
from .summary import ExportSummary, summarise
from .summary_png import write_summary_png
from .tables import write_csv, write_gpkg

#: What ``export`` can write besides ``summary.json`` (always written).
FORMATS = ("geojson", "map", "csv", "gpkg", "png")
DEFAULT_FORMATS = ("geojson", "map")

__all__ = ["DEFAULT_FORMATS", "FORMATS", "ExportPaths", "ExportSummary", "Registry", "RunDetections", "centroid",
           "check_basemap", "check_formats", "export", "footprint_m2"]


@dataclass(frozen=True)
class ExportPaths:
    """Where each output went; None for a format not asked for."""

    summary: Path
    detections: Path | None = None
    map: Path | None = None
    csv: Path | None = None
    gpkg: Path | None = None
    png: Path | None = None


def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """The formats asked for, checked ("all" means every one)."""
    chosen = tuple(dict.fromkeys(f for name in formats for f in (FORMATS if name == "all" else (name,))))
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise ConfigError(f"--format {unknown[0] if unknown else '(none)'!r} is not one of {', '.join(FORMATS)} or all; "
                          "e.g. --format csv --format gpkg")
    return chosen


def export(
    run_dir: str | Path,
    out_dir: str | Path,
    registry: str | Path | None = None,
    basemap: str = "osm",
    *,
    formats: Sequence[str] = DEFAULT_FORMATS,
    basemap_subdomains: Sequence[str] = ("a", "b", "c"),
    basemap_key_env: str | None = None,
    imagery: bool = True,
) -> tuple[ExportPaths, ExportSummary]:
    """Write ``summary.json`` and the ``formats`` asked for, for a run, into ``out_dir``.

    ``formats`` from :data:`FORMATS`: ``detections.geojson``, ``map.html`` (with ``map_files/``),
    ``detections.csv``, ``detections.gpkg`` and ``summary.png``. With ``registry`` (a GeoJSON of
    licensed polygons) every superpixel is marked licensed or not by its centroid, each scene
    licensed, unlicensed or partly licensed, and the summary counts what lies outside.
    ``basemap`` is what the map draws beneath the detections: "osm" (online), "none" or a URL
    template as a scan accepts it (``{q}``, ``{-y}``, ``{s}`` from ``basemap_subdomains``,
    ``{key}`` from the environment variable ``basemap_key_env``). ``imagery=False`` skips
    reading the run's tiles: no pixel-level estimate, no imagery layer, faster.
    """
    chosen = check_formats(formats)
    check_basemap(basemap, basemap_key_env)
    registry_areas = None if registry is None else Registry(registry)
    out = Path(out_dir)
    paths = ExportPaths(
        summary=out / "summary.json",
        detections=out / "detections.geojson" if "geojson" in chosen else None,
        map=out / "map.html" if "map" in chosen else None,
        csv=out / "detections.csv" if "csv" in chosen else None,
        gpkg=out / "detections.gpkg" if "gpkg" in chosen else None,
        png=out / "summary.png" if "png" in chosen else None,
    )
    with RunStore(run_dir) as store:
        files = MapFiles(out) if paths.map else None
        run = collect(store, registry_areas, imagery=imagery, on_scene=files)
        summary = summarise(run)
        if paths.map:
            write_map(run, summary, files, paths.map, basemap=basemap, subdomains=tuple(basemap_subdomains),
                      basemap_key_env=basemap_key_env, store=store)
    features = feature_collection(run)
    if paths.detections:
        atomic.write_json(paths.detections, features)
    if paths.csv:
        write_csv(run, paths.csv)
    if paths.gpkg:
        write_gpkg(features["features"], paths.gpkg)
    if paths.png:
        write_summary_png(run, summary, paths.png)
    atomic.write_json(paths.summary, {k: v for k, v in asdict(summary).items() if v is not None})
    with RunStore(run_dir) as store:  # remembered, so a retrain or rescore can refresh this export
        store.note("export", json.dumps({
            "run": str(Path(run_dir).resolve()), "out": str(out.resolve()), "registry": None if registry is None else str(Path(registry).resolve()),
            "basemap": basemap, "formats": list(chosen), "basemap_subdomains": list(basemap_subdomains),
            "basemap_key_env": basemap_key_env, "imagery": imagery}))
    return paths, summary


def refresh_exports(run_dir: str | Path) -> tuple[list[ExportPaths], list[tuple[str, str]]]:
    """Write every export of the run again, with the options it was made with, into the same
    folders (the latest export per folder): after a retrain the published map shows the new
    verdicts, and its "changes since the last model" layer what moved. Returns the exports
    refreshed and ``(folder, reason)`` for those that could not be (an unset key variable, a
    moved registry): the model change stands either way. Exports recorded by the run a copied run
    directory came from are not this run's and are left alone."""
    run_dir = Path(run_dir).resolve()
    with RunStore(run_dir) as store:
        latest = {}
        for event in store.events("export"):
            options = json.loads(event.message)
            if options.pop("run", None) == str(run_dir):
                latest[options["out"]] = options
    done, failed = [], []
    for options in latest.values():
        out = options.pop("out")
        if not Path(out).is_dir():
            continue
        try:
            done.append(export(run_dir, out, options.pop("registry"), options.pop("basemap"), **options)[0])
        except AmberHunterError as exc:
            failed.append((out, str(exc)))
    return done, failed
