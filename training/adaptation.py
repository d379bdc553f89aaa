"""Region adaptation, measured: what a few labels of a new area win back, by how they were picked.

    python training/adaptation.py [--seeds 0,1,2] [--budgets 10,20,50] [--strategies margin,...]
        [--area-min-per-class 1] [--jobs 2] [--data DIR] [--out DIR]

A model trained in one area loses precision in the next (the README's spatial-lon column). This
simulates a user in a new area with the shared data only. For each of the 5 longitude bands of
the spatial protocol (``amber_hunter.learn.evaluate.spatial_folds``: footprint groups whole, edges
at the positive groups' quantiles):

1. train on the other 4 bands exactly as ``train_default_model.py`` trains the default model
   (its embedder, ``fit_with_threshold`` at its ``TARGET_PRECISION``);
2. let each ``suggest`` strategy (margin, typical, mix, stratified, random) pick 10, 20 and 50
   superpixels of the held-out band, and reveal their labels;
3. retrain on the 4 bands plus the picks, the same way, and score the *rest* of the band (the
   band less the picks) at the new model's threshold.

The 0-label model is scored on the whole band and, for a paired comparison, on the same rest as
each pick set (``ΔF1``). Every step is repeated per seed; the seed drives the grouped folds and
XGBoost's subsampling of every fit, k-means and the random picks. A budget that would leave
nothing of a band to score (the smallest band holds 30 crops) skips that band.

Threshold recalibration, the other lever: the picks are labelled superpixels of the new area, so
they can move the threshold too. Three thresholds are scored on the same rest:
- ``trained``: the retrained model's own threshold, picked on grouped out-of-fold probabilities of
  all its training crops (what ``fit_with_threshold`` gives the retrained model);
- ``picks``: the retrained model, threshold re-chosen on the picks' out-of-fold probabilities alone
  by ``area_threshold`` (``choose_threshold``'s rule at the target precision, when the picks hold
  at least ``AREA_MIN_PER_CLASS`` of each class; else ``trained``). This is what ``retrain`` ships;
- ``picks, no retrain``: the 0-label model, threshold re-chosen on its probabilities of the picks,
  which it never saw (the cheapest adaptation: no retraining at all).

Metrics are pooled over the bands, as in the README's spatial columns (the confusion counts of all
bands' rests are added up, then F1, precision and recall taken), then averaged over seeds;
``band-mean F1`` averages per-band F1 instead. The default strategy of ``suggest`` is the one with
the best pooled F1 of what ``retrain`` ships (the ``picks`` threshold), averaged over the budgets.

Writes ``adaptation.json`` (every band × seed × strategy × budget with its picks and confusion
counts) and ``adaptation.md`` (the table) into ``--out``. Embeddings come from the cache; the
first run embeds the 860 crops (see ``evaluate_embedders.py``). With cached embeddings, 3 seeds and
``--jobs 2`` took 13 min on an otherwise idle 2-core machine (5 strategies: 15 fits without picks
and 210 with, each a ``fit_with_threshold`` on 420-830 crops; 26 min for 4 strategies at load 4-7
before).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# One OpenMP thread per fit, as in evaluate_embedders.py: small fits on a shared 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
from train_default_model import BUNDLES, TARGET_PRECISION

from amber_hunter import atomic
from amber_hunter.learn.cache import embed_files
from amber_hunter.learn.data import find_texty_dataset
from amber_hunter.learn.dataset import load_dataset
from amber_hunter.learn.evaluate import spatial_folds
from amber_hunter.learn.suggest import STRATEGIES, suggest
from amber_hunter.model.classify import (
    AREA_MIN_PER_CLASS,
    area_threshold,
    fit_with_oof,
)
from amber_hunter.model.embed import cnn_blocks, get_embedder

HERE = Path(__file__).resolve().parent
EMBEDDER = BUNDLES["default"][0]
BANDS = 5
#: Threshold variants scored on each rest, in table order (see the module docstring).
THRESHOLDS = ("trained", "picks", "picks, no retrain")


@dataclass
class Data:
    """The labelled crops as the study sees them: embeddings, labels, footprint groups, bands."""

    features: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    blocks: list
    folds: list


_DATA: Data | None = None  # each worker process loads its own copy once


def load(data_dir: Path | None) -> Data:
    dataset = load_dataset([find_texty_dataset(data_dir)])
    embedder = get_embedder(EMBEDDER)
    features, _ = embed_files(dataset.paths, embedder)
    labels, groups = dataset.labels, dataset.groups
    folds = spatial_folds(dataset.coordinates("lon"), labels, groups, BANDS)
    return Data(features, labels, groups, cnn_blocks(embedder), folds)


def _init(data_dir: Path | None) -> None:
    global _DATA
    _DATA = load(data_dir)


def train(d: Data, rows: np.ndarray, seed: int):
    """``fit_with_oof`` on ``rows``, as ``train`` and ``retrain`` fit: the classifier, its
    threshold and the grouped out-of-fold probabilities of ``rows`` (the ``picks`` threshold)."""
    clf, choice, oof = fit_with_oof(d.features[rows], d.labels[rows], d.groups[rows], d.blocks, TARGET_PRECISION, seed)
    return clf, choice.threshold, oof


def counts(labels: np.ndarray, probs: np.ndarray, threshold: float) -> list[int]:
    """``[tp, fp, fn, tn]`` at ``threshold``: what pools over bands."""
    pred = probs >= threshold
    return [
        int((pred & (labels == 1)).sum()),
        int((pred & (labels == 0)).sum()),
        int((~pred & (labels == 1)).sum()),
        int((~pred & (labels == 0)).sum()),
    ]


def recalibrated(labels: np.ndarray, probs: np.ndarray, fallback: float, min_per_class: int) -> float:
    """The threshold ``retrain`` ships, re-chosen on the picks by ``area_threshold`` when they hold
    ``min_per_class`` of each class, else ``fallback``."""
    choice = area_threshold(labels, probs, TARGET_PRECISION, min_per_class)
    return fallback if choice is None else choice.threshold


def run_band(band: int, seed: int, budgets: list[int], strategies: list[str], min_per_class: int) -> list[dict]:
    """Every strategy and budget on one held-out band with one seed."""
    d = _DATA
    train_rows, pool = d.folds[band]
    y = d.labels
    start = time.perf_counter()
    clf0, t0, _ = train(d, train_rows, seed)
    p0 = clf0.predict_proba(d.features[pool])
    out = [
        {
            "band": band,
            "seed": seed,
            "strategy": "none",
            "n": 0,
            "threshold": t0,
            "counts": {"trained": counts(y[pool], p0, t0)},
            "seconds": round(time.perf_counter() - start, 1),
        }
    ]
    print(f"band {band} seed {seed}: 0 labels, threshold {t0:.3f} ({out[0]['seconds']:.0f} s)", flush=True)
    for n in budgets:
        if n >= len(pool):
            print(f"band {band} seed {seed}: {n} labels skipped, the band holds {len(pool)}", flush=True)
            continue
        for strategy in strategies:
            start = time.perf_counter()
            local = np.array([s.index for s in suggest(clf0, d.features[pool], n, strategy, threshold=t0, seed=seed)])
            keep = np.ones(len(pool), bool)
            keep[local] = False
            picked, rest = pool[local], pool[keep]
            rows = np.concatenate([train_rows, picked])
            clf1, t1, oof = train(d, rows, seed)
            p1 = clf1.predict_proba(d.features[rest])
            t_picks = recalibrated(y[picked], oof[len(train_rows) :], t1, min_per_class)
            t_old = recalibrated(y[picked], p0[local], t0, min_per_class)
            p_rest0 = p0[keep]
            out.append(
                {
                    "band": band,
                    "seed": seed,
                    "strategy": strategy,
                    "n": n,
                    "picked": picked.tolist(),
                    "picked_positive": int(y[picked].sum()),
                    "thresholds": {"before": t0, "trained": t1, "picks": t_picks, "picks, no retrain": t_old},
                    "counts": {
                        "before": counts(y[rest], p_rest0, t0),
                        "trained": counts(y[rest], p1, t1),
                        "picks": counts(y[rest], p1, t_picks),
                        "picks, no retrain": counts(y[rest], p_rest0, t_old),
                    },
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            c = out[-1]["counts"]
            print(
                f"band {band} seed {seed}: {strategy:7s} {n:2d} labels ({int(y[picked].sum()):2d} positive) "
                f"F1 {f1(c['before']):.3f} -> {f1(c['trained']):.3f} (picks threshold {f1(c['picks']):.3f}, "
                f"no retrain {f1(c['picks, no retrain']):.3f})  {out[-1]['seconds']:.0f} s",
                flush=True,
            )
    return out


def prf(c) -> tuple[float, float, float]:
    """Precision, recall, F1 of ``[tp, fp, fn, tn]`` (0 where undefined, as scikit-learn's
    ``zero_division=0``)."""
    tp, fp, fn, _ = c
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def f1(c) -> float:
    return prf(c)[2]


def summarise(records: list[dict], seeds: list[int], budgets: list[int], strategies: list[str]) -> list[dict]:
    """One row per (budget, strategy): pooled-over-bands metrics per seed, averaged over seeds."""
    rows = []
    keys = [(0, "none")] + [(n, s) for n in budgets for s in strategies]
    for n, strategy in keys:
        mine = [r for r in records if r["n"] == n and r["strategy"] == strategy]
        if not mine:
            continue
        row = {"n": n, "strategy": strategy, "bands": sorted({r["band"] for r in mine})}
        variants = ["trained"] if n == 0 else ["before", *THRESHOLDS]
        for v in variants:
            per_seed = []
            for seed in seeds:
                pooled = np.sum([r["counts"][v] for r in mine if r["seed"] == seed], axis=0)
                band_f1 = [f1(r["counts"][v]) for r in mine if r["seed"] == seed]
                per_seed.append([*prf(pooled), float(np.mean(band_f1))])
            a = np.array(per_seed)
            row[v] = {
                "precision": float(a[:, 0].mean()),
                "recall": float(a[:, 1].mean()),
                "f1": float(a[:, 2].mean()),
                "f1_sd": float(a[:, 2].std()),
                "band_mean_f1": float(a[:, 3].mean()),
            }
        if n:
            row["picked_positive"] = float(np.mean([r["picked_positive"] for r in mine]))
            row["delta_f1"] = row["trained"]["f1"] - row["before"]["f1"]
        rows.append(row)
    return rows


def best_strategies(summary: list[dict], strategies: list[str]) -> dict[str, str]:
    """Per threshold variant, the strategy with the best pooled F1 averaged over the budgets. The
    default of ``suggest`` is the one for ``picks``: the threshold a retrained model ships with."""
    best = {}
    for v in THRESHOLDS:
        score = {s: np.mean([r[v]["f1"] for r in summary if r["strategy"] == s]) for s in strategies}
        best[v] = max(strategies, key=lambda s: score[s])
    return best


def markdown(report: dict) -> str:
    """``adaptation.md``: the table for the README, then what it rests on and the strategy chosen."""
    lines = [
        (
            "| labels | strategy | positives picked | F1 (± sd over seeds) | precision | recall | band-mean F1 "
            "| ΔF1 vs 0 labels, same rest | F1, threshold on picks | precision | recall "
            "| F1, threshold on picks, no retrain |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["summary"]:
        t = r["trained"]
        main = f"{t['f1']:.3f} ± {t['f1_sd']:.3f} | {t['precision']:.3f} | {t['recall']:.3f} | {t['band_mean_f1']:.3f}"
        if r["n"] == 0:
            lines.append(f"| 0 | (whole band) | | {main} | | | | | |")
            continue
        p, o = r["picks"], r["picks, no retrain"]
        lines.append(
            f"| {r['n']} | {r['strategy']} | {r['picked_positive']:.1f} | {main} | {r['delta_f1']:+.3f} "
            f"| {p['f1']:.3f} | {p['precision']:.3f} | {p['recall']:.3f} | {o['f1']:.3f} |"
        )
    bands = ", ".join(f"{b['n']} ({b['n_positive']})" for b in report["bands"])
    best = report["best_strategy_by_threshold"]
    return "\n".join(lines) + (
        f"\n\n{report['embedder']} at target precision {report['target_precision']}. Means over seeds "
        f"{', '.join(map(str, report['seeds']))}; F1, precision and recall pooled over the held-out bands' rests, "
        f"band-mean F1 averaged per band. Bands: {bands} crops (positives). A budget that would take a whole "
        "band skips it. ΔF1 is against the 0-label model on the same rest: the rests differ by strategy.\n"
        f"\nBest strategy over the budgets: **{report['default_strategy']}** with the threshold re-chosen on the "
        f"picks (what retrain ships; the default), {best['trained']} at the retrained model's own threshold, "
        f"{best['picks, no retrain']} without retraining. The picks' threshold needs "
        f"{report['area_min_per_class']} of each class among them.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="labelled folder (default: the texty dataset)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated; at least 3 for the README")
    parser.add_argument("--budgets", default="10,20,50", help="labels picked per band, comma-separated")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="suggest strategies, comma-separated")
    parser.add_argument("--area-min-per-class", type=int, default=AREA_MIN_PER_CLASS,
                        help="labels of each class the picks need to move the threshold (retrain's rule: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one band and seed each)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    budgets = [int(b) for b in args.budgets.split(",") if b]
    strategies = [s for s in args.strategies.split(",") if s]
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        parser.error(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    start = time.perf_counter()
    _init(args.data)
    d = _DATA
    print(
        f"{EMBEDDER}, target precision {TARGET_PRECISION}: bands of "
        + ", ".join(f"{len(te)} crops ({int(d.labels[te].sum())} positive)" for _, te in d.folds),
        flush=True,
    )
    tasks = [(band, seed, budgets, strategies, args.area_min_per_class) for seed in seeds for band in range(BANDS)]
    # spawn, not fork: the parent has run XGBoost already, and forked OpenMP state is unsafe.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, context, initializer=_init, initargs=(args.data,)) as pool:
        records = [r for rs in pool.map(run_band, *zip(*tasks)) for r in rs]
    summary = summarise(records, seeds, budgets, strategies)
    best = best_strategies(summary, strategies)
    default = best["picks"]
    seconds = round(time.perf_counter() - start)
    report = {
        "embedder": EMBEDDER,
        "target_precision": TARGET_PRECISION,
        "area_min_per_class": args.area_min_per_class,
        "seeds": seeds,
        "budgets": budgets,
        "strategies": strategies,
        "bands": [
            {"band": b, "n": len(te), "n_positive": int(d.labels[te].sum())} for b, (_, te) in enumerate(d.folds)
        ],
        "default_strategy": default,
        "best_strategy_by_threshold": best,
        "seconds": seconds,
        "summary": summary,
        "records": records,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(args.out / "adaptation.json", report)
    text = markdown(report)
    atomic.write_bytes(args.out / "adaptation.md", text.encode())
    print(text)
    print(f"{seconds} s in all")


if __name__ == "__main__":
    main()
