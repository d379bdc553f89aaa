"""Measure every embedder under the honest protocols and write the README's comparison table.

    python training/evaluate_embedders.py [--data DIR] [--embedders texture,vgg16,vgg16+texture]
        [--bench benchmarks/results.json] [--out training/results]

For each embedder: grouped 5-fold (scenes kept whole), and spatial 5-band along longitude and
along latitude (train on four bands, test on the fifth). Each fold trains exactly as
``amber-hunter train`` does, threshold included. Writes one JSON report (and PR-curve PNG) per
run, ``table.md`` for the README, and ``results.json`` with everything. Embeddings are cached,
so a rerun costs only the classifier fits (about 3 minutes per CNN embedder and protocol on
2 cores; VGG16 embedding of the 860 crops adds ~4 minutes the first time).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from amber_hunter import atomic
from amber_hunter.learn.data import find_texty_dataset
from amber_hunter.learn.workflows import evaluate_protocol

HERE = Path(__file__).resolve().parent

RUNS = (("grouped", "lon"), ("spatial", "lon"), ("spatial", "lat"))


def run(data: Path, embedders: list[str], out: Path, target_precision: float) -> dict:
    results: dict = {}
    for name in embedders:
        for protocol, axis in RUNS:
            tag = f"{name}_{protocol}" + (f"_{axis}" if protocol == "spatial" else "")
            report = evaluate_protocol(
                [data],
                name,
                protocol,
                folds=5,
                axis=axis,
                target_precision=target_precision,
                plot=out / f"{tag}.pr.png",
            )
            m = results[tag] = report.to_json()
            atomic.write_json(out / f"{tag}.json", m)
            print(
                f"{tag:32s} P {m['precision']:.3f} R {m['recall']:.3f} F1 {m['f1']:.3f} AUC {m['roc_auc']:.3f}",
                flush=True,
            )
    return results


def table(results: dict, embedders: list[str], bench: dict) -> str:
    """The README table: one row per embedder."""
    lines = [
        (
            "| embedder | grouped F1 | grouped precision | grouped recall | grouped ROC AUC "
            "| spatial-lon ROC AUC | spatial-lon F1 | spatial-lat ROC AUC | spatial-lat F1 | s/scene |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in embedders:
        g, lon, lat = (results[f"{name}_grouped"], results[f"{name}_spatial_lon"], results[f"{name}_spatial_lat"])
        speed = bench.get(name)
        lines.append(
            f"| {name} | {g['f1']:.3f} | {g['precision']:.3f} | {g['recall']:.3f} | {g['roc_auc']:.3f} "
            f"| {lon['roc_auc']:.3f} | {lon['f1']:.3f} | {lat['roc_auc']:.3f} | {lat['f1']:.3f} "
            f"| {'n/a' if speed is None else speed} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="labelled folder (default: the texty dataset)")
    parser.add_argument("--embedders", default="texture,vgg16,vgg16+texture")
    parser.add_argument("--target-precision", type=float, default=0.90)
    parser.add_argument("--bench", type=Path, help="JSON mapping embedder -> s/scene text, from the benchmark")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    embedders = args.embedders.split(",")
    results = run(find_texty_dataset(args.data), embedders, args.out, args.target_precision)
    bench = json.loads(args.bench.read_text()) if args.bench else {}
    atomic.write_json(args.out / "results.json", results)
    text = table(results, embedders, bench)
    atomic.write_bytes(args.out / "table.md", text.encode())
    print(text)


if __name__ == "__main__":
    main()
