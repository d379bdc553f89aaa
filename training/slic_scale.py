"""Measure SLIC on a shrunk scene against full-size SLIC (issue 10, Build §3).

    PYTHONPATH=. nice -n 5 python training/slic_scale.py
    Options: [--data DIR] [--out DIR] [--scales 2,3,4] [--runs 3] [--default-scales 2,3] [--no-default]

Why: SLIC is about 70 % of the texture model's detect time, and thirty superpixels do not need a
megapixel. ``SlicParams.scale`` runs SLIC on the scene box-averaged by an integer factor and brings
the labels back to full size by nearest neighbour (``amber_hunter.model.segment.segment``).

On the six example scenes (``example/*.png``, about 1000x975 px), against SLIC at full size:
- time: ``segment`` at every variant, interleaved in rounds (so contention hits all alike), median
  seconds per variant and the median of the per-round ratios to full size;
- agreement of the superpixels: adjusted Rand index over pixels, and for every full-size superpixel
  its best IoU with a superpixel of the variant (mean and minimum over the scene);
- the verdicts: flags and positive superpixel counts with the bundled ``fast`` model (every variant,
  its detect time too, as rounds) and the ``default`` model (one run per variant: ~13 s a scene).

Two sigma variants: ``ground`` keeps sigma in full-resolution pixels (1 px, so 1/scale on the small
image: what ``SlicParams`` does) and ``small`` keeps sigma 1 on the small image (``sigma=scale``).

Writes ``results/slic_scale.json`` and ``results/slic_scale.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from amber_hunter import atomic
from amber_hunter.images import read_rgb
from amber_hunter.learn.data import find_texty_dataset
from amber_hunter.model.classify import ModelBundle, load_bundle, resolve_model
from amber_hunter.model.detect import Detector
from amber_hunter.model.segment import SlicParams, segment

HERE = Path(__file__).resolve().parent
SIGMA_MODES = ("ground", "small")


def variant_name(scale: int, mode: str) -> str:
    return "full" if scale == 1 else f"1/{scale} sigma-{mode}"


def variants(base: SlicParams, scales) -> dict[str, SlicParams]:
    """The full-size reference and every (scale, sigma mode) variant of ``base``."""
    out = {"full": base}
    for s in scales:
        for mode in SIGMA_MODES:
            sigma = base.sigma if mode == "ground" else base.sigma * s
            out[variant_name(s, mode)] = dataclasses.replace(base, scale=s, sigma=sigma)
    return out


def agreement(reference: np.ndarray, other: np.ndarray) -> dict:
    """Adjusted Rand index over pixels, and every reference superpixel's best IoU in ``other``."""
    from sklearn.metrics import adjusted_rand_score

    a, b = reference.ravel(), other.ravel()
    na, nb = a.max() + 1, b.max() + 1
    inter = np.bincount(a.astype(np.int64) * nb + b, minlength=na * nb).reshape(na, nb)[1:, 1:]
    size_a, size_b = inter.sum(1), inter.sum(0)
    present = size_a > 0
    union = size_a[:, None] + size_b[None, :] - inter
    iou = (inter / np.maximum(union, 1))[present].max(1)
    return {
        "ari": float(adjusted_rand_score(a, b)),
        "best_iou_mean": float(iou.mean()),
        "best_iou_min": float(iou.min()),
        "n_superpixels": int((size_b > 0).sum()),
        "n_reference": int(present.sum()),
    }


def with_slic(bundle: ModelBundle, params: SlicParams) -> ModelBundle:
    return ModelBundle(dataclasses.replace(bundle.metadata, slic=dataclasses.asdict(params)), bundle.classifier)


def timed_rounds(fn, keys, runs: int) -> dict[str, list[float]]:
    """``fn(key)`` timed ``runs`` times per key, the keys interleaved within each round."""
    times = {k: [] for k in keys}
    for _ in range(runs):
        for k in keys:
            t0 = time.perf_counter()
            fn(k)
            times[k].append(time.perf_counter() - t0)
    return times


def summarize(times: dict[str, list[float]]) -> dict:
    ref = np.array(times["full"])
    return {
        k: {"median_s": float(np.median(v)), "ratio_to_full": float(np.median(np.array(v) / ref))}
        for k, v in times.items()
    }


def verdict(detection) -> dict:
    r = detection.result
    return {"flagged": r.flagged, "n_positive": r.n_positive, "n_superpixels": r.n_superpixels}


