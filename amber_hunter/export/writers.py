"""Export a run: the GeoJSON of detections, a summary in hectares, and a self-contained web map.

Everything is read from the run store, so an export can be made at any time, also while a scan is
still running, and never imports TensorFlow. Each output is written atomically: a reader never
sees half a file. ``map.html`` carries Leaflet and the overlay pictures inline, so it can be
mailed or archived as one file and opened offline.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from collections import defaultdict
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from .. import atomic
from ..errors import AreaError, ConfigError
from ..geo.tiles import Area, Bounds, parse_geojson
from ..geo.tiles import contains as _point_in_polygons
from ..run.scenes import TILE_SIZE, cell_from_id
from ..run.store import RunStore

M2_PER_HA = 10_000.0


@dataclass(frozen=True)
class ExportSummary:
    """The contents of ``summary.json``; the ``unlicensed`` counts are set only with a registry.

    ``damaged_ha`` is the area of the positive superpixels of flagged scenes: a suspicion to check
    on the ground, not a survey. ``damaged_ha_by_year`` is keyed by capture year, ``"unknown"``
    where the source reported no date. ``scenes_partial`` counts scanned scenes with some nodata
    (their hectares count valid pixels only); ``scenes_dropped`` counts scenes of an earlier grid
    that a forced change of area, zoom or scene size left out.
    """

    scenes_scanned: int
    scenes_flagged: int
    damaged_ha: float
    damaged_ha_by_year: dict
    scenes_failed: int
    scenes_no_imagery: int
    scenes_skipped: int
    scenes_pending: int
    scenes_partial: int = 0
    scenes_dropped: int = 0
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
            raise ConfigError(f"--registry {path}: not a readable GeoJSON file ({exc}); "
                              "give a GeoJSON of licensed polygons") from None
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


def footprint_m2(scene_id: str) -> float:
    """The ground area of a scene's whole footprint, in m² (at its centre latitude's scale)."""
    cell = cell_from_id(scene_id)
    return round((cell.size * TILE_SIZE * cell.m_per_px(TILE_SIZE)) ** 2, 1)


def _features(store: RunStore, registry: Registry | None) -> list[dict]:
    """A flagged scene's rectangle, then its positive superpixels, for every flagged scene.

    A scene feature names its two areas apart, ``scene_area_m2`` (the footprint) and
    ``positive_area_m2`` (its positive superpixels), and has no ``area_m2``: only superpixel
    features do, so a GIS user who sums ``area_m2`` over the layer counts the damage once.
    """
    features = []
    for scene in store.scenes(flagged_only=True):
        date = scene.capture_date.isoformat() if scene.capture_date else None
        common = {"scene_id": scene.scene_id, "capture_date": date}
        parts = [(_rectangle(scene.bounds), {**common, "kind": "scene", "probability": scene.max_probability,
                                              "scene_area_m2": footprint_m2(scene.scene_id),
                                              "positive_area_m2": scene.positive_area_m2,
                                              "valid_fraction": scene.valid_fraction, "n_positive": scene.n_positive})]
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
        by_year[s["capture_date"][:4] if s["capture_date"] else "unknown"] += (s["positive_area_m2"] or 0.0) / M2_PER_HA
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
        scenes_partial=status.partial,
        scenes_dropped=status.dropped,
        **unlicensed,
    )


#: The package (django-js-lib-leaflet, BSD, no dependencies) whose Leaflet 1.9.4 is inlined in the map.
LEAFLET_PACKAGE = "js_lib_leaflet"
#: The deepest zoom the map allows, past the tiles' own (Leaflet enlarges them), to look at small pits.
MAP_MAX_ZOOM = 22
#: Widest popup, in px: the overlay thumbnails are at most 512 px wide.
POPUP_MAX_PX = 540
#: Placeholders Leaflet fills in a tile URL template; ``{q}`` (quadkeys) and ``{key}`` it cannot.
_LEAFLET_PLACEHOLDERS = {"z", "x", "y", "-y", "s", "r"}
_STYLES = {
    "area": {"color": "#3388ff", "weight": 1, "fill": False, "dashArray": "4 4"},
    "scene": {"color": "#ff7800", "weight": 2, "fillOpacity": 0.05},
    "superpixel": {"color": "#e00000", "weight": 1, "fillOpacity": 0.35},
}


def check_basemap(basemap: str) -> None:
    """Refuse a base map the page cannot draw: it must be "osm", "none", or an XYZ URL template
    that Leaflet can fill (a quadkey ``{q}`` or an API ``{key}`` it cannot, nor a local folder)."""
    if basemap in ("osm", "none"):
        return
    names = set(re.findall(r"\{([^{}]*)\}", basemap))
    if not basemap.startswith(("http://", "https://")) or not {"z", "x"} <= names or not names & {"y", "-y"} \
            or names - _LEAFLET_PLACEHOLDERS:
        raise ConfigError(f"--basemap {basemap!r} is not osm, none, or an http(s) URL template with {{z}}, {{x}}, "
                          "{y} or {-y} (and only {s}, {r} besides); e.g. --basemap 'https://tiles.example.org/{z}/{x}/{y}.png'")


def _leaflet_assets() -> tuple[str, str]:
    """Leaflet's JS and CSS, to inline: the page must work offline, where CDNs are unreachable.

    The CSS's icons (the layer control's) become data URIs, and the source-map comment goes, so
    the browser never asks for a file that is not in the page.
    """
    try:
        root = resources.files(LEAFLET_PACKAGE) / "static" / LEAFLET_PACKAGE
    except ModuleNotFoundError:
        raise ConfigError("map.html needs Leaflet from the django-js-lib-leaflet package; "
                          "pip install django-js-lib-leaflet==1.9.4.1") from None

    def data_uri(match: re.Match) -> str:
        return f"url(data:image/png;base64,{base64.b64encode((root / 'images' / match[1]).read_bytes()).decode()})"

    js = re.sub(r"//# sourceMappingURL=\S+\s*$", "", (root / "leaflet.js").read_text("utf-8"))
    css = re.sub(r"url\(images/([\w.-]+\.png)\)", data_uri, (root / "leaflet.css").read_text("utf-8"))
    return js, css


def _script_json(obj: object) -> str:
    """JSON that can sit inside a <script> element: no ``</script>`` can end it early."""
    return json.dumps(obj).replace("<", "\\u003c")


def _png_size(png: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk. Leaflet sizes a popup when it opens, before the
    picture is decoded, so the ``<img>`` must state its size or the popup comes out too narrow."""
    return struct.unpack(">II", png[16:24])


