"""JPEG robustness: does serving the demo region as JPEG tiles change what a scan flags?

The issue: JPEG sources change the results of borderline scenes (a default-quality JPEG tile
server missed positive2). This script measures it on the offline demo region:

* The region is built with ``training/build_demo_region.py`` (repeat 1: positive1-3, negative1-3)
  in a temporary folder (or ``--workdir``).
* Every 256 px PNG tile is re-encoded, independently, as a JPEG with Pillow at each
  ``--qualities`` value (default 75 and 90), with Pillow's defaults otherwise (4:2:0 chroma
  subsampling, baseline, no optimisation), into ``jpeg-qNN/tiles/{z}/{x}/{y}.jpg``. The PNG
  region itself is the reference variant.
* Each variant is served by a static HTTP server on 127.0.0.1 (a thread of this process) and
  scanned through the library API (``RunConfig`` + ``scan``) into a fresh run directory, then
  exported (``export``, ``basemap="none"``) for its ``damaged_ha``. Results are read back only
  through ``RunStore``'s methods.
* Per variant it records the flagged scenes by name, every scene's ``n_positive`` and highest
  probability, ``damaged_ha``, and the change of the per-superpixel probabilities against the
  PNG scan of the same model. JPEG moves SLIC's boundaries a little, so superpixels are paired
  by their bounding boxes (an optimal one-to-one assignment on bbox IoU), not by label number;
  the JSON gives the pairs' IoU, how many kept their label, and how many crossed the model's
  threshold.
* It also records how much each encoding costs: tile bytes and PSNR against the PNG pixels.

    python benchmarks/bench_jpeg.py [--model default fast] [--qualities 75 90] [--json OUT]

The exit code is 0 when every scan finished with every scene done (whatever was flagged: the
script is a measurement), 2 when a scan failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from bench_scan import load_builder, serve  # benchmarks/ is not a package

ZOOM = 18
SCENE_TILES = 4
DEFAULT_QUALITIES = (75, 90)
DEFAULT_MODELS = ("default",)
#: A PNG and a JPEG superpixel are taken for the same one at this bbox IoU or more.
SAME_SUPERPIXEL_IOU = 0.5


# --------------------------------------------------------------------------------------------
# Tile variants


def encode_jpeg(png: Path, quality: int) -> tuple[bytes, float]:
    """``png`` as JPEG bytes at ``quality`` (Pillow defaults otherwise) and its PSNR in dB."""
    from PIL import Image

    with Image.open(png) as im:
        rgb = im.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality)  # subsampling: Pillow's default, 4:2:0
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        back = np.asarray(im.convert("RGB"), dtype=np.float64)
    mse = float(np.mean((np.asarray(rgb, dtype=np.float64) - back) ** 2))
    return data, (math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse))


def make_jpeg_variant(region: Path, out: Path, quality: int) -> dict:
    """Re-encode every tile of ``region/tiles`` into ``out/tiles/{z}/{x}/{y}.jpg``."""
    pngs = sorted((region / "tiles").rglob("*.png"))
    sizes_png, sizes_jpg, psnrs = [], [], []
    for png in pngs:
        data, psnr = encode_jpeg(png, quality)
        target = out / "tiles" / png.relative_to(region / "tiles").with_suffix(".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        sizes_png.append(png.stat().st_size)
        sizes_jpg.append(len(data))
        psnrs.append(psnr)
    return tile_stats(sizes_jpg, psnrs, sizes_png)


def tile_stats(sizes: list[int], psnrs: list[float] | None, png_sizes: list[int]) -> dict:
    finite = [p for p in (psnrs or []) if math.isfinite(p)]
    return {
        "tiles": len(sizes),
        "mean_tile_kb": sum(sizes) / len(sizes) / 1024,
        "bytes_vs_png": sum(sizes) / sum(png_sizes),
        "psnr_db_mean": sum(finite) / len(finite) if finite else None,
        "psnr_db_min": min(finite) if finite else None,
    }


# --------------------------------------------------------------------------------------------
# One scan


def scan_variant(root: Path, ext: str, aoi: Path, model: str, run_dir: Path, export_dir: Path,
                 attempts: int, wait_s: float) -> dict:
    """Serve ``root`` over HTTP, scan it into ``run_dir`` and export it; the store's results.

    An ImportError or AttributeError from inside amber_hunter (a library being edited) is retried
    ``attempts`` times, ``wait_s`` apart, each time in a fresh run directory.
    """
    for attempt in range(1, attempts + 1):
        shutil.rmtree(run_dir, ignore_errors=True)
        try:
            return _scan_once(root, ext, aoi, model, run_dir, export_dir)
        except (ImportError, AttributeError) as exc:
            if attempt == attempts:
                raise
            print(f"  {type(exc).__name__}: {exc}; retrying in {wait_s:.0f} s ({attempt}/{attempts})", file=sys.stderr)
            time.sleep(wait_s)
    raise AssertionError("unreachable")


def _scan_once(root: Path, ext: str, aoi: Path, model: str, run_dir: Path, export_dir: Path) -> dict:
    from amber_hunter.export.writers import export
    from amber_hunter.run.config import RunConfig
    from amber_hunter.run.scan import scan
    from amber_hunter.run.store import RunStore

    with serve(root) as server:
        url = f"http://127.0.0.1:{server.server_port}/tiles/{{z}}/{{x}}/{{y}}.{ext}"
        config = RunConfig(aoi=str(aoi), tiles=url, zoom=ZOOM, scene_tiles=SCENE_TILES, model=model)
        t0 = time.perf_counter()
        summary = scan(config, run_dir)
        wall = time.perf_counter() - t0
        requests = server.requests()
    _, exported = export(run_dir, export_dir, basemap="none")
    with RunStore(run_dir) as store:
        status = store.status()
        scenes = list(store.scenes())
        regions = {s.scene_id: store.regions(s.scene_id) for s in scenes}
    return {
        "wall_s": wall,
        "tile_requests": requests,
        "interrupted": summary.interrupted,
        "failures": summary.failures,
        "status": {k: getattr(status, k) for k in ("total", "done", "failed", "no_imagery", "skipped", "pending",
                                                    "flagged", "partial", "dropped", "rate")},
        "damaged_ha": exported.damaged_ha,
        "scenes": scenes,
        "regions": regions,
        "threshold": model_threshold(model),
    }


def model_threshold(model: str) -> float | None:
    from amber_hunter.model.classify import resolve_model

    try:
        return json.loads((resolve_model(model) / "model.json").read_text()).get("threshold")
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Comparing a variant's superpixels with the PNG scan's


def _iou(a, b) -> float:
    w = min(a.east, b.east) - max(a.west, b.west)
    h = min(a.north, b.north) - max(a.south, b.south)
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a.east - a.west) * (a.north - a.south) + (b.east - b.west) * (b.north - b.south) - inter
    return inter / union if union > 0 else 0.0


def compare_regions(ref: list, other: list) -> dict:
    """Pair the scored superpixels of two scans of one scene by bbox IoU; their probability changes."""
    from scipy.optimize import linear_sum_assignment

    a = [r for r in ref if r.probability is not None]
    b = [r for r in other if r.probability is not None]
    if not a or not b:
        return {"n_ref": len(a), "n": len(b), "pairs": 0, "deltas": []}
    iou = np.array([[_iou(x.bbox, y.bbox) for y in b] for x in a])
    rows, cols = linear_sum_assignment(-iou)
    pairs = [(a[i], b[j], iou[i, j]) for i, j in zip(rows, cols) if iou[i, j] >= SAME_SUPERPIXEL_IOU]
    deltas = [y.probability - x.probability for x, y, _ in pairs]
    return {
        "n_ref": len(a),
        "n": len(b),
        "pairs": len(pairs),
        "same_label": sum(x.label == y.label for x, y, _ in pairs),
        "median_iou": float(np.median([v for _, _, v in pairs])) if pairs else None,
        "crossed_threshold": sum(x.positive != y.positive for x, y, _ in pairs),
        "deltas": deltas,
    }


def summarise(variant: str, model: str, result: dict, ref: dict | None, names: dict) -> dict:
    scenes = result["scenes"]
    row = {
        "variant": variant,
        "model": model,
        "wall_s": result["wall_s"],
        "tile_requests": result["tile_requests"],
        "status": result["status"],
        "failures": result["failures"],
        "flagged": [names[s.scene_id] for s in scenes if s.flagged],
        "damaged_ha": result["damaged_ha"],
        "scenes": {
            names[s.scene_id]: {
                "scene_id": s.scene_id,
                "status": s.status,
                "flagged": s.flagged,
                "n_positive": s.n_positive,
                "n_superpixels": s.n_superpixels,
                "max_probability": s.max_probability,
                "positive_area_m2": s.positive_area_m2,
                "valid_fraction": s.valid_fraction,
            }
            for s in scenes
        },
    }
    if ref is not None:
        all_deltas, per_scene = [], {}
        for s in scenes:
            c = compare_regions(ref["regions"].get(s.scene_id, []), result["regions"][s.scene_id])
            deltas = c.pop("deltas")
            all_deltas += deltas
            abs_d = [abs(d) for d in deltas]
            per_scene[names[s.scene_id]] = {
                **c,
                "mean_abs_dp": float(np.mean(abs_d)) if abs_d else None,
                "max_abs_dp": float(np.max(abs_d)) if abs_d else None,
                "mean_dp": float(np.mean(deltas)) if deltas else None,
            }
        abs_all = np.abs(all_deltas) if all_deltas else None
        row["vs_png"] = {
            "pairs": len(all_deltas),
            "mean_abs_dp": float(abs_all.mean()) if abs_all is not None else None,
            "max_abs_dp": float(abs_all.max()) if abs_all is not None else None,
            "p95_abs_dp": float(np.percentile(abs_all, 95)) if abs_all is not None else None,
            "mean_dp": float(np.mean(all_deltas)) if all_deltas else None,
            "crossed_threshold": sum(v["crossed_threshold"] for v in per_scene.values()),
            "per_scene": per_scene,
        }
    return row


# --------------------------------------------------------------------------------------------
# Report


def print_table(rows: list[dict], order: list[str]) -> None:
    short = {name: name.removesuffix(".png") for name in order}
    head = ["model", "tiles", "flagged", "damaged ha"] + [f"n+ {short[n]}" for n in order] + \
           ["mean abs dp vs PNG", "max abs dp vs PNG", "crossed thr"]
    lines = [head]
    for r in rows:
        vs = r.get("vs_png")
        lines.append([
            r["model"], r["variant"],
            f"{len(r['flagged'])}: " + ", ".join(short[n] for n in order if n in r["flagged"]),
            f"{r['damaged_ha']:.2f}",
            *[str(r["scenes"][n]["n_positive"]) + ("*" if r["scenes"][n]["flagged"] else "") for n in order],
            "-" if vs is None else f"{vs['mean_abs_dp']:.4f}",
            "-" if vs is None else f"{vs['max_abs_dp']:.3f}",
            "-" if vs is None else f"{vs['crossed_threshold']}/{vs['pairs']}",
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines[1:]:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(line, widths)) + " |")
    print("\nn+ = positive superpixels of the scene (* = flagged); dp = change of a superpixel's probability "
          "against the PNG scan, superpixels paired by bbox IoU; crossed thr = pairs on the other side of the "
          "model's threshold.")


def machine_info() -> dict:
    import PIL
    import PIL.features

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "pillow": PIL.__version__,
        "libjpeg": PIL.features.version("jpg"),
    }
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    for module in ("numpy", "tensorflow", "xgboost", "skimage"):
        with contextlib.suppress(ImportError, AttributeError):  # a version is a nicety
            info[module] = __import__(module).__version__
    with contextlib.suppress(OSError):
        git = ["git", "-C", str(REPO)]
        head = subprocess.run([*git, "rev-parse", "HEAD"], check=False, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], check=False,
                               capture_output=True, text=True).stdout.strip()
        info["git"] = head + (" (with uncommitted changes)" if dirty else "")
    return info


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=list(DEFAULT_MODELS),
                        help="bundled names (default, fast) or bundle folders; one row set each (default: default)")
    parser.add_argument("--qualities", nargs="+", type=int, default=list(DEFAULT_QUALITIES),
                        help="JPEG qualities to try (default: 75 90)")
    parser.add_argument("--json", type=Path, help="write every variant's results here")
    parser.add_argument("--data", type=Path, help="texty-amber dataset folder (default: searched)")
    parser.add_argument("--workdir", type=Path, help="keep the region, tiles, runs and exports here (default: a temporary folder, removed)")
    parser.add_argument("--retries", type=int, default=3, help="attempts per scan when amber_hunter fails to import (mid-edit)")
    parser.add_argument("--retry-wait", type=float, default=180.0, help="seconds between those attempts")
    args = parser.parse_args(argv)
    if any(not 1 <= q <= 100 for q in args.qualities):
        parser.error("--qualities must be from 1 to 100")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    loadavg_start = os.getloadavg()
    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="amber-bench-jpeg-"))
    work.mkdir(parents=True, exist_ok=True)
    rows, problems = [], []
    try:
        region = load_builder().build_demo_region(work / "demo-region", repeat=1, data=args.data)
        expected = json.loads((region.out / "scenes.json").read_text())["scenes"]
        names = {scene_id: info["source"] for scene_id, info in expected.items()}
        order = [names[s] for s in expected]
        png_sizes = [p.stat().st_size for p in sorted((region.out / "tiles").rglob("*.png"))]
        variants = {"png": (region.out, "png", tile_stats(png_sizes, None, png_sizes))}
        for q in args.qualities:
            t0 = time.perf_counter()
            root = work / f"jpeg-q{q}"
            shutil.rmtree(root, ignore_errors=True)
            stats = make_jpeg_variant(region.out, root, q)
            variants[f"jpeg q{q}"] = (root, "jpg", stats)
            print(f"jpeg q{q}: {stats['tiles']} tiles, {stats['mean_tile_kb']:.1f} KB/tile "
                  f"({stats['bytes_vs_png']:.0%} of PNG), PSNR {stats['psnr_db_mean']:.1f} dB "
                  f"(min {stats['psnr_db_min']:.1f}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for model in args.model:
            ref = None
            for variant, (root, ext, stats) in variants.items():
                slug = f"{Path(model).name}-{variant.replace(' ', '-')}"
                result = scan_variant(root, ext, region.out / "aoi.geojson", model, work / "runs" / slug,
                                      work / "exports" / slug, args.retries, args.retry_wait)
                row = summarise(variant, model, result, ref, names)
                row["tile_stats"] = stats
                rows.append(row)
                if variant == "png":
                    ref = result
                st = row["status"]
                if st["done"] != len(expected) or st["pending"] or st["failed"] or result["interrupted"]:
                    problems.append(f"{model} {variant}: status {st}, failures {row['failures']}")
                print(f"{model} {variant}: {row['wall_s']:.1f} s, {st['done']} done, flagged "
                      f"{', '.join(row['flagged']) or 'none'}; {row['damaged_ha']:.2f} ha", file=sys.stderr)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print_table(rows, order)
    total_s = time.perf_counter() - started
    loadavg_end = os.getloadavg()
    print(f"\n{total_s:.0f} s in all; load average (1, 5, 15 min): start {', '.join(f'{x:.2f}' for x in loadavg_start)}; "
          f"end {', '.join(f'{x:.2f}' for x in loadavg_end)}")
    for problem in problems:
        print(f"SCAN PROBLEM: {problem}")
    if args.json:
        from amber_hunter import atomic

        atomic.write_json(args.json, {
            "command": [f"benchmarks/{Path(sys.argv[0]).name}"] + (sys.argv[1:] if argv is None else list(argv)),
            "machine": machine_info(),
            "loadavg_start": loadavg_start,
            "loadavg_end": loadavg_end,
            "total_s": total_s,
            "jpeg": {"encoder": "Pillow Image.save(format='JPEG', quality=Q), other options default (4:2:0)",
                     "qualities": args.qualities},
            "pairing": f"superpixels paired one-to-one by bbox IoU (optimal assignment), kept at IoU >= {SAME_SUPERPIXEL_IOU}",
            "scene_order": order,
            "rows": rows,
            "problems": problems,
        })
        print(f"wrote {args.json}")
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
