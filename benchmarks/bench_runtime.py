"""CNN runtime throughput: images/s of each way to run the per-crop embedders on this CPU.

Variants, all on the same fp32 weights and the same real crops (resized to 224 as ``embed`` does):

* ``eager_fp32``: the Keras model called eagerly per batch, as ``CnnEmbedder.embed`` did before the
  compiled runtime (the baseline every ratio is taken against);
* ``compiled_fp32`` and ``compiled_bf16``: ``CnnEmbedder.run`` on the ``tf`` engine (a
  ``tf.function`` per fixed batch shape) at each precision, whatever the CPU supports (bf16 without
  ``avx512_bf16``/``amx_bf16`` is emulated);
* ``tflite_fp32``: ``CnnEmbedder.run`` on the ``tflite`` engine (TensorFlow Lite with XNNPACK, one
  interpreter per batch shape), what ``auto`` picks for fp32 on a CPU. Its ``first_call_s`` leaves
  out the conversion (seconds, once per machine) when the compiled cache already holds the model;
  point ``AMBER_HUNTER_COMPILED_CACHE`` at an empty folder to include it;
* ``openvino``: when the ``openvino`` package imports, the same model converted from its
  ``tf.function`` and compiled for the CPU at bf16 where the CPU has it, else f32.

For each model and batch size, every run times each variant once on ``--crops`` crops (in a
rotated order, so no variant always runs first), after one untimed warm-up pass each (tracing
and compilation are reported apart as ``first_call_s``). Ratios to ``eager_fp32`` are taken per
run, then the median: the machine is shared, absolute images/s move with its load, the ratios
much less. Each variant's features are compared to eager fp32 (the worst per-block cosine).

    nice -n 5 python benchmarks/bench_runtime.py [--models vgg16 efflite0 resnet50-random] [--batches 8 16 32]
        [--runs 3] [--crops 32] [--json benchmarks/results-runtime.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("AMBER_HUNTER_DATA", REPO.parent / "shared" / "datasets" / "texty-amber"))


def real_crops(n: int, size: int) -> np.ndarray:
    """``n`` real crops, half of each class, spread over the sorted names, resized to ``size``."""
    from amber_hunter.images import read_rgb
    from amber_hunter.model.segment import resize_nearest

    out = []
    for sub, k in (("positive", n // 2), ("negative", n - n // 2)):
        files = sorted((DATA / sub).glob("*.png"))
        out += [resize_nearest(read_rgb(f), size) for f in files[:: max(len(files) // k, 1)][:k]]
    return np.stack(out)


def worst_cosine(a: np.ndarray, b: np.ndarray, blocks) -> float:
    """The lowest cosine over crops and conv blocks (each block has its own head in the classifier)."""
    worst = 1.0
    for block in blocks:
        cols = np.concatenate([np.arange(s, e) for s, e in block])
        x, y = a[:, cols].astype(np.float64), b[:, cols].astype(np.float64)
        worst = min(worst, float(((x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))).min()))
    return worst


def openvino_runner(part, precision: str):
    """``run(crops, batch)`` through OpenVINO, or None when it is not installed."""
    try:
        import openvino as ov
    except ImportError:
        return None
    import tensorflow as tf

    model = part.model
    function = tf.function(lambda x: model(x, training=False))
    spec = tf.TensorSpec((None, part.input_size, part.input_size, 3), tf.float32)
    converted = ov.convert_model(function.get_concrete_function(spec))
    core, compiled = ov.Core(), {}
    hint = "bf16" if precision == "bf16" and "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"

    def run(crops: np.ndarray, batch: int) -> np.ndarray:
        if batch not in compiled:
            shaped = converted.clone()
            shaped.reshape([batch, part.input_size, part.input_size, 3])
            compiled[batch] = core.compile_model(shaped, "CPU", {"INFERENCE_PRECISION_HINT": hint})
        out = []
        for i in range(0, len(crops), batch):
            x = part._preprocess(crops[i : i + batch])
            n = len(x)
            if n < batch:
                x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), np.float32)])
            out.append(np.asarray(compiled[batch](x)[0])[:n])
        return np.concatenate(out)

    run.precision = hint
    return run


def variants(part, precision: str) -> dict:
    """Name -> ``run(crops, batch)`` for every runtime variant of one embedder."""
    from amber_hunter.model.embed import cnn

    def eager(crops, batch):
        return np.concatenate([np.asarray(part.model(part._preprocess(crops[i : i + batch]), training=False))
                               for i in range(0, len(crops), batch)])

    def compiled(embedder):
        def run(crops, batch):
            cnn.BATCH_SIZE = batch  # read by Runtime.batch_size at each call
            return embedder.run(crops)

        return run

    out = {"eager_fp32": eager, "compiled_fp32": compiled(part.with_precision("fp32", "tf")),
           "compiled_bf16": compiled(part.with_precision("bf16", "tf")),
           "tflite_fp32": compiled(part.with_precision("fp32", "auto"))}
    ov_run = openvino_runner(part, precision)
    if ov_run is not None:
        out[f"openvino_{ov_run.precision}"] = ov_run
    return out


def bench_model(name: str, batches: list[int], runs: int, n_crops: int) -> list[dict]:
    from amber_hunter.model.embed import get_embedder
    from amber_hunter.model.embed.cnn import cpu_precision

    # resnet50-random: the study's network with random weights (ImageNet's cannot be downloaded here).
    part = get_embedder("resnet50", weights="random") if name == "resnet50-random" else get_embedder(name)
    t0 = time.perf_counter()
    part.model  # noqa: B018 - built before timing
    build_s = time.perf_counter() - t0
    crops = real_crops(n_crops, part.input_size)
    runners = variants(part, cpu_precision())
    rows = []
    for batch in batches:
        reference, first = None, {}
        features = {}
        for v, run in runners.items():
            t = time.perf_counter()
            features[v] = run(crops[:batch], batch)
            first[v] = time.perf_counter() - t
        reference = features["eager_fp32"]
        rates = {v: [] for v in runners}
        for r in range(runs):
            order = list(runners)[r % len(runners):] + list(runners)[: r % len(runners)]
            for v in order:
                t = time.perf_counter()
                runners[v](crops, batch)
                rates[v].append(len(crops) / (time.perf_counter() - t))
            print(f"{name} batch {batch} run {r + 1}: " + ", ".join(f"{v} {rates[v][-1]:.2f}" for v in runners),
                  flush=True)
        base = np.array(rates["eager_fp32"])
        for v in runners:
            ratios = np.array(rates[v]) / base
            rows.append({
                "model": name, "batch": batch, "variant": v,
                "img_s_runs": [round(x, 3) for x in rates[v]],
                "img_s_median": round(float(np.median(rates[v])), 3),
                "ratio_to_eager_fp32_runs": [round(float(x), 3) for x in ratios],
                "ratio_to_eager_fp32_median": round(float(np.median(ratios)), 3),
                "first_call_s": round(first[v], 2),
                "min_block_cosine_to_eager_fp32": round(worst_cosine(features[v], reference, getattr(part, "blocks", [[(0, part.dim)]])), 6),
            })
    for row in rows:
        row["model_build_s"] = round(build_s, 2)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "efflite0"])
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--crops", type=int, default=32, help="crops per timed pass (default 32)")
    parser.add_argument("--json", type=Path, default=HERE / "results-runtime.json")
    args = parser.parse_args(argv)

    from amber_hunter.model.embed.cnn import BF16_FLAGS, _import_keras, cpu_flags, cpu_precision

    keras = _import_keras()
    import tensorflow as tf

    try:
        import openvino

        ov_version = openvino.__version__
    except ImportError:
        ov_version = None
    load_start = os.getloadavg()
    rows = [row for name in args.models for row in bench_model(name, args.batches, args.runs, args.crops)]
    result = {
        "command": "python benchmarks/bench_runtime.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "bf16_flags": sorted(cpu_flags() & BF16_FLAGS),
            "auto_precision": cpu_precision(),
            "tensorflow": tf.__version__, "keras": keras.__version__, "openvino": ov_version,
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {"runs": args.runs, "crops_per_pass": args.crops, "batches": args.batches},
        "rows": rows,
    }
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'model':9} {'batch':>5} {'variant':16} {'img/s':>7} {'x eager':>8} {'first s':>8} {'cosine':>9}")
    for r in rows:
        print(f"{r['model']:9} {r['batch']:5d} {r['variant']:16} {r['img_s_median']:7.2f} "
              f"{r['ratio_to_eager_fp32_median']:8.2f} {r['first_call_s']:8.1f} {r['min_block_cosine_to_eager_fp32']:9.6f}")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