def _popup_html(scene: dict, overlay: Path) -> str:
    lines = [f"<b>{scene['scene_id']}</b>",
             f"{scene['n_positive']} positive superpixels, max p {scene['probability']:.2f}",
             f"{(scene['positive_area_m2'] or 0) / M2_PER_HA:.3f} ha suspected, captured {scene['capture_date'] or 'unknown'}"]
    if "licensed" in scene:
        lines.append("inside a licensed area" if scene["licensed"] else "<b>outside any licensed area</b>")
    if overlay.is_file():
        png = overlay.read_bytes()
        width, height = _png_size(png)
        lines.append(f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" width="{width}" '
                     f'height="{height}" alt="scene {scene["scene_id"]}">')
    return "<br>".join(lines)


def _layer_features(features: list[dict], kind: str) -> list[dict]:
    """Copies of one kind of feature with their Leaflet style, which folium's GeoJson applies
    from ``properties.style``; the exported GeoJSON keeps its own, unstyled features."""
    return [{**f, "properties": {**f["properties"], "style": _STYLES[kind]}}
            for f in features if f["properties"]["kind"] == kind]


def _area_feature(area: Area) -> dict:
    polygons = area.polygon_coordinates()
    geometry = {"type": "MultiPolygon", "coordinates": polygons} if polygons else _rectangle(area.bounds)
    return {"type": "Feature", "geometry": geometry, "properties": {"style": _STYLES["area"]}}


def _raw(html: str):
    """A page element rendered verbatim: an Element's own template would parse Leaflet as Jinja."""
    from branca.element import Element

    element = Element("{{ this.raw }}")
    element.raw = html
    return element


def _base_layer(basemap: str, zoom: int):
    """The background tiles: OpenStreetMap, none, or an XYZ source drawn up to its native ``zoom``."""
    import folium

    if basemap == "osm":
        return folium.TileLayer("OpenStreetMap", max_zoom=MAP_MAX_ZOOM, max_native_zoom=19)
    if basemap != "none":
        return folium.TileLayer(basemap, name="imagery", attr=urlsplit(basemap).hostname, max_zoom=MAP_MAX_ZOOM,
                                max_native_zoom=zoom)
    return None


