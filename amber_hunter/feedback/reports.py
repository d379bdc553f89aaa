"""Reader and editor reports on a run: read, mapped to the superpixels they touch, and stored.

A report says "this is mining" or "this is not mining" about a place: a point (a reader's pin,
a CSV row ``lat,lon,verdict,note``) or an area (a GeoJSON polygon an editor drew). Retraining needs
superpixels, so each report is mapped onto the run's own segmentation, exactly as the scan cut the
scene (``run.resegment.scene_labels``: the label map the scan stored, never a new fetch):

- a point takes the superpixel that contains it;
- a polygon takes every superpixel it covers by more than half (a quick outline around a pit
  field should not drag in the forest at its edge).

A report that touches nothing is kept with the reason (outside the scanned area, a scene not
scanned yet, no imagery there), never silently dropped: a newsroom must be able to answer every
reader. Bad lines (unknown verdict, malformed coordinates) are listed with their line numbers and
the rest of the file is still imported.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FeedbackError
from ..geo.tiles import Bounds
from ..learn.labels import LabelStore, SuperpixelKey
from ..run.resegment import scene_labels
from ..run.scenes import cell_from_id
from ..run.store import FeedbackRow, RunStore, StoredScene

#: Verdict words and the label they give (1: mining).
VERDICTS = {"mining": 1, "not-mining": 0}
#: A polygon takes a superpixel when it covers more than this share of it.
MIN_COVER = 0.5


@dataclass(frozen=True)
class Report:
    """One report: a GeoJSON Point or Polygon geometry in lon/lat, a verdict, a note."""

    line: int
    verdict: str
    geometry: dict
    note: str | None = None


@dataclass(frozen=True)
class BadLine:
    """A line of the report file that could not be read, and why."""

    line: int
    reason: str


@dataclass(frozen=True)
class FeedbackImport:
    """What an import did: the reports with what each touched, the lines it could not read, and
    the reports the run already had matched (same verdict, note and geometry), which are skipped
    so that importing a file twice neither lists nor weighs a report twice. A report that touched
    nothing before is matched again: its scene may have been scanned since."""

    rows: list[FeedbackRow]
    bad: list[BadLine]
    #: ``(line, "FILE line N")``: a report of this file and where the run already had it.
    repeated: list[tuple[int, str]] = field(default_factory=list)

    @property
    def superpixels(self) -> int:
        return sum(len(r.matched) for r in self.rows)


def _verdict(value, where: str) -> str:
    word = str(value or "").strip().lower().replace(" ", "-").replace("_", "-")
    if word not in VERDICTS:
        raise ValueError(f"{where}: unknown verdict {value!r}; use mining or not-mining")
    return word


def read_reports(path: str | Path) -> tuple[list[Report], list[BadLine]]:
    """Reports from a CSV (``lat,lon,verdict,note``) or a GeoJSON FeatureCollection of points or
    polygons with a ``verdict`` property (and an optional ``note``). Multi-geometries are split."""
    path = Path(path)
    if not path.is_file():
        raise FeedbackError(f"feedback file {path} does not exist")
    if path.suffix.lower() in (".geojson", ".json"):
        return _read_geojson(path)
    return _read_csv(path)


def _read_csv(path: Path) -> tuple[list[Report], list[BadLine]]:
    reports, bad = [], []
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"lat", "lon", "verdict"} <= {h.strip() for h in reader.fieldnames}:
            raise FeedbackError(f"{path}: the header must be lat,lon,verdict,note; got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): v for k, v in row.items() if k}
            try:
                lat, lon = float(row["lat"]), float(row["lon"])
                if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                    raise ValueError(f"line {line}: lat,lon {lat},{lon} is not a place on Earth (lat first, then lon)")
                verdict = _verdict(row.get("verdict"), f"line {line}")
            except (TypeError, ValueError) as exc:
                reason = str(exc) if str(exc).startswith("line") else f"line {line}: malformed lat/lon ({exc})"
                bad.append(BadLine(line, reason))
                continue
            reports.append(Report(line, verdict, {"type": "Point", "coordinates": [lon, lat]},
                                  (row.get("note") or "").strip() or None))
    return reports, bad


def _read_geojson(path: Path) -> tuple[list[Report], list[BadLine]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FeedbackError(f"{path} is not valid GeoJSON ({exc}); export it again as a FeatureCollection") from None
    features = data.get("features") if isinstance(data, dict) else None
    if not isinstance(features, list):
        raise FeedbackError(f"{path} is not a GeoJSON FeatureCollection; give one with a verdict property per feature")
    reports, bad = [], []
    for n, feature in enumerate(features, start=1):  # "line" is the feature's number in the file
        try:
            properties = feature.get("properties") or {}
            verdict = _verdict(properties.get("verdict"), f"feature {n}")
            geometry = feature.get("geometry") or {}
            kind, coords = geometry.get("type"), geometry.get("coordinates")
            parts = {"Point": [coords], "MultiPoint": coords, "Polygon": [coords], "MultiPolygon": coords}.get(kind)
            if parts is None:
                raise ValueError(f"feature {n}: a {kind} geometry; use points or polygons")
            single = "Point" if "Point" in kind else "Polygon"
            for part in parts:
                _check_coordinates(part, single, n)
                note = properties.get("note")
                reports.append(Report(n, verdict, {"type": single, "coordinates": part},
                                      str(note).strip() or None if note is not None else None))
        except (AttributeError, TypeError, ValueError) as exc:
            bad.append(BadLine(n, str(exc) if str(exc).startswith("feature") else f"feature {n}: malformed ({exc})"))
    return reports, bad


def _check_coordinates(part, kind: str, n: int) -> None:
    points = [part] if kind == "Point" else [p for ring in part for p in ring]
    for p in points:
        lon, lat = float(p[0]), float(p[1])
        if not (-180 <= lon <= 180 and -90 <= lat <= 90):
            raise ValueError(f"feature {n}: {lon},{lat} is not lon,lat in degrees (a projected CRS? use EPSG:4326)")


# --- mapping onto the run's superpixels -----------------------------------------------------------


def _extent(geometry: dict) -> Bounds:
    if geometry["type"] == "Point":
        lon, lat = geometry["coordinates"][:2]
        return Bounds(lon, lat, lon, lat)
    xs = [p[0] for ring in geometry["coordinates"] for p in ring]
    ys = [p[1] for ring in geometry["coordinates"] for p in ring]
    return Bounds(min(xs), min(ys), max(xs), max(ys))


def _touches(a: Bounds, b: Bounds) -> bool:
    return a.west <= b.east and b.west <= a.east and a.south <= b.north and b.south <= a.north


def _cover(geometry: dict, scene_id: str, shape: tuple[int, int]) -> np.ndarray:
    """The polygon rasterised on the scene's pixel grid (holes cut out)."""
    from skimage.draw import polygon as fill

    cell = cell_from_id(scene_id)
    mask = np.zeros(shape, bool)
    for k, ring in enumerate(geometry["coordinates"]):
        ring = np.asarray(ring, float)
        rows, cols = cell.lonlat_to_pixel(ring[:, 0], ring[:, 1])
        rr, cc = fill(rows - 0.5, cols - 0.5, shape)  # pixel centres inside the ring
        mask[rr, cc] = k == 0  # the outer ring fills, holes empty
    return mask


