"""``map.html``: a Leaflet page that explains itself, and the files beside it (``map_files/``).

The page carries Leaflet, Leaflet.markercluster (MIT, vendored in ``static/vendor``), its own
script and a compact table of the detections, so it opens offline from ``file://`` with no
request leaving the machine (except the base map's tiles, when one is chosen). What is heavy
stays out of the HTML and is loaded when needed: the popup picture and superpixel outlines of a
scene when it is opened, the downsampled scene imagery when zoomed in. A run with 10,000
detections is a page of about 2 MB.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from .. import atomic
from ..errors import AmberHunterError, ConfigError
from ..images import encode_png
from ..sources.base import PLACEHOLDERS, check_template
from .detections import M2_PER_HA, RunDetections
from .imagery import copy_overlay, imagery_jpeg, picture, scene_bounds_list
from .summary import ExportSummary

#: The package (django-js-lib-leaflet, BSD, no dependencies) whose Leaflet 1.9.4 is inlined in the map.
LEAFLET_PACKAGE = "js_lib_leaflet"
#: The deepest zoom the map allows, past the tiles' own (Leaflet enlarges them), to look at small pits.
MAP_MAX_ZOOM = 22
#: Widest popup, in px: the pictures are at most 512 px wide.
POPUP_MAX_PX = 540
#: The folder beside map.html with the pictures, imagery and outlines.
FILES_DIR = "map_files"
OSM = {"url": "https://tile.openstreetmap.org/{z}/{x}/{y}.png", "subdomains": [], "maxNativeZoom": 19,
       "attribution": "&copy; OpenStreetMap contributors"}
_STATIC = Path(__file__).resolve().parent / "static"


@dataclass(frozen=True)
class Basemap:
    """What the map draws beneath the detections: a URL template with the placeholders a scan
    accepts (``{z} {x} {y} {-y} {q} {s} {key}``), or nothing."""

    url: str | None
    subdomains: tuple[str, ...] = ("a", "b", "c")
    key_env: str | None = None


def check_basemap(basemap: str, key_env: str | None = None) -> None:
    """Refuse a base map the page cannot draw: "osm", "none", or an http(s) URL template that a
    scan would accept (``{q}`` quadkeys included); ``{key}`` needs ``key_env``."""
    if basemap in ("osm", "none"):
        return
    example = "e.g. --basemap 'https://tiles.example.org/{z}/{x}/{y}.png' or 'https://t0.example.net/a{q}.jpeg'"
    if not basemap.startswith(("http://", "https://")):
        raise ConfigError(f"--basemap {basemap!r} is not osm, none, or an http(s) URL template; {example}")
    try:
        names = check_template(basemap, PLACEHOLDERS, kind="--basemap")
    except AmberHunterError as exc:
        raise ConfigError(f"{exc}; {example}") from None
    if "key" in names and not key_env:
        raise ConfigError(f"--basemap {basemap!r} has {{key}}; name the environment variable holding the key with "
                          "--basemap-key-env VAR (the key is then written into map.html: use a key meant for publishing)")
    if key_env and not os.environ.get(key_env):
        raise ConfigError(f"--basemap-key-env {key_env}: the environment variable is empty or unset; export it with the key")


def _basemap_data(basemap: str, zoom: int, subdomains: tuple[str, ...], key_env: str | None) -> dict | None:
    if basemap == "none":
        return None
    if basemap == "osm":
        return OSM
    return {"url": basemap, "subdomains": list(subdomains), "maxNativeZoom": zoom,
            "attribution": urlsplit(basemap).hostname or "", "key": os.environ.get(key_env, "") if key_env else ""}


def _leaflet_assets() -> tuple[str, str]:
    """Leaflet's and Leaflet.markercluster's JS and CSS, to inline: the page must work offline.

    Leaflet's CSS icons (the layer control's) become data URIs, and source-map comments go, so
    the browser never asks for a file that is not in the page.
    """
    try:
        root = resources.files(LEAFLET_PACKAGE) / "static" / LEAFLET_PACKAGE
    except ModuleNotFoundError:
        raise ConfigError("map.html needs Leaflet from the django-js-lib-leaflet package; "
                          "pip install django-js-lib-leaflet==1.9.4.1") from None

    def data_uri(match: re.Match) -> str:
        return f"url(data:image/png;base64,{base64.b64encode((root / 'images' / match[1]).read_bytes()).decode()})"

    strip = lambda text: re.sub(r"//# sourceMappingURL=\S+", "", text)
    vendor = _STATIC / "vendor"
    js = strip((root / "leaflet.js").read_text("utf-8")) + "\n" + strip((vendor / "leaflet.markercluster.js").read_text("utf-8"))
    css = re.sub(r"url\(images/([\w.-]+\.png)\)", data_uri, (root / "leaflet.css").read_text("utf-8"))
    css += "\n" + (vendor / "MarkerCluster.css").read_text("utf-8") + (vendor / "MarkerCluster.Default.css").read_text("utf-8")
    return js, css


def _script_json(obj: object) -> str:
    """JSON that can sit inside a <script> element: no ``</script>`` can end it early."""
    return json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c")


def _stem(scene_id: str) -> str:
    return scene_id.replace("/", "_")


class MapFiles:
    """Writes ``map_files/``: per scene, its imagery (every done scene), its popup picture and
    its outlines (flagged scenes). Used as the ``on_scene`` hook of
    :func:`~amber_hunter.export.detections.collect`, so each scene's pixels are read once.

    The folder is built anew beside the old one (``map_files.tmp``) and swapped in by
    :meth:`publish` just before ``map.html`` is written, so an export that fails half-way leaves
    the published page and its files as they were. Its files are plain writes, not fsynced atomic
    ones: they are regenerated whole by the next export, and an fsync per file made a
    10,000-scene export spend a minute waiting on the disk. ``map.html`` itself is atomic.
    """

    def __init__(self, out_dir: Path):
        self.final = out_dir / FILES_DIR
        self.root = out_dir / f"{FILES_DIR}.tmp"
        if self.root.exists():
            shutil.rmtree(self.root)  # left by an export that failed
        for sub in ("imagery", "pictures", "scenes"):
            (self.root / sub).mkdir(parents=True)
        self.imagery: dict[str, bool] = {}
        self.pictures: dict[str, tuple[int, int]] = {}

    def __call__(self, scene_id: str, image: np.ndarray, valid: np.ndarray | None, masks: list) -> None:
        (self.root / "imagery" / f"{_stem(scene_id)}.jpg").write_bytes(imagery_jpeg(image, valid))
        self.imagery[scene_id] = True
        if masks:
            pic = picture(image, masks)
            (self.root / "pictures" / f"{_stem(scene_id)}.png").write_bytes(encode_png(pic))
            self.pictures[scene_id] = (pic.shape[1], pic.shape[0])

    def publish(self) -> None:
        """Swap the new folder in for the old one (the old one goes once the new one is in place)."""
        old = self.final.with_name(f"{FILES_DIR}.old")
        if old.exists():
            shutil.rmtree(old)
        if self.final.exists():
            self.final.rename(old)
        self.root.rename(self.final)
        self.root = self.final
        shutil.rmtree(old, ignore_errors=True)

    def finish(self, run: RunDetections, store) -> None:
        """Outlines of every flagged scene, and the scan's overlay where no picture was made."""
        for s in run.scenes:
            rows = [[p.label, None if p.probability is None else round(p.probability, 3), round(p.area_m2, 1),
                     None if p.disturbed_m2 is None else round(p.disturbed_m2, 1), p.licensed,
                     [[[round(x, 7), round(y, 7)] for x, y in ring] for ring in p.polygon["coordinates"]]]
                    for p in s.superpixels]
            text = f"amberScene({json.dumps(s.scene_id)},{_script_json(rows)});\n"
            (self.root / "scenes" / f"{_stem(s.scene_id)}.js").write_bytes(text.encode("utf-8"))
            if s.scene_id not in self.pictures and store is not None:
                dest = self.root / "pictures" / f"{_stem(s.scene_id)}.png"
                if copy_overlay(store, s.scene_id, dest):
                    import struct

                    self.pictures[s.scene_id] = struct.unpack(">II", dest.read_bytes()[16:24])


