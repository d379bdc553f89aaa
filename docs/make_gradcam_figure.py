"""The Grad-CAM example figure for the README: why the bundled default model scores four real crops.

    python docs/make_gradcam_figure.py [--data ../shared/datasets/texty-amber]

Writes ``docs/gradcam-example.png``: three positive crops and one negative, each as crop | heatmap
overlay, two a row, captioned with the model's probability. The crops are picked evenly by sorted name, so
the figure is the same on every run. The PNG is palette-quantised to stay small in the repo.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout, not whatever amber_hunter is installed

from amber_hunter.images import read_rgb
from amber_hunter.model.classify import bundled_model_path, load_bundle
from amber_hunter.model.gradcam import gradcam, overlay

OUT = ROOT / "docs" / "gradcam-example.png"
#: Height of every picture in the figure (px): small enough to keep the PNG under 200 KB.
TILE = 170
CAPTION = 18


def pick(folder: Path, n: int, offset: int) -> list[Path]:
    """``n`` crops of ``folder`` spread evenly over the sorted names."""
    files = sorted(folder.glob("*.png"))
    return files[offset :: max(len(files) // n, 1)][:n]


def panel(crop: np.ndarray, picture: np.ndarray, caption: str) -> Image.Image:
    """Crop and overlay side by side at ``TILE`` px high, the caption underneath."""
    width = round(crop.shape[1] * TILE / crop.shape[0])
    pair = np.concatenate([crop, np.full((crop.shape[0], 4, 3), 255, np.uint8), picture], axis=1)
    image = Image.fromarray(pair).resize((2 * width + 4, TILE), Image.Resampling.LANCZOS)
    out = Image.new("RGB", (image.width, TILE + CAPTION), "white")
    out.paste(image)
    ImageDraw.Draw(out).text((2, TILE + 3), caption, fill="black")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "texty-amber")
    args = parser.parse_args()
    bundle = load_bundle(bundled_model_path("default"))
    embedder = bundle.build_embedder()
    crops = [("positive", p) for p in pick(args.data / "positive", 3, 7)] + [
        ("negative", p) for p in pick(args.data / "negative", 1, 11)
    ]
    panels = []
    for label, path in crops:
        crop = read_rgb(path)
        cam = gradcam(bundle, crop, embedder=embedder)
        panels.append(panel(crop, overlay(crop, cam.heatmap), f"{label}: p(mining) = {cam.probability:.2f}"))
        print(f"{path.name}: p={cam.probability:.3f}; {cam.note}")
    gap, rows = 8, [panels[:2], panels[2:]]  # two panels a row: README-width
    width = max(sum(p.width for p in row) + gap * (len(row) - 1) for row in rows)
    figure = Image.new("RGB", (width, len(rows) * (TILE + CAPTION + gap) - gap), "white")
    for r, row in enumerate(rows):
        x = 0
        for p in row:
            figure.paste(p, (x, r * (TILE + CAPTION + gap)))
            x += p.width + gap
    figure.quantize(256, dither=Image.Dither.NONE).save(OUT, optimize=True)
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