def _map(store: RunStore, features: list[dict], basemap: str) -> str:
    """A self-contained Leaflet page: the scanned area, flagged scenes and positive superpixels.

    Clicking a scene or one of its superpixels opens the scene's overlay picture. The pictures
    sit once per scene in a lookup table, not in every superpixel's popup. folium's default CDN
    assets are dropped and Leaflet is inlined, so the page needs no network (except for the
    base map's tiles); the only folium features used are the ones plain Leaflet can run
    (jQuery-based ``folium.Popup`` is not one).
    """
    import folium
    from folium.utilities import JsCode

    config = store.config
    fmap = folium.Map(tiles=None, control_scale=True, maxZoom=MAP_MAX_ZOOM)
    fmap.default_js, fmap.default_css = [], []
    js, css = _leaflet_assets()
    popups = {f["properties"]["scene_id"]: _popup_html(f["properties"], store.overlay_path(f["properties"]["scene_id"]))
              for f in features if f["properties"]["kind"] == "scene"}
    header = fmap.get_root().header
    header.add_child(_raw(f"<style>{css}</style>"), name="leaflet_css")
    header.add_child(_raw(f"<script>{js}</script>"), name="leaflet")
    header.add_child(_raw(f"<script>var amberScenePopups = {_script_json(popups)};</script>"), name="amber_popups")
    base = _base_layer(basemap, config.zoom)
    if base is not None:
        base.add_to(fmap)
    folium.GeoJson(_area_feature(config.area), name="area scanned", interactive=False).add_to(fmap)
    scene_popup = JsCode(f"""function (feature, layer) {{
        layer.bindPopup(() => amberScenePopups[feature.properties.scene_id], {{maxWidth: {POPUP_MAX_PX}}});
    }}""")
    tooltips = {"scene": (["scene_id", "n_positive", "probability", "positive_area_m2"],
                          ["scene", "positive superpixels", "max probability", "positive area m²"]),
                "superpixel": (["scene_id", "label", "probability", "area_m2"],
                               ["scene", "superpixel", "probability", "area m²"])}
    for kind, name in (("scene", "flagged scenes"), ("superpixel", "positive superpixels")):
        layer_features = _layer_features(features, kind)
        if layer_features:
            fields, aliases = tooltips[kind]
            folium.GeoJson({"type": "FeatureCollection", "features": layer_features}, name=name,
                           on_each_feature=scene_popup, tooltip=folium.GeoJsonTooltip(fields, aliases)).add_to(fmap)
    rings = [f["geometry"]["coordinates"][0] for f in features if f["properties"]["kind"] == "scene"]
    if rings:
        lons = [p[0] for ring in rings for p in ring]
        lats = [p[1] for ring in rings for p in ring]
        fmap.fit_bounds([[min(lats), min(lons)], [max(lats), max(lons)]])
    else:
        b = config.area.bounds
        fmap.fit_bounds([[b.south, b.west], [b.north, b.east]])
    folium.LayerControl(collapsed=False).add_to(fmap)
    return fmap.get_root().render()


def export(
    run_dir: str | Path, out_dir: str | Path, registry: str | Path | None = None, basemap: str = "osm"
) -> tuple[ExportPaths, ExportSummary]:
    """Write ``detections.geojson``, ``summary.json`` and ``map.html`` for a run into ``out_dir``.

    With ``registry`` (a GeoJSON of licensed polygons) every detection gets ``licensed`` true or
    false by whether its centroid lies in a licensed polygon, and the summary counts the others.
    ``basemap`` is what the map draws beneath the detections: "osm" (OpenStreetMap, online),
    "none" (nothing, so the page needs no network at all) or an XYZ URL template.
    """
    check_basemap(basemap)
    registry_areas = None if registry is None else Registry(registry)
    out = Path(out_dir)
    paths = ExportPaths(out / "detections.geojson", out / "summary.json", out / "map.html")
    with RunStore(run_dir) as store:
        features = _features(store, registry_areas)
        summary = _summary(store, features, registry_areas is not None)
        page = _map(store, features, basemap)
    atomic.write_json(paths.detections, {"type": "FeatureCollection", "features": features})
    atomic.write_json(paths.summary, {k: v for k, v in asdict(summary).items() if v is not None})
    atomic.write_bytes(paths.map, page.encode("utf-8"))
    return paths, summary