def _changes(store) -> dict | None:
    """The latest rescore's added and removed scenes and superpixels (``diff.geojson``), for the
    "changes since the last model" layer; "kept" features are left out: the map already shows them."""
    path = None if store is None else store.run_dir / "diff.geojson"
    if path is None or not path.is_file():
        return None
    diff = json.loads(path.read_text("utf-8"))
    features = [f for f in diff["features"] if f["properties"]["change"] != "kept"]
    return {"type": "FeatureCollection", "features": features} if features else None


def page_data(run: RunDetections, summary: ExportSummary, files: MapFiles, basemap: dict | None,
              imagery_bounds: dict, changes: dict | None = None) -> dict:
    """The compact table the page's script draws from (see static/map.js for the columns)."""
    scenes = []
    for s in run.scenes:
        lat, lon = s.centre
        pic = files.pictures.get(s.scene_id)
        scenes.append([s.scene_id, round(lat, 6), round(lon, 6), *scene_bounds_list(s.bounds),
                       s.capture_date.isoformat() if s.capture_date else None, round(s.max_probability, 3), s.n_positive,
                       round(s.positive_area_m2 / M2_PER_HA, 3),
                       None if s.disturbed_m2 is None else round(s.disturbed_m2 / M2_PER_HA, 3),
                       s.licence_status, None if s.unlicensed_m2 is None else round(s.unlicensed_m2 / M2_PER_HA, 3),
                       1 if pic else 0, *(pic or (0, 0))])
    b = run.area.bounds
    polygons = run.area.polygon_coordinates()
    area = {"type": "MultiPolygon", "coordinates": polygons} if polygons else {
        "type": "Polygon", "coordinates": [[[b.west, b.south], [b.east, b.south], [b.east, b.north], [b.west, b.north],
                                            [b.west, b.south]]]}
    started = run.started.isoformat() if run.started else "unknown date"
    totals = {k: v for k, v in summary.__dict__.items()}
    return {
        "run": run.name,
        "runKey": run.key,
        "title": f"{run.name}: suspected surface mining",
        "subtitle": f"amber-hunter scan started {started}, exported {dt.date.today().isoformat()}; "
                    "a flagged scene is a suspicion to check, not proof",
        "totals": totals,
        "area": area,
        "bounds": [b.south, b.west, b.north, b.east],
        "licensed": run.registry.geojson() if run.registry is not None else None,
        "basemap": basemap,
        "maxZoom": MAP_MAX_ZOOM,
        "popupMaxPx": POPUP_MAX_PX,
        "files": FILES_DIR,
        "scenes": scenes,
        "gaps": [[*scene_bounds_list(g.bounds), g.status, g.reason] for g in run.gaps],
        "imagery": [[*imagery_bounds[i], _stem(i)] for i in files.imagery],
        "changes": changes,
    }


def render(data: dict) -> str:
    js, css = _leaflet_assets()
    own_js = (_STATIC / "map.js").read_text("utf-8")
    own_css = (_STATIC / "map.css").read_text("utf-8")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_html(data['title'])}</title><style>{css}\n{own_css}</style><script>{js}</script></head>"
            f"<body><div id=\"map\"></div><script>window.AMBER = {_script_json(data)};</script>"
            f"<script>{own_js}</script></body></html>\n")


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_map(run: RunDetections, summary: ExportSummary, files: MapFiles, path: Path, *, basemap: str = "osm",
              subdomains: tuple[str, ...] = ("a", "b", "c"), basemap_key_env: str | None = None, store=None) -> None:
    """Write ``map.html`` (``files`` has already received the scenes' pixels)."""
    files.finish(run, store)
    imagery_bounds = {}
    if files.imagery:
        from ..run.scenes import cell_from_id

        imagery_bounds = {i: scene_bounds_list(cell_from_id(i).bounds) for i in files.imagery}
    data = page_data(run, summary, files, _basemap_data(basemap, run.config.zoom, subdomains, basemap_key_env),
                     imagery_bounds, _changes(store))
    page = render(data).encode("utf-8")
    files.publish()
    atomic.write_bytes(path, page)
