"""Measure a two-stage cascade in front of the default model (issue 10, Build §1 "cascade").

    PYTHONPATH=. nice -n 5 python training/cascade.py
    Options: [--data DIR] [--out DIR] [--keep 0.99,0.995] [--stages texture,efflite0+texture]
    [--no-scenes]

Why: in a real region almost every superpixel is forest, field or road, which a cheap model rejects
with near certainty. A cascade scores every superpixel with a cheap first stage (``texture``, or
``efflite0+texture``) and runs the CNN model, the full default ``vgg16+efflite0+texture``
classifier, only on the superpixels whose first-stage probability is at least ``t1``; the others
are negative (probability 0). This script measures what that costs in quality and how much CNN work
it saves.

Protocol: the honest ones of ``training/evaluate_embedders.py``, unchanged: grouped 5-fold (fold
seed 0) and 5 spatial bands along longitude and along latitude, footprint groups kept whole. In each
outer fold:
- the full model trains exactly as ``amber-hunter train`` does (``learn.evaluate.fit_fixed``:
  ``fit_with_threshold`` at target precision 0.90, its threshold chosen on the training part);
- the first stage's ``t1`` comes from the training part only: grouped 5-fold out-of-fold
  probabilities of the first stage (the inner folds ``fit_with_threshold`` uses), and ``t1`` is
  the largest threshold that keeps at least ``keep`` (0.99 or 0.995) of the training positives;
  the first stage is then refitted on the whole training part (``fit_classifier``);
- the test part is scored by both; the cascade's prediction is ``passed and full positive``.

Metrics are pooled over the test folds, as ``evaluate_features`` pools them. ROC AUC of the cascade
scores a rejected superpixel 0, which is what a deployed cascade would output.

The example scenes (``example/*.png``): segmented with the default bundle's SLIC parameters, the
first stage trained on all 860 crops with ``t1`` from their grouped out-of-fold probabilities (what a
shipped cascade would be), the default bundle scores every superpixel, and the cascade's flag is
compared with the default model's. Each embedder part is timed per scene, so the CNN work saved can
be read off (the cascade's cost is estimated as first stage + the rest times the share that passes;
CNN time is about linear in the number of crops).

Writes ``results/cascade.json`` and ``results/cascade.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

# One OpenMP thread per XGBoost/BLAS call, as in evaluate_embedders.py: small fits on a busy machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from amber_hunter import atomic
from amber_hunter.learn.cache import embed_files
from amber_hunter.learn.data import find_texty_dataset
from amber_hunter.learn.dataset import load_dataset
from amber_hunter.learn.evaluate import compute_metrics, fit_fixed, spatial_folds
from amber_hunter.model.classify import TARGET_PRECISION, fit_classifier, grouped_splits
from amber_hunter.model.detect import MIN_POSITIVE
from amber_hunter.model.embed import cnn_blocks, get_embedder

HERE = Path(__file__).resolve().parent
FULL = "vgg16+efflite0+texture"
STAGES = ("texture", "efflite0+texture")
KEEP = (0.99, 0.995)
PROTOCOLS = (("grouped", "lon"), ("spatial", "lon"), ("spatial", "lat"))
FOLDS = 5
SEED = 0


@dataclass(frozen=True)
class Features:
    """One embedder's cached crop embeddings and the column groups its classifier gives heads."""

    name: str
    x: np.ndarray
    blocks: list


def load_features(data: Path, names) -> dict[str, Features]:
    """Every named embedder's features of the labelled crops, from the embedding cache (the CNNs
    are never run here when the cache is warm)."""
    dataset = load_dataset([data])
    out = {}
    for name in names:
        embedder = get_embedder(name)
        x, _ = embed_files(dataset.paths, embedder)
        out[name] = Features(name, x, cnn_blocks(embedder))
    return out


def oof_probs(f: Features, labels, groups, idx) -> np.ndarray:
    """Grouped out-of-fold probabilities of ``f``'s classifier over the samples ``idx``: the inner
    folds ``fit_with_threshold`` uses to pick its threshold."""
    y, g = labels[idx], groups[idx]
    probs = np.zeros(len(idx), np.float32)
    for train, test in grouped_splits(y, g, FOLDS, SEED):
        probs[test] = fit_classifier(f.x[idx][train], y[train], g[train], f.blocks, SEED).predict_proba(f.x[idx][test])
    return probs