def measure(data: Path, scales, runs: int, default_scales, run_default: bool, out: Path) -> dict:
    fast = Detector.load("fast")
    base = fast.bundle.slic_params()
    if load_bundle(resolve_model("default")).slic_params() != base:
        raise SystemExit("the bundled models segment differently; this study assumes one SLIC setting")
    params = variants(base, scales)
    default = Detector.load("default") if run_default else None
    default_keys = ["full", *(variant_name(s, "ground") for s in default_scales)]
    scenes = []
    for path in sorted((data / "example").glob("*.png")):
        image = read_rgb(path)
        seg_times = summarize(timed_rounds(lambda k, image=image: segment(image, params[k]), params, runs))
        reference = segment(image, base).labels
        row = {"scene": path.name, "variants": {}}
        bundles = {k: with_slic(fast.bundle, p) for k, p in params.items()}

        def detect_fast(k, image=image, bundles=bundles):
            fast.bundle = bundles[k]
            return fast.run(image)

        fast_times = summarize(timed_rounds(detect_fast, params, runs))
        for k, p in params.items():
            entry = {
                "segment": seg_times[k],
                "agreement": agreement(reference, segment(image, p).labels),
                "fast": {**verdict(detect_fast(k)), "detect": fast_times[k]},
            }
            row["variants"][k] = entry
        if default is not None:
            full_bundle = default.bundle
            for k in default_keys:
                default.bundle = with_slic(full_bundle, params[k])
                t0 = time.perf_counter()
                row["variants"][k]["default"] = {**verdict(default.run(image)), "seconds": time.perf_counter() - t0}
            default.bundle = full_bundle
        scenes.append(row)
        print(
            path.name,
            {
                k: (
                    round(v["segment"]["ratio_to_full"], 3),
                    round(v["agreement"]["ari"], 3),
                    v["fast"]["n_positive"],
                    v.get("default", {}).get("n_positive"),
                )
                for k, v in row["variants"].items()
            },
            flush=True,
        )
        report = {"slic": dataclasses.asdict(base), "runs": runs, "scenes": scenes}
        write(out, report)  # scene by scene: a long run keeps what it measured
    return report


def write(out: Path, report: dict) -> None:
    atomic.write_json(out / "slic_scale.json", report)
    atomic.write_bytes(out / "slic_scale.md", markdown(report).encode())


def markdown(report: dict) -> str:
    keys = list(report["scenes"][0]["variants"])
    med = lambda xs: float(np.median(xs))
    lines = [
        "# SLIC on a shrunk scene, labels brought back to full size",
        "",
        (
            f"Generated by `PYTHONPATH=. nice -n 5 python training/slic_scale.py` ({report['runs']} interleaved "
            f"rounds per scene; base SLIC {report['slic']}). Times are medians on a shared 2-core machine; ratios are "
            "per round against full size, median over rounds, then median over the six scenes."
        ),
        "",
        (
            "| variant | segment s (median over scenes) | segment ratio | fast detect s | fast detect ratio | ARI | "
            "best IoU mean | best IoU min | superpixels (6 scenes) |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in keys:
        vs = [s["variants"][k] for s in report["scenes"]]
        lines.append(
            f"| {k} | {med([v['segment']['median_s'] for v in vs]):.3f} "
            f"| {med([v['segment']['ratio_to_full'] for v in vs]):.3f} "
            f"| {med([v['fast']['detect']['median_s'] for v in vs]):.3f} "
            f"| {med([v['fast']['detect']['ratio_to_full'] for v in vs]):.3f} "
            f"| {med([v['agreement']['ari'] for v in vs]):.3f} "
            f"| {med([v['agreement']['best_iou_mean'] for v in vs]):.3f} "
            f"| {min(v['agreement']['best_iou_min'] for v in vs):.3f} "
            f"| {'/'.join(str(v['agreement']['n_superpixels']) for v in vs)} |"
        )
    lines += ["", "Flags and positive superpixels per scene (flag: more than 2 positive).", ""]
    models = ["fast"] + (["default"] if "default" in report["scenes"][0]["variants"]["full"] else [])
    for model in models:
        ks = [k for k in keys if model in report["scenes"][0]["variants"][k]]
        lines += [f"| {model} | " + " | ".join(ks) + " |", "|---|" + "---|" * len(ks)]
        for s in report["scenes"]:
            cells = []
            for k in ks:
                v = s["variants"][k][model]
                cells.append(f"{'FLAG' if v['flagged'] else 'no'} {v['n_positive']}/{v['n_superpixels']}")
            lines.append(f"| {s['scene']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="the texty dataset folder (example/ inside)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--scales", default="2,3,4")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--default-scales", default="2,3", help="scales the slow default model runs at (sigma ground)")
    parser.add_argument("--no-default", action="store_true", help="skip the default model")
    args = parser.parse_args()
    scales = [int(s) for s in args.scales.split(",") if s]
    default_scales = [int(s) for s in args.default_scales.split(",") if s]
    report = measure(find_texty_dataset(args.data), scales, args.runs, default_scales, not args.no_default, args.out)
    print(markdown(report))


if __name__ == "__main__":
    main()
