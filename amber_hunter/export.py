"""Export a run: the GeoJSON of detections, a summary in hectares, and a self-contained web map.

Everything is read from the run store, so an export can be made at any time, also while a scan is
still running, and never imports TensorFlow. Each output is written atomically: a reader never
sees half a file. ``map.html`` carries the overlay pictures inline (base64), so it can be mailed
or archived as one file.
"""

from __future__ import annotations

import base64
import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from . import atomic
from .errors import AreaError, ConfigError
from .store import RunStore
from .tiles import Bounds, parse_geojson
from .tiles import contains as _point_in_polygons

M2_PER_HA = 10_000.0


@dataclass(frozen=True)
class ExportSummary:
    """The contents of ``summary.json``; the ``unlicensed`` counts are set only with a registry.

    ``damaged_ha`` is the area of the positive superpixels of flagged scenes: a suspicion to check
    on the ground, not a survey. ``damaged_ha_by_year`` is keyed by capture year, ``"unknown"``
    where the source reported no date.
    """

    scenes_scanned: int
    scenes_flagged: int
    damaged_ha: float
    damaged_ha_by_year: dict
    scenes_failed: int
    scenes_no_imagery: int
    scenes_skipped: int
    scenes_pending: int
    scenes_unlicensed: int | None = None
    superpixels_unlicensed: int | None = None
    damaged_ha_unlicensed: float | None = None


@dataclass(frozen=True)
class ExportPaths:
    detections: Path
    summary: Path
    map: Path


class Registry:
    """Licensed areas from a GeoJSON file of polygons; a detection inside one is licensed."""

    def __init__(self, path: str | Path):
        try:
            obj = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--registry {path}: not a readable GeoJSON file ({exc}); give a GeoJSON of licensed polygons") from None
        try:
            self.polygons = parse_geojson(obj).polygons
        except AreaError as exc:
            raise ConfigError(f"--registry {path}: {exc}") from None

    def licensed(self, geometry: dict) -> bool:
        """Whether the centroid of a GeoJSON Polygon lies inside a licensed polygon."""
        return _point_in_polygons(self.polygons, *centroid(geometry["coordinates"][0]))


def centroid(ring: list) -> tuple[float, float]:
    """Area-weighted centroid of a closed ring (its vertex mean if the ring has no area)."""
    x = [p[0] for p in ring]
    y = [p[1] for p in ring]
    cross = [x[i] * y[i + 1] - x[i + 1] * y[i] for i in range(len(ring) - 1)]
    area = sum(cross) / 2
    if abs(area) < 1e-18:
        return sum(x) / len(x), sum(y) / len(y)
    cx = sum((x[i] + x[i + 1]) * cross[i] for i in range(len(cross))) / (6 * area)
    cy = sum((y[i] + y[i + 1]) * cross[i] for i in range(len(cross))) / (6 * area)
    return cx, cy


def _rectangle(b: Bounds) -> dict:
    ring = [[b.west, b.south], [b.east, b.south], [b.east, b.north], [b.west, b.north], [b.west, b.south]]
    return {"type": "Polygon", "coordinates": [ring]}


def _features(store: RunStore, registry: Registry | None) -> list[dict]:
    """A flagged scene's rectangle, then its positive superpixels, for every flagged scene."""
    features = []
    for scene in store.scenes(flagged_only=True):
        date = scene.capture_date.isoformat() if scene.capture_date else None
        common = {"scene_id": scene.scene_id, "capture_date": date}
        parts = [(_rectangle(scene.bounds), {**common, "kind": "scene", "probability": scene.max_probability,
                                              "area_m2": scene.positive_area_m2, "n_positive": scene.n_positive})]
        parts += [(r.polygon, {**common, "kind": "superpixel", "label": r.label, "probability": r.probability,
                               "area_m2": r.area_m2}) for r in store.regions(scene.scene_id, positive_only=True)]
        for geometry, properties in parts:
            if registry is not None:
                properties["licensed"] = registry.licensed(geometry)
            features.append({"type": "Feature", "geometry": geometry, "properties": properties})
    return features


