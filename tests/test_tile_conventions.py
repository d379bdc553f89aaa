"""The demo region served the way common tools serve it, scanned with the bundled ``fast`` model.

The conventions are about pixels reaching the detector, so the cheap texture model checks them as
well as the CNN would, in seconds instead of a minute per scan (the default model's own results on
the demo region are checked by ``test_run_demo``).

Each variant holds exactly the pixels of the plain 256 px PNG folder, so a scan of it must reach
exactly the same results: @2x tiles (TiTiler ``tilesize=512``, ``rio mbtiles --tile-size 512``), 512
px tiles one zoom up, a gdal2tiles TMS folder with its ``tilemapresource.xml``, and a ``{s}`` URL
template with Bing-style subdomains against one server. Then RGBA tiles with transparent parts:
nothing is found where there is no imagery, and the pits that remain are still found.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import mercantile
import numpy as np
import pytest
from PIL import Image
from tile_servers import tile_server, tilemap_xml

from amber_hunter.geo.tiles import SceneCell
from amber_hunter.images import read_rgb
from amber_hunter.run.config import RunConfig
from amber_hunter.run.scan import scan
from amber_hunter.run.store import RunStore

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "training" / "build_demo_region.py"
MODEL = "fast"
#: What the fast model flags on the plain demo folder: the three mining scenes (positive2 with
#: three positive superpixels, the fewest that flag), and no negative. Every variant must match it.
FAST_MODEL_FLAGS = {"positive1", "positive2", "positive3"}


def _build_script():
    spec = importlib.util.spec_from_file_location("build_demo_region_tiles", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo(tmp_path_factory, data_root):
    return _build_script().build_demo_region(tmp_path_factory.mktemp("conventions") / "demo", 1, data_root)


def _tiles(demo) -> dict[mercantile.Tile, np.ndarray]:
    return {t: read_rgb(demo.out / "tiles" / str(t.z) / str(t.x) / f"{t.y}.png") for s in demo.scenes for t in s.cell.tiles}


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, compress_level=1)


def _scan(demo, tiles: str, run: Path, **options):
    config = RunConfig(aoi=str(demo.out / "aoi.geojson"), tiles=tiles, zoom=18, scene_tiles=4, model=MODEL, **options)
    scan(config, run)
    return _outcome(demo, run)


def _outcome(demo, run: Path):
    """(flagged example names, every superpixel's rounded probability by scene and label)."""
    names = {s.scene_id: Path(s.source).stem for s in demo.scenes}
    with RunStore(run) as store:
        scenes = list(store.scenes())
        flagged = {names[s.scene_id] for s in scenes if s.flagged}
        probabilities = {(s.scene_id, r.label): round(r.probability, 5) for s in scenes for r in store.regions(s.scene_id)}
    assert [s.status for s in scenes] == ["done"] * 6
    return flagged, probabilities


@pytest.fixture(scope="module")
def baseline_run(demo, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "png256"
    _scan(demo, str(demo.out / "tiles"), run)
    return run


@pytest.fixture(scope="module")
def baseline(demo, baseline_run):
    return _outcome(demo, baseline_run)


def test_the_plain_folder_flags_what_the_fast_model_finds_on_the_demo(baseline):
    assert baseline[0] == FAST_MODEL_FLAGS


def test_hidpi_512_tiles_give_the_same_results(demo, baseline, tmp_path):
    """@2x: the same tile z/x/y at 512 px. ``--zoom 18`` keeps its 256 px scale."""
    for t, pixels in _tiles(demo).items():
        _save(tmp_path / "tiles" / str(t.z) / str(t.x) / f"{t.y}.png", pixels.repeat(2, axis=0).repeat(2, axis=1))
    assert _scan(demo, str(tmp_path / "tiles"), tmp_path / "run") == baseline


def test_512_tiles_one_zoom_up_give_the_same_results(demo, baseline, tmp_path):
    """Each zoom-17 tile of 512 px holds the 2x2 zoom-18 tiles below it at the same scale."""
    blocks: dict[tuple[int, int], np.ndarray] = {}
    for t, pixels in _tiles(demo).items():
        block = blocks.setdefault((t.x // 2, t.y // 2), np.zeros((512, 512, 3), np.uint8))
        block[(t.y % 2) * 256:(t.y % 2 + 1) * 256, (t.x % 2) * 256:(t.x % 2 + 1) * 256] = pixels
    for (x, y), pixels in blocks.items():
        _save(tmp_path / "tiles" / "17" / str(x) / f"{y}.png", pixels)
    assert _scan(demo, str(tmp_path / "tiles"), tmp_path / "run", tile_size="512") == baseline


def test_a_gdal2tiles_tms_folder_gives_the_same_results(demo, baseline, tmp_path):
    """gdal2tiles numbers rows from the south and says so in tilemapresource.xml."""
    for t, pixels in _tiles(demo).items():
        _save(tmp_path / "tms" / "18" / str(t.x) / f"{2**18 - 1 - t.y}.png", pixels)
    (tmp_path / "tms" / "tilemapresource.xml").write_text(tilemap_xml())
    assert _scan(demo, str(tmp_path / "tms"), tmp_path / "run") == baseline


def test_custom_subdomains_against_one_server_give_the_same_results(demo, baseline, tmp_path):
    """Bing-style t0-t3 subdomains, here as the first path segment of one 127.0.0.1 server."""
    # The server serves files inside its root only, so the subdomain folders are links within it.
    with tile_server(demo.out) as server:
        for sub in ("t0", "t1", "t2", "t3"):
            (demo.out / sub).symlink_to(demo.out / "tiles", target_is_directory=True)
        try:
            template = server.url + "/{s}/{z}/{x}/{y}.png"
            outcome = _scan(demo, template, tmp_path / "run", subdomains="t0,t1,t2,t3")
            used = {path.split("/")[1] for path in server.hits}
        finally:
            for sub in ("t0", "t1", "t2", "t3"):
                (demo.out / sub).unlink()
    assert outcome == baseline
    assert used == {"t0", "t1", "t2", "t3"}


def _tiles_with_positives(run: Path, cell: SceneCell) -> set[mercantile.Tile]:
    """The zoom-18 tiles that a positive superpixel's bounding box of the scene touches."""
    with RunStore(run) as store:
        boxes = [r.bbox for r in store.regions(cell.scene_id, positive_only=True)]
    eps = 1e-7
    return {t for b in boxes for t in mercantile.tiles(b.west + eps, b.south + eps, b.east - eps, b.north - eps, 18)}


def test_transparent_parts_are_left_out_and_the_pits_are_still_found(demo, baseline_run, tmp_path):
    """RGBA tiles as a tile server sends them at the edge of its imagery (alpha 0 outside)."""
    names = {Path(s.source).stem: s for s in demo.scenes}
    scene, blank = names["positive1"], names["negative1"]
    # Transparent: the tiles of positive1 that no positive superpixel of the plain scan touches,
    # and the left half of one more, so that the pits lie only in the valid part.
    clear = [t for t in scene.cell.tiles if t not in _tiles_with_positives(baseline_run, scene.cell)]
    assert len(clear) >= 3, "positive1 should have tiles without pits to make transparent"
    half = clear.pop()
    tiles = _tiles(demo)
    valid_px = 0
    for t in scene.cell.tiles + blank.cell.tiles:
        alpha = np.full((256, 256), 255, np.uint8)
        if t in clear or t in blank.cell.tiles:
            alpha[:] = 0
        elif t == half:
            alpha[:, :128] = 0
        if t in scene.cell.tiles:
            valid_px += int((alpha > 0).sum())
        _save(tmp_path / "rgba" / str(t.z) / str(t.x) / f"{t.y}.png", np.dstack([tiles[t], alpha]))
    a, b = scene.cell.bounds, blank.cell.bounds
    eps = 1e-7
    aoi = (f"{min(a.west, b.west) + eps},{min(a.south, b.south) + eps},"
           f"{max(a.east, b.east) - eps},{max(a.north, b.north) - eps}")
    cells_between = {c.scene_id for c in (s.cell for s in demo.scenes)
                     if min(scene.cell.x0, blank.cell.x0) <= c.x0 <= max(scene.cell.x0, blank.cell.x0)}
    scan(RunConfig(aoi=aoi, tiles=str(tmp_path / "rgba"), zoom=18, scene_tiles=4, model=MODEL), tmp_path / "run")
    with RunStore(tmp_path / "run") as store:
        stored = {s.scene_id: s for s in store.scenes()}
        positives = store.regions(scene.scene_id, positive_only=True)
        status = store.status()
    assert set(stored) == cells_between
    assert stored[blank.scene_id].status == "no-imagery"
    kept = stored[scene.scene_id]
    assert kept.status == "done" and kept.flagged, kept
    assert kept.valid_fraction == pytest.approx(valid_px / 1024**2)
    assert status.partial == 1
    # No positive outline reaches into the transparent part: every vertex lies in valid imagery
    # or on its edge.
    transparent = [mercantile.bounds(t) for t in clear]
    for region in positives:
        for ring in region.polygon["coordinates"]:
            for lon, lat in ring:
                assert not any(tb.west + 1e-6 < lon < tb.east - 1e-6 and tb.south + 1e-6 < lat < tb.north - 1e-6
                               for tb in transparent), f"superpixel {region.label} reaches into the transparent part"
