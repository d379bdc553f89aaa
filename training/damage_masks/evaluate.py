"""The pixel-level damage estimate against the hand-drawn masks: error in hectares per superpixel.

    python training/damage_masks/evaluate.py [--data DATA_DIR] [--out results.json] [--preview DIR]

Each example scene is segmented as a scan segments it (SLIC with the bundled model's parameters),
and for every superpixel listed in ``masks.json`` three areas are compared: the whole superpixel
(the upper bound the study reported), the export's estimate of disturbed ground inside it
(:func:`amber_hunter.export.area.disturbed_pixels`) and the hand-drawn disturbed ground inside
it. Writes ``results.json`` beside this script: per superpixel, and the mean absolute error of
both figures in hectares. ``--preview DIR`` writes the scenes with drawn (magenta) and estimated
(cyan outline) ground, for a look; the pictures are the dataset's and are not committed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from rasterise import DEFAULT_DATA, HERE, load_masks, scene_mask

from amber_hunter import atomic
from amber_hunter.export.area import disturbed_pixels
from amber_hunter.images import read_rgb, write_png
from amber_hunter.model.classify import load_bundle, resolve_model
from amber_hunter.model.segment import segment

M2_PER_HA = 10_000.0


def evaluate(data: Path, preview: Path | None = None) -> dict:
    masks = load_masks()
    m2 = masks["m_per_px"] ** 2
    params = load_bundle(resolve_model(None)).slic_params()
    rows = []
    for name, scene in masks["scenes"].items():
        image = read_rgb(data / "example" / f"{name}.png")
        drawn = scene_mask(scene["polygons"], image.shape[:2])
        estimate = disturbed_pixels(image)
        labels = segment(image, params).labels
        for label in scene["superpixels"]:
            inside = labels == label
            rows.append({"scene": name, "superpixel": label,
                         "superpixel_ha": round(inside.sum() * m2 / M2_PER_HA, 4),
                         "drawn_ha": round((inside & drawn).sum() * m2 / M2_PER_HA, 4),
                         "estimate_ha": round((inside & estimate).sum() * m2 / M2_PER_HA, 4)})
        if preview:
            from skimage.segmentation import find_boundaries

            preview.mkdir(parents=True, exist_ok=True)
            out = image.astype(np.float32)
            out[drawn] = 0.6 * out[drawn] + 0.4 * np.array([255, 0, 255])
            out[find_boundaries(estimate, mode="inner")] = (0, 255, 255)
            out[find_boundaries(labels, mode="thick")] = (255, 255, 0)
            write_png(preview / f"{name}_estimate.png", out.astype(np.uint8))
    drawn = np.array([r["drawn_ha"] for r in rows])
    upper = np.array([r["superpixel_ha"] for r in rows])
    est = np.array([r["estimate_ha"] for r in rows])
    return {
        "what": "hectares of disturbed ground per superpixel: hand-drawn vs the pixel estimate vs the whole superpixel",
        "superpixels": rows,
        "n": len(rows),
        "drawn_ha_total": round(float(drawn.sum()), 4),
        "estimate_ha_total": round(float(est.sum()), 4),
        "upper_bound_ha_total": round(float(upper.sum()), 4),
        "estimate_mae_ha": round(float(np.abs(est - drawn).mean()), 4),
        "upper_bound_mae_ha": round(float(np.abs(upper - drawn).mean()), 4),
        "estimate_bias_ha": round(float((est - drawn).mean()), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--preview", type=Path)
    args = parser.parse_args(argv)
    results = evaluate(args.data, args.preview)
    atomic.write_json(args.out, results)
    for r in results["superpixels"]:
        print(f"{r['scene']} #{r['superpixel']}: superpixel {r['superpixel_ha']:.3f} ha, drawn {r['drawn_ha']:.3f}, "
              f"estimate {r['estimate_ha']:.3f}")
    print(f"MAE: estimate {results['estimate_mae_ha']:.4f} ha, whole superpixel {results['upper_bound_mae_ha']:.4f} ha; "
          f"totals drawn {results['drawn_ha_total']:.3f}, estimate {results['estimate_ha_total']:.3f}, "
          f"superpixels {results['upper_bound_ha_total']:.3f} ha")
    return 0


if __name__ == "__main__":
    sys.exit(main())