def _summary(store: RunStore, features: list[dict], with_registry: bool) -> ExportSummary:
    status = store.status()
    by_year: dict[str, float] = defaultdict(float)
    scenes = [f["properties"] for f in features if f["properties"]["kind"] == "scene"]
    superpixels = [f["properties"] for f in features if f["properties"]["kind"] == "superpixel"]
    for s in scenes:
        by_year[s["capture_date"][:4] if s["capture_date"] else "unknown"] += (s["area_m2"] or 0.0) / M2_PER_HA
    unlicensed = {}
    if with_registry:
        outside = [p for p in superpixels if not p["licensed"]]
        unlicensed = {
            "scenes_unlicensed": sum(not s["licensed"] for s in scenes),
            "superpixels_unlicensed": len(outside),
            "damaged_ha_unlicensed": round(sum(p["area_m2"] for p in outside) / M2_PER_HA, 4),
        }
    return ExportSummary(
        scenes_scanned=status.done,
        scenes_flagged=len(scenes),
        damaged_ha=round(sum(by_year.values()), 4),
        damaged_ha_by_year={year: round(ha, 4) for year, ha in sorted(by_year.items())},
        scenes_failed=status.failed,
        scenes_no_imagery=status.no_imagery,
        scenes_skipped=status.skipped,
        scenes_pending=status.pending,
        **unlicensed,
    )


def _popup_html(scene: dict, overlay: Path) -> str:
    lines = [f"<b>{scene['scene_id']}</b>",
             f"{scene['n_positive']} positive superpixels, max p {scene['probability']:.2f}",
             f"{(scene['area_m2'] or 0) / M2_PER_HA:.3f} ha suspected, captured {scene['capture_date'] or 'unknown'}"]
    if "licensed" in scene:
        lines.append("inside a licensed area" if scene["licensed"] else "<b>outside any licensed area</b>")
    if overlay.is_file():
        data = base64.b64encode(overlay.read_bytes()).decode("ascii")
        lines.append(f'<img src="data:image/png;base64,{data}" style="width:100%;max-width:512px">')
    return "<br>".join(lines)


def _map(store: RunStore, features: list[dict]) -> str:
    """The Leaflet map: flagged scenes (click for the overlay picture) and their superpixels."""
    import folium

    area = store.config.area.bounds
    fmap = folium.Map(tiles="OpenStreetMap", control_scale=True)
    fmap.fit_bounds([[area.south, area.west], [area.north, area.east]])
    detections = folium.FeatureGroup(name="detections", show=True)
    for feature in features:
        p = feature["properties"]
        if p["kind"] == "scene":
            layer = folium.GeoJson(feature, style_function=lambda _: {"color": "#ff7800", "weight": 2, "fillOpacity": 0.05})
            folium.Popup(_popup_html(p, store.overlay_path(p["scene_id"])), max_width=540).add_to(layer)
        else:
            layer = folium.GeoJson(feature, style_function=lambda _: {"color": "#e00000", "weight": 1, "fillOpacity": 0.35},
                                   tooltip=f"p={p['probability']:.2f}, {p['area_m2']:.0f} m²")
        layer.add_to(detections)
    detections.add_to(fmap)
    folium.LayerControl(collapsed=False).add_to(fmap)
    return fmap.get_root().render()


def export(run_dir: str | Path, out_dir: str | Path, registry: str | Path | None = None) -> tuple[ExportPaths, ExportSummary]:
    """Write ``detections.geojson``, ``summary.json`` and ``map.html`` for a run into ``out_dir``.

    With ``registry`` (a GeoJSON of licensed polygons) every detection gets ``licensed`` true or
    false by whether its centroid lies in a licensed polygon, and the summary counts the others.
    """
    registry_areas = None if registry is None else Registry(registry)
    out = Path(out_dir)
    paths = ExportPaths(out / "detections.geojson", out / "summary.json", out / "map.html")
    with RunStore(run_dir) as store:
        features = _features(store, registry_areas)
        summary = _summary(store, features, registry_areas is not None)
        page = _map(store, features)
    atomic.write_json(paths.detections, {"type": "FeatureCollection", "features": features})
    atomic.write_json(paths.summary, {k: v for k, v in asdict(summary).items() if v is not None})
    atomic.write_bytes(paths.map, page.encode("utf-8"))
    return paths, summary
