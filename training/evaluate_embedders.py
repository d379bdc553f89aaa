"""Measure every embedder under the honest protocols and write the README's comparison table.

    python training/evaluate_embedders.py --target-precision 0.90 --nested
    python training/evaluate_embedders.py --target-precision 0.90 --embedders texture,vgg16+texture \
        --variants= --seeds 1,2
    Options: [--embedders a,b,c] [--variants fixed,nested] [--data DIR] [--bench FILE] [--out DIR]
    [--table-only]

For each embedder: grouped 5-fold, and spatial 5-band along longitude and along latitude (train on
four bands, test on the fifth). Folds keep footprint groups whole (scenes that overlap or touch
are one group, see ``amber_hunter.learn.dataset.footprint_groups``). Each fold trains exactly as
``amber-hunter train`` does, threshold included.

Two variants:
- ``fixed``: the shipped hyper-parameters ``LINEAR_C`` and ``XGB_PARAMS``. They were chosen by
  looking at these same grouped/spatial results, so these figures are optimistic.
- ``nested`` (``--nested`` adds it): each outer fold chooses among ``NESTED_GRID`` by inner
  grouped CV on its own training part (``amber_hunter.learn.evaluate.NestedFitter``): the
  unbiased check.

``--seeds 1,2`` adds grouped runs (fixed variant) with other fold shuffles, to show how much the
grouped figures move with the split alone.

Writes one JSON report per run (``<embedder>_<protocol>[_<axis>][_nested|_seedN].json``) and,
except for the extra seeds, its PR curve; ``results.json`` (every run without predictions) and
``table.md``. The reports of the main table's runs (fixed, seed 0) carry a ``predictions`` list:
every crop's label, probability, fold and footprint group, to look at a model's mistakes. The
nested and extra-seed reports leave it out (~150 KB per report in the repo, for runs that only
serve as checks).

Runs already in ``results.json`` and not re-run now are kept, so new embedders are added with one
command that recomputes nothing else, e.g.
``--embedders efflite0,efflite0+texture,vgg16+efflite0+texture --nested``; ``--table-only``
re-renders ``table.md`` (e.g. with ``--bench``) without computing anything.

Embeddings are cached; the first run embeds the crops (VGG16: ~4 min for 860 crops on 2 free
cores, 11 min on a busy one). Measured on 2 shared cores after that: the fixed runs of texture,
vgg16 and vgg16+texture took 5 min in all, the nested runs 11 min, the two extra seeds 2 min.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

# One OpenMP thread per XGBoost/BLAS call: these fits are small (under 900 rows), and on a busy
# 2-core machine more threads only spin against each other (a booster fit measured 0.6 s with one
# thread, 65 s with two while other jobs ran). Set before xgboost is imported; the caller's wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from amber_hunter import atomic
from amber_hunter.learn.data import find_texty_dataset
from amber_hunter.learn.dataset import load_dataset
from amber_hunter.learn.evaluate import NestedFitter, fit_fixed
from amber_hunter.learn.workflows import evaluate_protocol

HERE = Path(__file__).resolve().parent

#: (protocol, axis) of every table column group.
PROTOCOLS = (("grouped", "lon"), ("spatial", "lon"), ("spatial", "lat"))
VARIANTS = ("fixed", "nested")


@dataclass(frozen=True)
class Run:
    """One evaluation to perform: what the per-run file name and the table key are built from."""

    embedder: str
    protocol: str
    axis: str
    variant: str = "fixed"
    seed: int = 0

    @property
    def main(self) -> bool:
        """A run of the README's main table (fixed hyper-parameters, fold seed 0)."""
        return self.variant == "fixed" and self.seed == 0

    @property
    def tag(self) -> str:
        tag = f"{self.embedder}_{self.protocol}" + (f"_{self.axis}" if self.protocol == "spatial" else "")
        if self.variant != "fixed":
            tag += f"_{self.variant}"
        return tag + (f"_seed{self.seed}" if self.seed else "")


def plan(embedders: list[str], variants: list[str], seeds: list[int]) -> list[Run]:
    runs = []
    for name in embedders:
        for variant in variants:
            runs += [Run(name, protocol, axis, variant) for protocol, axis in PROTOCOLS]
        runs += [Run(name, "grouped", "lon", "fixed", seed) for seed in seeds if seed != 0]
    return runs


def report_text(report: dict) -> str:
    """Indented JSON, but one line per prediction: readable, and diffs stay small."""
    report = dict(report)
    preds = report.pop("predictions", [])
    head = json.dumps(report, indent=2)
    if not preds:
        return head + "\n"
    rows = ",\n    ".join(
        json.dumps({**p, "probability": round(p["probability"], 5)}, separators=(",", ":")) for p in preds
    )
    return head[:-2] + ',\n  "predictions": [\n    ' + rows + "\n  ]\n}\n"


