"""Build the offline demo region: the six Texty example scenes laid out as zoom-18 map tiles.

    python training/build_demo_region.py --out DIR [--repeat K] [--data DATA_DIR]

The demo must run end to end without the internet, so it needs a tile source that holds known
scenes: this script turns ``example/positive1-3.png`` and ``negative1-3.png`` of the Texty
dataset into a tiny map. Each ~1000x975 px scene fills exactly one scene cell (4x4 tiles of
256 px at zoom 18, i.e. 1024 px), so a default scan of ``DIR/aoi.geojson`` sees exactly those
scenes, one per cell, and should flag the three positive ones and none of the negative ones.

The coordinates are NOMINAL. The cells sit side by side near Rivne, Ukraine (~50.62 N,
26.25 E), in the region the study covered, but that is not where the imagery was taken: the six
scenes come from different places and are only placed here so that a map can show them.

Each image is placed at the top-left of its cell, so pixel (row, col) of the scene equals pixel
(row, col) of the example image. The remaining ~25 px on the right and ~50 px at the bottom are
the image's own edge reflected (``numpy.pad(mode="reflect")``), not a blank fill, because a scan
may treat uniform areas as "no data".

Writes, into DIR:

- ``tiles/{z}/{x}/{y}.png``: the 256 px tiles (a folder source, or a static HTTP server's root);
- ``demo.mbtiles``: the same tiles as MBTiles (TMS rows, metadata with format, zooms, bounds);
- ``aoi.geojson``: a polygon covering exactly the scene cells, shrunk by a hair so that no
  neighbouring cell is touched;
- ``scenes.json``: scene id -> source example and expected label, for tests and the demo check;
- ``README.md``: what all this is, and how to scan it.

``--repeat K`` lays the six scenes K times, in K rows of six cells, for benchmarks (6*K scenes).
DIR is built in a temporary folder and swapped in whole, so it is complete or absent; a build
whose DIR is already complete for the same sources and K does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

import mercantile
import numpy as np
from PIL import Image

from amber_hunter import atomic
from amber_hunter.errors import AmberHunterError, ConfigError, DatasetError
from amber_hunter.geo.tiles import Bounds, SceneCell, flip_y
from amber_hunter.images import read_rgb
from amber_hunter.learn.data import find_texty_dataset

ZOOM = 18
SCENE_TILES = 4
TILE_PX = 256
SCENE_PX = SCENE_TILES * TILE_PX
#: Top-left tile of the top-left cell: the zoom-18 tile at (50.62 N, 26.25 E), rounded down to a
#: multiple of SCENE_TILES so every scene lines up with the scan's cell grid.
ORIGIN_X, ORIGIN_Y = 150184, 88196
#: The order of the scenes in each row of cells.
EXAMPLES = ("positive1", "positive2", "positive3", "negative1", "negative2", "negative3")
#: How far (degrees, ~1 cm) the area's outline sits inside the cells' outer edges: enough that
#: rounding can never make it touch a neighbouring cell, far too little to leave a tile out.
AOI_INSET = 1e-7
#: Bumped whenever the layout or the files written change, so older builds are rebuilt.
LAYOUT_VERSION = 1
NOMINAL_NOTE = (
    "The coordinates are nominal: the scenes are placed near Rivne, Ukraine, to make a map, "
    "but they were not taken there."
)


@dataclass(frozen=True)
class DemoScene:
    """One scene of the demo region: which cell holds which example, and what a scan should say."""

    cell: SceneCell
    source: str
    label: str
    width: int
    height: int

    @property
    def scene_id(self) -> str:
        return self.cell.scene_id


@dataclass(frozen=True)
class DemoRegion:
    """A built demo region: its folder and its scenes in row-major order."""

    out: Path
    scenes: tuple[DemoScene, ...]

    @property
    def bounds(self) -> Bounds:
        """Lon/lat bounds of all the scene cells together."""
        nw = self.scenes[0].cell.bounds
        se = self.scenes[-1].cell.bounds
        return Bounds(nw.west, se.south, se.east, nw.north)


def pad_scene(image: np.ndarray) -> np.ndarray:
    """Place ``image`` at the top-left of a SCENE_PX square, reflecting its edges into the rest."""
    height, width = image.shape[:2]
    if height > SCENE_PX or width > SCENE_PX:
        raise DatasetError(f"example scene of {width}x{height} px does not fit one {SCENE_PX} px scene cell")
    return np.pad(image, ((0, SCENE_PX - height), (0, SCENE_PX - width), (0, 0)), mode="reflect")


def cut_tiles(scene: np.ndarray) -> list[bytes]:
    """The scene's tiles as PNG bytes, row-major, in the order of :attr:`SceneCell.tiles`.

    zlib level 1 encodes 4x faster than PIL's default for ~17 % larger tiles: tests and
    benchmarks rebuild the region, and a few MB more on disk cost nothing.
    """
    return [
        _png(scene[r : r + TILE_PX, c : c + TILE_PX])
        for r in range(0, SCENE_PX, TILE_PX)
        for c in range(0, SCENE_PX, TILE_PX)
    ]


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def layout(repeat: int) -> list[tuple[SceneCell, str]]:
    """Cells and the example each holds: ``repeat`` rows of the six examples, side by side."""
    return [
        (SceneCell(ZOOM, ORIGIN_X + SCENE_TILES * col, ORIGIN_Y + SCENE_TILES * row, SCENE_TILES), name)
        for row in range(repeat)
        for col, name in enumerate(EXAMPLES)
    ]


def aoi_geojson(bounds: Bounds) -> dict:
    """A FeatureCollection with one rectangle just inside ``bounds`` (counter-clockwise, RFC 7946)."""
    w, s = bounds.west + AOI_INSET, bounds.south + AOI_INSET
    e, n = bounds.east - AOI_INSET, bounds.north - AOI_INSET
    return {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {"name": "amber-hunter demo region", "note": NOMINAL_NOTE},
                "geometry": {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]},
            }
        ],
    }


def write_mbtiles(path: Path, tiles: dict[mercantile.Tile, bytes], bounds: Bounds) -> None:
    """Write ``tiles`` as an MBTiles 1.3 file: rows counted from the south (TMS), one zoom."""
    db = sqlite3.connect(path)
    try:
        with db:
            db.execute("CREATE TABLE metadata (name TEXT, value TEXT)")
            db.execute("CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB)")
            db.execute("CREATE UNIQUE INDEX tile_index ON tiles (zoom_level, tile_column, tile_row)")
            lon, lat = bounds.centre
            metadata = {
                "name": "amber-hunter demo region",
                "format": "png",
                "minzoom": str(ZOOM),
                "maxzoom": str(ZOOM),
                "bounds": f"{bounds.west},{bounds.south},{bounds.east},{bounds.north}",
                "center": f"{lon},{lat},{ZOOM}",
                "type": "baselayer",
                "version": str(LAYOUT_VERSION),
                "description": "The six Texty example scenes as zoom-18 tiles. " + NOMINAL_NOTE,
                "attribution": "Imagery: Bing Maps, via Texty (github.com/texty/amber-methodology)",
            }
            db.executemany("INSERT INTO metadata VALUES (?, ?)", metadata.items())
            db.executemany(
                "INSERT INTO tiles VALUES (?, ?, ?, ?)",
                ((t.z, t.x, flip_y(t), data) for t, data in tiles.items()),
            )
    finally:
        db.close()


def build_demo_region(out: str | Path, repeat: int = 1, data: str | Path | None = None) -> DemoRegion:
    """Build the demo region in ``out`` (see the module docstring), or reuse it if up to date."""
    if not (isinstance(repeat, int) and repeat >= 1):
        raise ConfigError(f"--repeat {repeat!r} must be a whole number >= 1 (6 scenes per repeat)")
    out = Path(out)
    example = find_texty_dataset(data) / "example"
    sources = {name: example / f"{name}.png" for name in EXAMPLES}
    missing = [str(path) for path in sources.values() if not path.is_file()]
    if missing:
        raise DatasetError(f"example scene {missing[0]} is missing; fetch the dataset with 'amber-hunter data fetch texty'")
    stamp = {
        "layout_version": LAYOUT_VERSION,
        "repeat": repeat,
        "sources": {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in sources.items()},
    }
    existing = _read_scenes(out)
    if existing is not None and existing.get("build") == stamp:
        return _region(out.resolve(), existing)
    if existing is None and out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is a non-empty folder that is not a demo region; choose a new or empty folder")

    images = {name: read_rgb(path) for name, path in sources.items()}
    scene_tiles = {name: cut_tiles(pad_scene(image)) for name, image in images.items()}
    cells = layout(repeat)
    tiles = {tile: png for cell, name in cells for tile, png in zip(cell.tiles, scene_tiles[name])}
    scenes = tuple(
        DemoScene(cell, f"{name}.png", name.rstrip("0123456789"), images[name].shape[1], images[name].shape[0])
        for cell, name in cells
    )
    region = DemoRegion(out.resolve(), scenes)
    with atomic.directory(out) as tmp:
        for tile, png in tiles.items():
            path = tmp / "tiles" / str(tile.z) / str(tile.x) / f"{tile.y}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)
        write_mbtiles(tmp / "demo.mbtiles", tiles, region.bounds)
        (tmp / "aoi.geojson").write_text(json.dumps(aoi_geojson(region.bounds), indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(region))
        (tmp / "scenes.json").write_text(json.dumps(_scenes_json(region, stamp), indent=2) + "\n")
    return region


def _scenes_json(region: DemoRegion, stamp: dict) -> dict:
    return {
        "note": NOMINAL_NOTE,
        "zoom": ZOOM,
        "scene_tiles": SCENE_TILES,
        "placement": "top-left; the rest of each 1024 px cell reflects the image's own edges",
        "build": stamp,
        "scenes": {
            s.scene_id: {"source": s.source, "label": s.label, "width": s.width, "height": s.height}
            for s in region.scenes
        },
    }


def _read_scenes(out: Path) -> dict | None:
    try:
        return json.loads((out / "scenes.json").read_text())
    except (OSError, ValueError):
        return None


def _region(out: Path, scenes_json: dict) -> DemoRegion:
    scenes = []
    for scene_id, info in scenes_json["scenes"].items():
        zoom, x0, y0, size = (int(part) for part in scene_id.split("/"))
        scenes.append(DemoScene(SceneCell(zoom, x0, y0, size), info["source"], info["label"], info["width"], info["height"]))
    return DemoRegion(out, tuple(scenes))


def _readme(region: DemoRegion) -> str:
    b = region.bounds
    positives = sum(s.label == "positive" for s in region.scenes)
    rows = "\n".join(f"| `{s.scene_id}` | `{s.source}` | {s.label} |" for s in region.scenes)
    return f"""# amber-hunter demo region