def _in_scene(labels: np.ndarray, scene_id: str, report: Report) -> list[int]:
    if report.geometry["type"] == "Point":
        lon, lat = report.geometry["coordinates"][:2]
        row, col = cell_from_id(scene_id).lonlat_to_pixel(lon, lat)
        r, c = int(np.floor(row)), int(np.floor(col))
        if not (0 <= r < labels.shape[0] and 0 <= c < labels.shape[1]):
            return []
        return [int(labels[r, c])] if labels[r, c] > 0 else []
    cover = _cover(report.geometry, scene_id, labels.shape)
    hit = np.bincount(labels[cover].ravel(), minlength=labels.max() + 1)
    size = np.bincount(labels.ravel(), minlength=labels.max() + 1)
    return [int(k) for k in np.flatnonzero(hit > MIN_COVER * np.maximum(size, 1)) if k > 0]


def match_report(store: RunStore, scenes: list[StoredScene], report: Report, labels_of) -> FeedbackRow:
    """The run's superpixels under ``report``, or why there are none (``labels_of(scene_id)`` is
    the scene's label map)."""
    extent = _extent(report.geometry)
    near = [s for s in scenes if _touches(s.bounds or cell_from_id(s.scene_id).bounds, extent)]  # pending: no bounds yet
    matched, reasons = [], []
    for scene in near:
        if scene.status != "done":
            what = {"pending": "is not scanned yet", "no-imagery": "has no imagery",
                    "skipped": f"was skipped ({scene.error})", "failed": f"failed ({scene.error})"}[scene.status]
            reasons.append(f"scene {scene.scene_id} {what}")
            continue
        try:
            labels = _in_scene(labels_of(scene.scene_id), scene.scene_id, report)
        except Exception as exc:  # noqa: BLE001 - one unreadable scene fails its reports only
            reasons.append(f"the superpixels of scene {scene.scene_id} cannot be read ({exc})")
            continue
        if not labels:
            reasons.append(f"no imagery under it in scene {scene.scene_id}" if report.geometry["type"] == "Point"
                           else f"it covers no superpixel of scene {scene.scene_id} by more than half")
        matched += [(scene.scene_id, k) for k in labels]
    reason = None if matched else ("; ".join(dict.fromkeys(reasons)) if reasons else "outside the scanned area")
    return FeedbackRow("", report.line, report.verdict, report.note, report.geometry, tuple(matched), reason)