def run(data: Path, runs: list[Run], out: Path, target_precision: float) -> dict:
    """Evaluate every run; write its report and PR curve; return summaries (no predictions) by tag."""
    results: dict = {}
    for r in runs:
        nested = r.variant == "nested"
        start = time.perf_counter()
        report = evaluate_protocol(
            [data],
            r.embedder,
            r.protocol,
            folds=5,
            axis=r.axis,
            target_precision=target_precision,
            seed=r.seed,
            plot=out / f"{r.tag}.pr.png" if r.seed == 0 else None,
            fitter=NestedFitter() if nested else fit_fixed,
            selection=r.variant,
        )
        d = report.to_json()
        if not r.main:  # see the module docstring: predictions are kept for the main runs only
            d.pop("predictions")
        d["seed"] = r.seed
        d["seconds"] = round(time.perf_counter() - start, 1)
        atomic.write_bytes(out / f"{r.tag}.json", report_text(d).encode())
        results[r.tag] = {k: v for k, v in d.items() if k != "predictions"}
        print(
            f"{r.tag:40s} P {d['precision']:.3f} R {d['recall']:.3f} F1 {d['f1']:.3f} "
            f"ROC AUC {d['roc_auc']:.3f}  ({d['seconds']:.0f} s)",
            flush=True,
        )
    return results


def table(runs: dict, bench: dict) -> str:
    """The README table: one row per embedder and variant present in ``runs``."""
    lines = [
        (
            "| embedder | hyper-parameters | grouped F1 | grouped precision | grouped recall | grouped ROC AUC "
            "| spatial-lon ROC AUC | spatial-lon F1 | spatial-lat ROC AUC | spatial-lat F1 | s/scene |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    embedders = list(dict.fromkeys(r["embedder"] for r in runs.values()))
    fmt = lambda d, k: "n/a" if d is None else f"{d[k]:.3f}"
    for name in embedders:
        for variant in VARIANTS:
            g, lon, lat = (runs.get(Run(name, p, a, variant).tag) for p, a in PROTOCOLS)
            if g is None and lon is None and lat is None:
                continue
            speed = bench.get(name) if variant == "fixed" else None
            lines.append(
                f"| {name} | {variant} | {fmt(g, 'f1')} | {fmt(g, 'precision')} | {fmt(g, 'recall')} "
                f"| {fmt(g, 'roc_auc')} | {fmt(lon, 'roc_auc')} | {fmt(lon, 'f1')} | {fmt(lat, 'roc_auc')} "
                f"| {fmt(lat, 'f1')} | {'n/a' if speed is None else speed} |"
            )
    seeded = [(tag, r) for tag, r in runs.items() if r["protocol"] == "grouped" and r.get("selection") == "fixed"]
    by_embedder: dict[str, list] = {}
    for _, r in seeded:
        by_embedder.setdefault(r["embedder"], []).append(r)
    by_embedder = {name: rs for name, rs in by_embedder.items() if len(rs) > 1}
    if by_embedder:
        lines += [
            "",
            "| embedder | grouped fold seed | F1 | precision | recall | ROC AUC |",
            "|---|---|---|---|---|---|",
        ]
        for name, rs in by_embedder.items():
            for r in sorted(rs, key=lambda r: r.get("seed", 0)):
                lines.append(
                    f"| {name} | {r.get('seed', 0)} | {r['f1']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} "
                    f"| {r['roc_auc']:.3f} |"
                )
    return "\n".join(lines) + "\n"


def merge(previous: dict, new: dict) -> dict:
    """The runs of ``previous`` (an earlier ``results.json``), replaced or extended by ``new``."""
    return {**previous, **new}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="labelled folder (default: the texty dataset)")
    parser.add_argument("--embedders", default="texture,vgg16,vgg16+texture", help="comma-separated")
    parser.add_argument("--target-precision", type=float, default=0.90)
    parser.add_argument("--nested", action="store_true", help="also run the nested hyper-parameter selection")
    parser.add_argument(
        "--variants", default="fixed", help="comma-separated subset of fixed,nested (--nested adds nested)"
    )
    parser.add_argument("--seeds", default="0", help="grouped fold seeds to run, e.g. 0,1,2 (fixed variant)")
    parser.add_argument("--bench", type=Path, help="JSON mapping embedder -> s/scene text, from the benchmark")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument(
        "--table-only", action="store_true", help="only rewrite table.md from results.json (e.g. to add --bench)"
    )
    args = parser.parse_args()
    results_path = args.out / "results.json"
    bench = json.loads(args.bench.read_text()) if args.bench else {}
    if args.table_only:
        text = table(json.loads(results_path.read_text())["runs"], bench)
        atomic.write_bytes(args.out / "table.md", text.encode())
        print(text)
        return
    embedders = [e for e in args.embedders.split(",") if e]
    variants = [v for v in args.variants.split(",") if v] + (["nested"] if args.nested else [])
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    variants = list(dict.fromkeys(variants))
    seeds = [int(s) for s in args.seeds.split(",") if s]
    data = find_texty_dataset(args.data)
    dataset = load_dataset([data])

    new = run(data, plan(embedders, variants, seeds), args.out, args.target_precision)
    previous = json.loads(results_path.read_text()).get("runs", {}) if results_path.is_file() else {}
    runs = merge(previous, new)
    summary = {"dataset": dataset.summary(), "runs": runs}
    atomic.write_json(results_path, summary)
    text = table(runs, bench)
    atomic.write_bytes(args.out / "table.md", text.encode())
    print(text)
    print(json.dumps(dataset.summary()))


if __name__ == "__main__":
    main()