def keep_threshold(probs: np.ndarray, labels: np.ndarray, keep: float) -> float:
    """The largest threshold whose ``probs >= t`` keeps at least ``keep`` of the positives."""
    pos = np.sort(probs[labels == 1])[::-1]
    return float(pos[math.ceil(keep * len(pos)) - 1])


def share(mask: np.ndarray) -> float:
    return float(mask.mean()) if mask.size else float("nan")


def metrics_row(y, score, predicted) -> dict:
    m = compute_metrics(y, score, predicted.astype(np.int32))
    return {k: getattr(m, k) for k in ("f1", "precision", "recall", "roc_auc", "pr_auc", "confusion")}


def splits_for(dataset, protocol: str, axis: str):
    labels, groups = dataset.labels, dataset.groups
    if protocol == "grouped":
        return grouped_splits(labels, groups, FOLDS, SEED)
    return spatial_folds(dataset.coordinates(axis), labels, groups, FOLDS)


def evaluate(dataset, feats: dict[str, Features], protocol: str, axis: str, stages, keeps) -> dict:
    """The full model and every cascade variant on one protocol, pooled over its test folds."""
    labels, groups = dataset.labels, dataset.groups
    full = feats[FULL]
    n = len(labels)
    p_full = np.full(n, np.nan, np.float32)
    pred_full = np.zeros(n, bool)
    p_stage = {s: np.full(n, np.nan, np.float32) for s in stages}
    t1 = {(s, k): np.full(n, np.nan, np.float32) for s in stages for k in keeps}
    folds = []
    for fold, (train, test) in enumerate(splits_for(dataset, protocol, axis)):
        model = fit_fixed(full.x[train], labels[train], groups[train], full.blocks, TARGET_PRECISION, SEED)
        p_full[test] = model.classifier.predict_proba(full.x[test])
        pred_full[test] = p_full[test] >= model.choice.threshold
        row = {"fold": fold, "n_test": len(test), "full_threshold": model.choice.threshold, "stages": {}}
        for s in stages:
            f = feats[s]
            oof = oof_probs(f, labels, groups, train)
            clf = fit_classifier(f.x[train], labels[train], groups[train], f.blocks, SEED)
            p_stage[s][test] = clf.predict_proba(f.x[test])
            y_train = labels[train]
            for k in keeps:
                t = keep_threshold(oof, y_train, k)
                t1[(s, k)][test] = t
                row["stages"][f"{s}@{k}"] = {
                    "t1": t,
                    "train_oof_pass_positives": share(oof[y_train == 1] >= t),
                    "train_oof_pass_negatives": share(oof[y_train == 0] >= t),
                }
        folds.append(row)
    tested = ~np.isnan(p_full)
    y = labels[tested]
    out = {
        "protocol": protocol,
        "axis": axis if protocol == "spatial" else None,
        "n": int(tested.sum()),
        "n_positive": int(y.sum()),
        "full": metrics_row(y, p_full[tested], pred_full[tested]),
        "folds": folds,
        "cascades": {},
    }
    for s in stages:
        for k in keeps:
            passed = (p_stage[s] >= t1[(s, k)])[tested]
            score = np.where(passed, p_full[tested], 0.0)
            pred = passed & pred_full[tested]
            m = metrics_row(y, score, pred)
            out["cascades"][f"{s}@{k}"] = {
                "stage": s,
                "keep": k,
                **m,
                "recall_cost": out["full"]["recall"] - m["recall"],
                "positives_rejected": int((~passed & (y == 1)).sum()),
                "full_true_positives_lost": int((~passed & pred_full[tested] & (y == 1)).sum()),
                "pass_all": share(passed),
                "pass_negatives": share(passed[y == 0]),
                "pass_positives": share(passed[y == 1]),
                "t1_per_fold": [r["stages"][f"{s}@{k}"]["t1"] for r in folds],
            }
    return out


