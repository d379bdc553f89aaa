"""The settings of one region scan, checked once, stored with the run and compared on resume.

A scan runs for hours and is resumed by running the same command again, so the run directory
keeps the config it was started with. Some settings change what a finished scene's result means
(the area, zoom, tiles, model, flagging rule): resuming with different values would mix two
scans in one result, so those are refused unless forced. Others only change how fast the work
goes (workers, request rate, cache location) and may differ on every resume.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import AreaError, ConfigError, ModelBundleError
from ..geo.tiles import Area, Bounds, check_scene_tiles, check_zoom, parse_bbox, parse_geojson
from .scenes import MIN_VALID, check_tile_size

#: Settings that decide the results; a resume with other values is refused unless forced. The
#: model counts by its content, not its path: a model retrained into the same folder, or a new
#: bundled model after an upgrade, is a changed config.
FINGERPRINT_FIELDS = ("area", "zoom", "scene_tiles", "tile_size", "tiles", "scheme", "model_hash", "min_positive",
                      "min_valid", "date_header")
#: Settings that decide which scenes make up the region; changing one (with --force) drops the
#: scenes of the old grid from the run.
GRID_FIELDS = ("area", "zoom", "scene_tiles")
CONFIG_FORMAT = 2
#: The most worker processes a scan runs on one machine.
MAX_WORKERS = 64
#: The files whose bytes make a model bundle what it is.
BUNDLE_FILES = ("model.json", "xgb.json", "linear.json")


def model_hash(model: str | None) -> str:
    """A short content hash of a model bundle (``sha256`` over its files, 16 hex digits)."""
    from ..model.classify import resolve_model  # lazily: status and export never load scikit-image

    path = resolve_model(model)
    digest = hashlib.sha256()
    found = False
    for name in BUNDLE_FILES:
        try:
            data = (path / name).read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ModelBundleError(f"model bundle {path}: cannot read {name} ({exc}); check its permissions") from None
        found = True
        digest.update(name.encode() + b"\0" + data)
    if not found:
        raise ModelBundleError(f"model bundle {path} does not exist or is empty; train one with 'amber-hunter train' "
                               "or omit --model")
    return digest.hexdigest()[:16]


def _load_area(aoi: str) -> Area:
    """A ``W,S,E,N`` string, or the path of a GeoJSON file with the area's polygons."""
    path = Path(aoi)
    if path.is_file():
        try:
            obj = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AreaError(f"--aoi {aoi}: not a readable GeoJSON file ({exc}); give W,S,E,N or a GeoJSON polygon file") from None
        return parse_geojson(obj)
    if aoi.count(",") == 3:
        return parse_bbox(aoi)
    raise AreaError(f"--aoi {aoi!r} is neither W,S,E,N nor an existing GeoJSON file; e.g. --aoi 26.20,50.60,26.30,50.65")


def _absolute(spec: str | None) -> str | None:
    """Local paths become absolute, so a resume from another working directory finds the same files."""
    if spec is None or spec.startswith(("http://", "https://")):
        return spec
    return str(Path(spec).expanduser().resolve()) if Path(spec).expanduser().exists() else spec


def _area_to_json(area: Area) -> dict:
    return {"bounds": list(asdict(area.bounds).values()), "polygons": area.polygon_coordinates()}


def _area_from_json(d: dict) -> Area:
    polygons = tuple(tuple(tuple((float(x), float(y)) for x, y in ring) for ring in p) for p in d["polygons"])
    return Area(Bounds(*map(float, d["bounds"])), polygons)


