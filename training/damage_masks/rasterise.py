"""Rasterise the hand-drawn disturbed-ground polygons of ``masks.json`` into pixel masks.

    python training/damage_masks/rasterise.py [--data DATA_DIR] [--preview DIR]

The polygons were drawn by eye on 3-4x enlargements of the Texty example scenes with a 20 px grid
(``[x, y]`` = column, row of ``example/<scene>.png``). ``--preview DIR`` writes each scene with its
mask tinted, to check the drawing against the picture; the pictures are the dataset's and are not
committed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from amber_hunter.export.area import rasterise

HERE = Path(__file__).resolve().parent
MASKS = HERE / "masks.json"
DEFAULT_DATA = HERE.parents[2] / "shared" / "datasets" / "texty-amber"


def load_masks(path: Path = MASKS) -> dict:
    """``masks.json`` as a dict (scenes, their scored superpixels and polygons, the pixel size)."""
    return json.loads(path.read_text())


def scene_mask(polygons: list, shape: tuple[int, int]) -> np.ndarray:
    """The union of a scene's drawn polygons as a boolean mask of ``shape``."""
    mask = np.zeros(shape, bool)
    for polygon in polygons:
        mask |= rasterise([polygon], shape)
    return mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--preview", type=Path)
    args = parser.parse_args(argv)
    from amber_hunter.images import read_rgb, write_png

    masks = load_masks()
    for name, scene in masks["scenes"].items():
        image = read_rgb(args.data / "example" / f"{name}.png")
        mask = scene_mask(scene["polygons"], image.shape[:2])
        print(f"{name}: {int(mask.sum())} px drawn ({mask.sum() * masks['m_per_px'] ** 2:.0f} m2)")
        if args.preview:
            args.preview.mkdir(parents=True, exist_ok=True)
            out = image.astype(np.float32)
            out[mask] = 0.6 * out[mask] + 0.4 * np.array([255, 0, 255])
            write_png(args.preview / f"{name}_mask.png", out.astype(np.uint8))
    return 0


if __name__ == "__main__":
    sys.exit(main())
