"""Tables for spreadsheets and GIS: ``detections.csv`` (one row per flagged scene) and
``detections.gpkg`` (the GeoJSON's features as two layers, in EPSG:4326).

A journalist opens the CSV in a spreadsheet; a GIS user wants a GeoPackage, which keeps types
and the CRS and opens in QGIS without import dialogs.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .. import atomic
from ..errors import ConfigError
from .detections import M2_PER_HA, RunDetections

CSV_COLUMNS = ("scene_id", "lat", "lon", "capture_date", "positive_superpixel_ha", "disturbed_ha", "max_probability",
               "n_positive", "licence_status", "unlicensed_ha")
#: The GeoPackage's layers: scenes (rectangles) and superpixels (outlines), both EPSG:4326.
GPKG_LAYERS = ("scenes", "superpixels")
CRS = "EPSG:4326"


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def write_csv(run: RunDetections, path: Path) -> None:
    """One row per flagged scene: id, centre, date, both hectare figures, max probability and,
    with a registry, licence status. Empty cells mean "not known", never zero."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for s in run.scenes:
        lat, lon = s.centre
        writer.writerow([s.scene_id, f"{lat:.6f}", f"{lon:.6f}", s.capture_date.isoformat() if s.capture_date else "",
                         _num(s.positive_area_m2 / M2_PER_HA, 4),
                         _num(None if s.disturbed_m2 is None else s.disturbed_m2 / M2_PER_HA, 4),
                         _num(s.max_probability, 3), s.n_positive, s.licence_status or "",
                         _num(None if s.unlicensed_m2 is None else s.unlicensed_m2 / M2_PER_HA, 4)])
    atomic.write_bytes(path, buf.getvalue().encode("utf-8"))


def write_gpkg(features: list[dict], path: Path) -> None:
    """The detections as a GeoPackage with a ``scenes`` and a ``superpixels`` layer (EPSG:4326),
    written next to ``path`` and moved into place, so a reader never sees half a file."""
    try:
        import pyogrio.errors
        import pyogrio.raw
        import shapely
    except ImportError:
        raise ConfigError("--format gpkg needs pyogrio and shapely; pip install pyogrio shapely") from None
    import numpy as np

    tmp = path.with_name(f".tmp-{path.name}")  # keeps the .gpkg extension GDAL checks
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.unlink(missing_ok=True)
    try:
        for layer, kind in zip(GPKG_LAYERS, ("scene", "superpixel")):
            chosen = [f for f in features if f["properties"]["kind"] == kind]
            names = sorted({k for f in chosen for k in f["properties"]} - {"kind"}) or ["scene_id"]
            geometry = shapely.to_wkb(np.array([shapely.geometry.shape(f["geometry"]) for f in chosen], dtype=object))
            columns = [_column([f["properties"].get(name) for f in chosen]) for name in names]
            pyogrio.raw.write(tmp, np.asarray(geometry, dtype=object), columns, names, layer=layer, driver="GPKG",
                              crs=CRS, geometry_type="Polygon", append=layer != GPKG_LAYERS[0], promote_to_multi=False)
        tmp.replace(path)
    except (OSError, pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path} ({exc}); choose another --out folder") from None


def _column(values: list):
    """A typed column for OGR: ints, floats (None as NaN, written as null), booleans, or text."""
    import numpy as np

    kinds = {type(v) for v in values if v is not None}
    if kinds == {bool} and None not in values:
        return np.array(values, bool)
    if kinds == {int} and None not in values:
        return np.array(values, np.int64)
    if kinds and kinds <= {int, float}:
        return np.array([np.nan if v is None else v for v in values], float)
    return np.array(["" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for v in values], object)