Made by `training/build_demo_region.py`: the six example scenes of the Texty dataset
(github.com/texty/amber-methodology, `model/datasets/example`), {len(region.scenes)} scenes in all,
as zoom-{ZOOM} map tiles.

**{NOMINAL_NOTE}** The imagery is Bing Maps aerial imagery of north-western Ukraine, 2014-2016.
Bounds (W, S, E, N): {b.west:.6f}, {b.south:.6f}, {b.east:.6f}, {b.north:.6f}.

Each scene fills one {SCENE_TILES}x{SCENE_TILES}-tile scene cell ({SCENE_PX} px). The image sits at the top-left of
its cell, so scene pixel (row, col) is example pixel (row, col); the remaining strips on the
right and at the bottom reflect the image's own edges.

| file | what |
| --- | --- |
| `tiles/{{z}}/{{x}}/{{y}}.png` | 256 px PNG tiles |
| `demo.mbtiles` | the same tiles as MBTiles |
| `aoi.geojson` | the area covering exactly the scene cells |
| `scenes.json` | scene id -> source example and expected label |

## Scanning it

    python -m http.server 8000 --bind 127.0.0.1 --directory {region.out}
    amber-hunter scan --aoi {region.out}/aoi.geojson --zoom {ZOOM} \\
        --tiles 'http://127.0.0.1:8000/tiles/{{z}}/{{x}}/{{y}}.png' --run RUN_DIR

`--tiles {region.out}/tiles` or `--tiles {region.out}/demo.mbtiles` scan the same scenes without a
server. Expected: the {positives} positive scenes flagged, none of the negative ones.

| scene | source | label |
| --- | --- | --- |
{rows}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder of the demo region (replaced whole when rebuilt)")
    parser.add_argument("--repeat", type=int, default=1, help="lay the six scenes K times (6*K scenes)")
    parser.add_argument("--data", type=Path, help="the texty-amber dataset folder (default: searched)")
    args = parser.parse_args(argv)
    try:
        region = build_demo_region(args.out, args.repeat, args.data)
    except AmberHunterError as exc:
        print(f"build_demo_region: error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(region.scenes)} scenes in {region.out} (aoi: {region.out / 'aoi.geojson'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
