"""The demo region: the six real example scenes as zoom-18 tiles that a default scan sees exactly.

Built from the shared dataset into tmp_path (skipped where the dataset is absent); nothing is
written into the repo.
"""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from amber_hunter.errors import ConfigError, DatasetError
from amber_hunter.geo.tiles import flip_y, parse_area, scene_grid
from amber_hunter.images import decode_rgb, read_rgb
from amber_hunter.sources import FolderSource, MBTilesSource

SCRIPT = Path(__file__).resolve().parents[1] / "training" / "build_demo_region.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("build_demo_region", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


demo = _load_script()


@pytest.fixture(scope="module", params=[1, 2], ids=["K1", "K2"])
def region(request, tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp(f"demo-k{request.param}") / "demo"
    return demo.build_demo_region(out, request.param, data_root), request.param


def test_tiles_are_written_for_every_cell(region):
    built, k = region
    files = sorted((built.out / "tiles" / "18").glob("*/*.png"))
    assert len(built.scenes) == 6 * k
    assert len(files) == 6 * k * 16
    expected = {(t.x, t.y) for s in built.scenes for t in s.cell.tiles}
    assert {(int(f.parent.name), int(f.stem)) for f in files} == expected


def test_cells_are_aligned_adjacent_and_near_rivne(region):
    built, k = region
    cells = [s.cell for s in built.scenes]
    assert all(c.zoom == 18 and c.size == 4 and c.x0 % 4 == 0 and c.y0 % 4 == 0 for c in cells)
    assert {c.x0 for c in cells} == {cells[0].x0 + 4 * i for i in range(6)}
    assert {c.y0 for c in cells} == {cells[0].y0 + 4 * i for i in range(k)}
    lon, lat = built.bounds.centre
    assert abs(lat - 50.62) < 0.01 and abs(lon - 26.26) < 0.02


def test_aoi_covers_exactly_the_scene_cells(region):
    built, k = region
    aoi = json.loads((built.out / "aoi.geojson").read_text())
    assert aoi["type"] == "FeatureCollection"
    scanned = [c.scene_id for c in scene_grid(parse_area(aoi), 18, 4)]
    assert scanned == [s.scene_id for s in built.scenes]
    assert len(scanned) == 6 * k


def test_scenes_json_lists_sources_and_labels(region, data_root):
    built, k = region
    info = json.loads((built.out / "scenes.json").read_text())
    assert "nominal" in info["note"]
    scenes = info["scenes"]
    assert list(scenes) == [s.scene_id for s in built.scenes]
    assert sorted(v["source"] for v in scenes.values()) == sorted(
        f"{kind}{i}.png" for kind in ("positive", "negative") for i in (1, 2, 3) for _ in range(k)
    )
    assert all(v["label"] == v["source"].rstrip(".png0123456789") for v in scenes.values())
    assert all((data_root / "example" / v["source"]).is_file() for v in scenes.values())
    readme = (built.out / "README.md").read_text()
    assert "nominal" in readme and "aoi.geojson" in readme


def test_mbtiles_holds_the_same_tiles_with_tms_rows(region):
    built, _ = region
    db = sqlite3.connect(built.out / "demo.mbtiles")
    try:
        metadata = dict(db.execute("SELECT name, value FROM metadata"))
        rows = db.execute("SELECT zoom_level, tile_column, tile_row, tile_data FROM tiles").fetchall()
    finally:
        db.close()
    assert metadata["format"] == "png" and metadata["minzoom"] == metadata["maxzoom"] == "18"
    assert [float(v) for v in metadata["bounds"].split(",")] == pytest.approx(
        [built.bounds.west, built.bounds.south, built.bounds.east, built.bounds.north]
    )
    tiles = [t for s in built.scenes for t in s.cell.tiles]
    assert sorted((z, x, row) for z, x, row, _ in rows) == sorted((t.z, t.x, flip_y(t)) for t in tiles)
    folder = built.out / "tiles"
    for z, x, tms_row, data in rows:
        y = 2**z - 1 - tms_row
        assert bytes(data) == (folder / str(z) / str(x) / f"{y}.png").read_bytes()
    # The project's own MBTiles reader agrees (it flips rows back).
    source = MBTilesSource(built.out / "demo.mbtiles")
    try:
        for tile in (tiles[0], tiles[-1]):
            assert source.get(tile).data == (folder / "18" / str(tile.x) / f"{tile.y}.png").read_bytes()
    finally:
        source.close()


def test_stitched_cell_is_the_padded_example(region, data_root):
    built, _ = region
    for scene in built.scenes[-6:]:  # the last row: with --repeat, placed like the first
        source = read_rgb(data_root / "example" / scene.source)
        folder = FolderSource(built.out / "tiles")
        tiles = [decode_rgb(folder.get(t).data) for t in scene.cell.tiles]
        assert all(t.shape == (256, 256, 3) and t.std() > 0 for t in tiles)  # no blank tile
        stitched = np.vstack([np.hstack(tiles[r * 4 : r * 4 + 4]) for r in range(4)])
        assert stitched.shape == (1024, 1024, 3)
        assert np.array_equal(stitched, demo.pad_scene(source))
        h, w = source.shape[:2]
        assert (scene.height, scene.width) == (h, w)
        assert np.array_equal(stitched[:h, :w], source)  # placed at the top-left
        # The padding mirrors the image's edges (numpy "reflect": the edge row is not repeated),
        # so it is neither blank nor uniform.
        assert np.array_equal(stitched[h:, :w], source[h - 2 - np.arange(1024 - h), :w])
        assert np.array_equal(stitched[:h, w:], source[:h, w - 2 - np.arange(1024 - w)])
        assert stitched[h:, :].std() > 5 and stitched[:, w:].std() > 5


def test_pad_scene_rejects_an_oversized_image():
    with pytest.raises(DatasetError, match="does not fit"):
        demo.pad_scene(np.zeros((1025, 10, 3), np.uint8))


def test_rebuild_is_skipped_when_up_to_date_and_redone_when_k_changes(tmp_path, data_root):
    out = tmp_path / "demo"
    demo.build_demo_region(out, 1, data_root)
    marker = out / "scenes.json"
    before = marker.stat().st_mtime_ns, marker.stat().st_ino
    again = demo.build_demo_region(out, 1, data_root)
    assert (marker.stat().st_mtime_ns, marker.stat().st_ino) == before
    assert len(again.scenes) == 6 and again.scenes[0].label == "positive"
    bigger = demo.build_demo_region(out, 2, data_root)
    assert len(bigger.scenes) == 12
    assert len(list((out / "tiles" / "18").glob("*/*.png"))) == 12 * 16
    assert not [p for p in tmp_path.iterdir() if p.name != "demo"]  # no temporary folders left


def test_refuses_to_replace_a_foreign_folder(tmp_path, data_root):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a demo region"):
        demo.build_demo_region(tmp_path / "mine", 1, data_root)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_command_line(region, data_root):
    built, k = region
    run = [sys.executable, str(SCRIPT), "--out", str(built.out), "--data", str(data_root), "--repeat", str(k)]
    done = subprocess.run(run, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"{6 * k} scenes" in done.stdout
    bad = subprocess.run(run[:-1] + ["0"], check=False, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "--repeat" in bad.stderr