def import_feedback(run_dir: str | Path, file: str | Path, labels: LabelStore) -> FeedbackImport:
    """Map every report of ``file`` onto the run, add the superpixels' labels to the label store
    (source ``feedback``) and record the reports in the run. Bad lines are returned, not fatal."""
    import dataclasses

    reports, bad = read_reports(file)
    run_dir = Path(run_dir).resolve()
    with RunStore(run_dir) as store:
        known = {_same(r.verdict, r.note, r.geometry): r for r in store.feedback() if r.matched}
        earlier = [(r, known.get(_same(r.verdict, r.note, r.geometry))) for r in reports]
        repeated = [(r.line, f"{k.file} line {k.line}") for r, k in earlier if k is not None]
        reports = [r for r, k in earlier if k is None]
        # A label store that lacks an earlier import's labels (another --labels) still gets them.
        missing = [(key, VERDICTS[k.verdict], _label_note(k.file, k.line, k.note))
                   for _, k in earlier if k is not None for scene_id, label in k.matched
                   if labels.get(key := SuperpixelKey.of(run_dir, scene_id, label)) is None]
        scenes = list(store.scenes())
        cache: dict[str, np.ndarray] = {}

        def labels_of(scene_id: str) -> np.ndarray:
            if scene_id not in cache:
                cache[scene_id] = scene_labels(store, scene_id)
            return cache[scene_id]

        rows = [dataclasses.replace(match_report(store, scenes, r, labels_of), file=Path(file).name) for r in reports]
        items = [(SuperpixelKey.of(run_dir, scene_id, label), VERDICTS[row.verdict],
                  _label_note(row.file, row.line, row.note))
                 for row in rows for scene_id, label in row.matched]
        if items or missing:
            labels.add_many(items + missing, source="feedback")
        if rows:
            store.add_feedback(rows)
    return FeedbackImport(rows, bad, repeated)


def _label_note(file: str, line: int, note: str | None) -> str:
    """The label store's note for a superpixel labelled by a report: where the report came from."""
    return f"feedback {file} line {line}" + (f": {note}" if note else "")


def _same(verdict: str, note: str | None, geometry: dict | None) -> str:
    """What makes two reports the same report, whatever file or line they came from (a GeoJSON
    point written ``[12, 50]`` is the CSV's ``12.0,50.0``)."""

    def floats(value):
        return [floats(v) for v in value] if isinstance(value, list) else float(value)

    shape = None if geometry is None else {"type": geometry["type"], "coordinates": floats(geometry["coordinates"])}
    return json.dumps([verdict, note or None, shape], sort_keys=True)