@dataclass(frozen=True)
class RunConfig:
    """Everything a scan needs to know, validated on construction.

    ``aoi`` is kept as the user gave it (for messages); ``area`` is what it parsed to and what the
    scan uses, stored in ``config.json`` so that a resume still works if the GeoJSON file moved,
    and is refused if its polygons changed. API keys are never stored: only ``api_key_env``, the
    name of the environment variable that holds the key.
    """

    aoi: str
    tiles: str
    zoom: int = 18
    scene_tiles: int = 4
    model: str | None = None
    min_positive: int = 2
    workers: int = 1
    max_rps: float | None = None
    api_key_env: str | None = None
    date_header: str | None = None
    tile_cache: str | None = None
    #: Size limit of the tile cache in GB: least recently used tiles are pruned beyond it.
    tile_cache_max_gb: float | None = None
    tile_size: str = "auto"
    scheme: str | None = None
    subdomains: str | None = None
    min_valid: float = MIN_VALID
    #: Accept a model trained on random-weight ResNet50 features (benchmarks and tests only).
    allow_random: bool = False
    #: ``tcp://HOST:PORT`` of a running dask.distributed scheduler, or ``local:N`` for a
    #: LocalCluster of N worker processes; None scans on this machine.
    cluster: str | None = None
    model_hash: str | None = None
    area: Area | None = field(default=None, repr=False)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # frozen dataclass: set once, here
        if not isinstance(self.aoi, str):
            raise AreaError(f"aoi {self.aoi!r} must be a 'W,S,E,N' string or a GeoJSON file path")
        if self.area is None:
            set_("area", _load_area(self.aoi))
        set_("tiles", _absolute(str(self.tiles)))
        set_("model", None if self.model is None else _absolute(str(self.model)))
        set_("tile_cache", _absolute(self.tile_cache))
        check_zoom(self.zoom, "use e.g. --zoom 18")
        check_scene_tiles(self.scene_tiles, self.zoom, "use e.g. --scene-tiles 4")
        if isinstance(self.min_positive, bool) or not isinstance(self.min_positive, int) or self.min_positive < 0:
            raise ConfigError(f"min_positive={self.min_positive!r} must be a whole number >= 0; use e.g. --min-positive 2")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"workers={self.workers!r} must be a whole number from 1 to {MAX_WORKERS}; "
                              "use e.g. --workers 2")
        if self.max_rps is not None and not (isinstance(self.max_rps, (int, float)) and self.max_rps > 0):
            raise ConfigError(f"max_rps={self.max_rps!r} must be a positive number of requests per second, e.g. --max-rps 8")
        check_tile_size(self.tile_size)
        if self.tile_cache_max_gb is not None and (isinstance(self.tile_cache_max_gb, bool) or not isinstance(
                self.tile_cache_max_gb, (int, float)) or not self.tile_cache_max_gb > 0):
            raise ConfigError(f"tile_cache_max_gb={self.tile_cache_max_gb!r} must be a positive number of GB; "
                              "use e.g. --tile-cache-max-gb 50")
        if self.scheme not in (None, "xyz", "tms"):
            raise ConfigError(f"scheme={self.scheme!r} must be xyz or tms; use --scheme tms for gdal2tiles folders")
        if isinstance(self.min_valid, bool) or not isinstance(self.min_valid, (int, float)) or not 0 < self.min_valid <= 1:
            raise ConfigError(f"min_valid={self.min_valid!r} must be a share above 0 and at most 1; use e.g. --min-valid 0.25")
        if self.cluster is not None:
            from .cluster import local_workers  # here: cluster.py imports this module

            local_workers(self.cluster)
        if self.model_hash is None:
            set_("model_hash", model_hash(self.model))
        if self.api_key_env is not None and not self.api_key_env.isidentifier():
            raise ConfigError(f"api_key_env={self.api_key_env!r} must be an environment variable name, not the key itself")

    @property
    def tile_cache_max_bytes(self) -> int | None:
        """``tile_cache_max_gb`` in bytes, as the tile cache takes it."""
        return None if self.tile_cache_max_gb is None else int(self.tile_cache_max_gb * 2**30)

    @property
    def is_http(self) -> bool:
        return self.tiles.startswith(("http://", "https://"))

    def fingerprint(self) -> dict:
        """The settings that decide results, as plain JSON values."""
        d = self.to_json()
        return {name: d[name] for name in FINGERPRINT_FIELDS}

    def differences(self, other: RunConfig) -> list[str]:
        """Names of the result-deciding settings in which ``other`` differs from this config
        (``model`` for a model of other content)."""
        mine, theirs = self.fingerprint(), other.fingerprint()
        return [name.removesuffix("_hash") for name in FINGERPRINT_FIELDS if mine[name] != theirs[name]]

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "area"}
        return {"format": CONFIG_FORMAT, **d, "area": _area_to_json(self.area)}

    @classmethod
    def from_json(cls, d: dict) -> RunConfig:
        """The config stored by :meth:`to_json`; the area is taken as stored, not re-read."""
        if d.get("format") != CONFIG_FORMAT:
            raise ConfigError(f"run config format {d.get('format')!r} is not {CONFIG_FORMAT}; start a new run directory")
        names = {f.name for f in fields(cls)} - {"area"}
        try:
            return cls(**{k: v for k, v in d.items() if k in names}, area=_area_from_json(d["area"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"run config is corrupt ({type(exc).__name__}: {exc}); start a new run directory") from None
