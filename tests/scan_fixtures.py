"""The synthetic scan region and the session fixtures built on it (region, tiny_model, folder_run),
shared by the scan, export and map tests through ``pytest_plugins`` in conftest.py, so each is
built once per session.
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import asdict
from pathlib import Path

import mercantile
import numpy as np
import pytest

from amber_hunter.geo.tiles import SceneCell
from amber_hunter.images import encode_png, read_rgb
from amber_hunter.run.config import RunConfig
from amber_hunter.run.scan import scan
from amber_hunter.run.scenes import TILE_SIZE
from amber_hunter.run.store import RunStore

#: What each scene cell of the test region holds, west to east.
LAYOUT = ("positive1", "negative1", "positive2", "blank", "missing", "garbage", "small")
EXPECTED = {"positive1": "done", "negative1": "done", "positive2": "done", "blank": "skipped",
            "missing": "no-imagery", "garbage": "failed", "small": "failed"}
ZOOM, SIZE = 18, 2


def region_cells() -> list[SceneCell]:
    t = mercantile.tile(26.25, 50.62, ZOOM)
    return [SceneCell(ZOOM, (t.x & ~1) + SIZE * k, t.y & ~1, SIZE) for k in range(len(LAYOUT))]


def _scene_image(example: Path, name: str) -> np.ndarray:
    side = SIZE * TILE_SIZE
    if name == "blank":
        return np.full((side, side, 3), 250, np.uint8)
    image = read_rgb(example / f"{name}.png")
    r, c = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
    return image[r:r + side, c:c + side]


def _tile_bytes(example: Path, name: str) -> dict[mercantile.Tile, bytes]:
    if name == "missing":
        return {}
    cell = region_cells()[LAYOUT.index(name)]
    if name in ("garbage", "small"):
        body = b"<html>rate limited</html>" if name == "garbage" else encode_png(np.zeros((128, 128, 3), np.uint8) + 60)
        return {tile: body for tile in cell.tiles}
    image = _scene_image(example, name)
    out = {}
    for i, tile in enumerate(cell.tiles):
        r, c = divmod(i, SIZE)
        out[tile] = encode_png(image[r * TILE_SIZE:(r + 1) * TILE_SIZE, c * TILE_SIZE:(c + 1) * TILE_SIZE])
    return out


def _write_mbtiles(path: Path, tiles: dict) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE metadata (name text, value text)")
    db.execute("CREATE TABLE tiles (zoom_level integer, tile_column integer, tile_row integer, tile_data blob)")
    db.executemany("INSERT INTO metadata VALUES (?, ?)", [("minzoom", str(ZOOM)), ("maxzoom", str(ZOOM))])
    db.executemany("INSERT INTO tiles VALUES (?, ?, ?, ?)", [(t.z, t.x, 2**t.z - 1 - t.y, data) for t, data in tiles.items()])
    db.commit()
    db.close()


class SyntheticRegion:
    """The test region on disk: a tile folder, the same tiles as MBTiles, and its bbox."""

    def __init__(self, root: Path, example: Path):
        self.folder = root / "tiles"
        self.mbtiles = root / "region.mbtiles"
        tiles = {t: data for name in LAYOUT for t, data in _tile_bytes(example, name).items()}
        for t, data in tiles.items():
            path = self.folder / str(t.z) / str(t.x) / f"{t.y}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        _write_mbtiles(self.mbtiles, tiles)
        cells = region_cells()
        w, n = cells[0].bounds.west, cells[0].bounds.north
        e, s = cells[-1].bounds.east, cells[-1].bounds.south
        eps = 1e-7  # inside the outer edges, so no neighbouring cell is touched
        self.aoi = f"{w + eps},{s + eps},{e - eps},{n - eps}"
        self.ids = {c.scene_id: name for c, name in zip(cells, LAYOUT)}

    def config(self, tiles, model, **options) -> RunConfig:
        return RunConfig(aoi=self.aoi, tiles=str(tiles), model=str(model), **{"zoom": ZOOM, "scene_tiles": SIZE, **options})


@pytest.fixture(scope="session")
def region(data_root, tmp_path_factory) -> SyntheticRegion:
    example = data_root / "example"
    if not example.is_dir():
        pytest.skip(f"example scenes not found in {example}")
    return SyntheticRegion(tmp_path_factory.mktemp("region"), example)


@pytest.fixture(scope="session")
def tiny_model(small_data, shared_cache, tmp_path_factory) -> Path:
    """A texture bundle with a 30-tree booster and threshold 0.5: real features, trained in seconds
    (the full training picks its threshold on out-of-fold fits, which takes tens of seconds)."""
    from amber_hunter.learn.cache import embed_files
    from amber_hunter.learn.dataset import load_dataset
    from amber_hunter.model.classify import Classifier, ModelBundle, ModelMetadata, fit_booster, save_bundle
    from amber_hunter.model.embed import get_embedder
    from amber_hunter.model.segment import SlicParams

    dataset = load_dataset([small_data])
    embedder = get_embedder("texture")
    features, _ = embed_files(dataset.paths, embedder, shared_cache)
    booster = fit_booster(features, dataset.labels, params={"n_estimators": 30})
    # Full-size SLIC: the scan, feedback and export tests were written against its superpixels
    # (test_slic_scale.py covers scaled SLIC through a scan).
    metadata = ModelMetadata(embedder="texture", embedder_version=embedder.version, embedder_params={},
                             dim=embedder.dim, threshold=0.5, target_precision=0.95, slic=asdict(SlicParams(scale=1)))
    return save_bundle(ModelBundle(metadata, Classifier(booster, [], embedder.dim)), tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def folder_run(region, tiny_model, tmp_path_factory) -> Path:
    """One uninterrupted scan of the folder source: the reference every other run must equal."""
    run = tmp_path_factory.mktemp("runs") / "folder"
    scan(region.config(region.folder, tiny_model), run)
    return run


def results(run: Path) -> tuple[list, list]:
    """Everything a run concluded, in a comparable form, checked for duplicates on the way."""
    with RunStore(run) as store:
        scenes = [(s.scene_id, s.status, s.flagged, s.n_positive, s.n_superpixels, s.max_probability and round(s.max_probability, 5))
                  for s in store.scenes()]
        regions = [(s[0], r.label, round(r.probability, 5), r.positive, r.polygon is not None)
                   for s in scenes for r in store.regions(s[0])]
        # every way of scanning stores each done scene's label map, the same one
        label_maps = {s[0]: store.segmentation(s[0]) for s in scenes if s[1] == "done"}
        assert all(m is not None for m in label_maps.values()), "a done scene without its label map"
        scenes = [(*s, hashlib.sha256(label_maps[s[0]].tobytes()).hexdigest()[:16] if s[0] in label_maps else None)
                  for s in scenes]
        table = store.embeddings() if any(s[1] == "done" for s in scenes) else None
    assert len({s[0] for s in scenes}) == len(scenes)
    done = [s for s in scenes if s[1] == "done"]
    assert sum(s[4] for s in done) == len(regions)
    if table is not None:
        keys = list(zip(table.column("scene_id").to_pylist(), table.column("label").to_pylist()))
        assert len(keys) == len(set(keys)) == len(regions)
    return scenes, regions