def scenes(data: Path, feats: dict[str, Features], dataset, stages, keeps) -> dict:
    """The shipped cascade on the example scenes: first stages trained on all crops, the default
    bundle on every superpixel, and per-part embedding times."""
    from amber_hunter.images import read_rgb
    from amber_hunter.model.classify import load_bundle, resolve_model
    from amber_hunter.model.detect import aggregate
    from amber_hunter.model.segment import segment

    labels, groups = dataset.labels, dataset.groups
    every = np.arange(len(labels))
    first = {}
    for s in stages:
        f = feats[s]
        oof = oof_probs(f, labels, groups, every)
        clf = fit_classifier(f.x, labels, groups, f.blocks, SEED)
        first[s] = (clf, {k: keep_threshold(oof, labels, k) for k in keeps})
    bundle = load_bundle(resolve_model("default"))
    embedder = bundle.build_embedder()
    part_cols, start = {}, 0
    for p in embedder.parts:
        part_cols[p.name] = slice(start, start + p.dim)
        start += p.dim
    threshold = bundle.metadata.threshold
    rows = []
    for path in sorted((data / "example").glob("*.png")):
        image = read_rgb(path)
        t0 = time.perf_counter()
        seg = segment(image, bundle.slic_params())
        seconds = {"slic": time.perf_counter() - t0}
        parts = {}
        for p in embedder.parts:
            p.embed(image, seg.regions[:1])  # the first call builds the network: keep it out of the timing
            t0 = time.perf_counter()
            parts[p.name] = p.embed(image, seg.regions)
            seconds[p.name] = time.perf_counter() - t0
        x = np.concatenate([parts[p.name] for p in embedder.parts], axis=1)
        probs = bundle.predict_proba(x)
        full = aggregate(probs, seg, threshold)
        row = {
            "scene": path.name,
            "n_superpixels": len(seg.regions),
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "full": {"flagged": full.flagged, "n_positive": full.n_positive},
            "cascades": {},
        }
        for s in stages:
            clf, t1s = first[s]
            xs = np.concatenate([parts[name] for name in s.split("+")], axis=1)
            ps = clf.predict_proba(xs)
            stage_seconds = sum(seconds[name] for name in s.split("+"))
            rest_seconds = sum(v for name, v in seconds.items() if name not in s.split("+") and name != "slic")
            for k, t in t1s.items():
                passed = ps >= t
                casc = aggregate(np.where(passed, probs, 0.0), seg, threshold)
                row["cascades"][f"{s}@{k}"] = {
                    "t1": t,
                    "n_pass": int(passed.sum()),
                    "pass_share": share(passed),
                    "flagged": casc.flagged,
                    "n_positive": casc.n_positive,
                    "full_positives_rejected": int((~passed & (probs >= threshold)).sum()),
                    "embed_seconds_estimate": round(stage_seconds + rest_seconds * share(passed), 3),
                }
        row["embed_seconds_full"] = round(sum(v for k, v in seconds.items() if k != "slic"), 3)
        rows.append(row)
        print(path.name, row["full"], {k: (v["n_pass"], v["flagged"]) for k, v in row["cascades"].items()}, flush=True)
    return {"t1": {s: first[s][1] for s in stages}, "scenes": rows}


def fmt(v) -> str:
    return f"{v:.3f}"


def markdown(report: dict) -> str:
    lines = [
        "# Cascade: a cheap first stage in front of the default model",
        "",
        (
            "Generated by `PYTHONPATH=. nice -n 5 python training/cascade.py` (see its docstring for the protocol). "
            "`keep`: the share of training positives the first stage must pass (out-of-fold, training part only). "
            "pass = share of test crops whose first-stage probability reaches t1 (they reach the CNN)."
        ),
        "",
        (
            "| protocol | model | F1 | precision | recall | ROC AUC | recall cost | positives rejected "
            "| full TPs lost | pass all | pass negatives | pass positives | t1 per fold |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["protocols"]:
        name = r["protocol"] + (f"-{r['axis']}" if r["axis"] else "")
        f = r["full"]
        lines.append(
            f"| {name} | full {FULL} | {fmt(f['f1'])} | {fmt(f['precision'])} | {fmt(f['recall'])} "
            f"| {fmt(f['roc_auc'])} | | | | 1 | 1 | 1 | |"
        )
        for c in r["cascades"].values():
            lines.append(
                f"| {name} | cascade {c['stage']} keep {c['keep']} | {fmt(c['f1'])} | {fmt(c['precision'])} "
                f"| {fmt(c['recall'])} | {fmt(c['roc_auc'])} | {fmt(c['recall_cost'])} | {c['positives_rejected']}"
                f"/{r['n_positive']} | {c['full_true_positives_lost']} | {fmt(c['pass_all'])} "
                f"| {fmt(c['pass_negatives'])} | {fmt(c['pass_positives'])} "
                f"| {', '.join(f'{t:.3f}' for t in c['t1_per_fold'])} |"
            )
    sc = report.get("scenes")
    if sc:
        keys = list(sc["scenes"][0]["cascades"])
        lines += [
            "",
            "## Example scenes (first stage trained on all 860 crops; default bundle on every superpixel)",
            "",
            "t1 on all crops: "
            + "; ".join(
                f"{s}: " + ", ".join(f"keep {k} → {t:.4f}" for k, t in ts.items()) for s, ts in sc["t1"].items()
            ),
            "",
            (
                "Cells: superpixels reaching the CNN / all (flag, positives). Embed seconds: measured for the full "
                "model; for the cascade, first stage + the rest × pass share (an estimate)."
            ),
            "",
            "| scene | full (flag, positives) | full embed s | " + " | ".join(keys) + " |",
            "|---|---|---|" + "---|" * len(keys),
        ]
        for row in sc["scenes"]:
            cells = [
                f"{c['n_pass']}/{row['n_superpixels']} ({'flag' if c['flagged'] else 'no'}, {c['n_positive']}; "
                f"~{c['embed_seconds_estimate']:.2f} s)"
                for c in row["cascades"].values()
            ]
            f = row["full"]
            lines.append(
                f"| {row['scene']} | {'flag' if f['flagged'] else 'no'}, {f['n_positive']} "
                f"| {row['embed_seconds_full']:.2f} | " + " | ".join(cells) + " |"
            )
        for group in ("negative", "positive"):
            rows = [r for r in sc["scenes"] if r["scene"].startswith(group)]
            total = sum(r["n_superpixels"] for r in rows)
            parts = [f"{k}: {sum(r['cascades'][k]['n_pass'] for r in rows)}/{total}" for k in keys]
            lines.append(f"\n{group} scenes, superpixels reaching the CNN: " + "; ".join(parts))
        skipped = [
            f"{k}: {', '.join(r['scene'] for r in sc['scenes'] if r['cascades'][k]['n_pass'] <= MIN_POSITIVE) or 'none'}"
            for k in keys
        ]
        lines.append(
            f"\nScenes where at most {MIN_POSITIVE} superpixels pass, so the scene cannot be flagged and the CNN "
            "need not run at all: " + "; ".join(skipped)
        )
    return "\n".join(lines) + "\n"


def write(out: Path, report: dict) -> None:
    atomic.write_json(out / "cascade.json", report)
    atomic.write_bytes(out / "cascade.md", markdown(report).encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="labelled folder (default: the texty dataset)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--keep", default=",".join(map(str, KEEP)), help="shares of training positives to keep")
    parser.add_argument("--stages", default=",".join(STAGES), help="first-stage embedders, comma-separated")
    parser.add_argument("--no-scenes", action="store_true", help="skip the example scenes (no CNN run)")
    args = parser.parse_args()
    keeps = [float(k) for k in args.keep.split(",") if k]
    stages = [s for s in args.stages.split(",") if s]
    data = find_texty_dataset(args.data)
    dataset = load_dataset([data])
    feats = load_features(data, [FULL, *stages])
    report = {"full_model": FULL, "target_precision": TARGET_PRECISION, "keep": keeps, "protocols": []}
    for protocol, axis in PROTOCOLS:
        start = time.perf_counter()
        r = evaluate(dataset, feats, protocol, axis, stages, keeps)
        r["seconds"] = round(time.perf_counter() - start, 1)
        report["protocols"].append(r)
        print(protocol, axis, "full", {k: r["full"][k] for k in ("f1", "recall", "roc_auc")}, flush=True)
        for key, c in r["cascades"].items():
            print(
                f"  {key}: F1 {c['f1']:.3f} R {c['recall']:.3f} AUC {c['roc_auc']:.3f} "
                f"pass {c['pass_all']:.3f} neg {c['pass_negatives']:.3f}",
                flush=True,
            )
    write(args.out, report)  # the cross-validation is kept even if the scene pass fails
    if not args.no_scenes:
        report["scenes"] = scenes(data, feats, dataset, stages, keeps)
        write(args.out, report)
    print(markdown(report))


if __name__ == "__main__":
    main()
