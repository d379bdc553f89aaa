"""``amber-hunter feedback import|list``, ``retrain``, ``rescore``, ``rollback`` and ``suggest``: option parsing and
printing over ``amber_hunter.feedback`` and ``amber_hunter.run.rescore``, nothing more."""

from __future__ import annotations

from pathlib import Path

import click

from . import Cli, OneLineErrors
from .explore import default_label_store
from .progress import Progress, progress_every_option


def _echo_diff(diff) -> None:
    s = diff.summary()
    click.echo(f"v{s['from_version']} -> v{s['to_version']}: flagged scenes +{s['added']['scenes']} "
               f"-{s['removed']['scenes']} ={s['kept']['scenes']}; positive superpixels +{s['added']['superpixels']} "
               f"({s['added']['hectares']:.2f} ha) -{s['removed']['superpixels']} ({s['removed']['hectares']:.2f} ha) "
               f"={s['kept']['superpixels']}")
    for scene in s["scenes_removed"]:
        click.echo(f"  no longer flagged: {scene}")
    for scene in s["scenes_added"]:
        click.echo(f"  newly flagged: {scene}")
    if diff.outlines_missing:
        click.echo(f"  {diff.outlines_missing} new positive superpixels have no outline (their tiles are gone); "
                   "the map shows their bbox")


def _refresh(run_dir) -> None:
    """Write the run's exports again (the same folders and options), so the map shows the change."""
    from ..export.writers import refresh_exports

    done, failed = refresh_exports(run_dir)
    for paths in done:
        click.echo(f"refreshed {paths.map or paths.summary} (with a 'changes since the last model' layer)")
    for out, reason in failed:
        click.echo(f"could not refresh the export in {out} ({reason}); rerun 'amber-hunter export {run_dir} --out "
                   f"{out} ...'", err=True)


@click.group(cls=Cli)
def feedback():
    """Readers' and editors' reports on a run: import them, list them."""


@feedback.command("import")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--labels", "labels_store", type=click.Path(dir_okay=False),
              help="Label store to add the reports' superpixels to (default: the one explore uses).")
def feedback_import(run_dir, file, labels_store):
    """Map each report of FILE (CSV lat,lon,verdict,note or GeoJSON points/polygons with a verdict
    of mining or not-mining) onto the run's superpixels, and label them in the store."""
    from ..feedback.reports import import_feedback
    from ..learn.labels import LabelStore

    with LabelStore(Path(labels_store) if labels_store else default_label_store()) as labels:
        done = import_feedback(run_dir, file, labels)
    touched = [r for r in done.rows if r.matched]
    click.echo(f"{len(done.rows)} reports: {len(touched)} touched {done.superpixels} superpixels, "
               f"{len(done.rows) - len(touched)} touched nothing, {len(done.bad)} bad lines")
    for r in done.rows:
        if not r.matched:
            click.echo(f"  line {r.line}: {r.reason}")
    for line, where in done.repeated:
        click.echo(f"  line {line}: already imported ({where}); skipped")
    for b in done.bad:
        click.echo(f"  {b.reason}", err=True)
    if touched:
        click.echo(f"next: amber-hunter retrain {run_dir}")


@feedback.command("list")
@click.argument("run_dir", type=click.Path(file_okay=False))
def feedback_list(run_dir):
    """The reports imported into RUN_DIR, what each touched, and the model versions since."""
    import datetime as dt

    from ..run.store import RunStore

    with RunStore(run_dir) as store:
        rows, versions = store.feedback(), store.model_versions()
    for r in rows:
        when = dt.datetime.fromtimestamp(r.imported).isoformat(timespec="minutes")
        what = f"{len(r.matched)} superpixels" if r.matched else f"nothing ({r.reason})"
        click.echo(f"{when} {r.file} line {r.line}: {r.verdict}{' - ' + r.note if r.note else ''}: {what}")
    if not rows:
        click.echo("no feedback imported yet; use 'amber-hunter feedback import RUN_DIR FILE'")
    for v in versions:
        after = v.changes.get("after")
        figures = f", grouped OOF precision {after['precision']:.3f} recall {after['recall']:.3f}" if after else ""
        if v.changes.get("threshold") is not None:
            where = "the run's own labels" if v.changes.get("threshold_from") == "area" else "the training set"
            figures += f", threshold {v.changes['threshold']:.3f} (chosen on {where})"
        dropped = v.changes.get("dropped_positives") or []
        click.echo(f"v{v.version}{' (current)' if v.current else ''}: {v.changes.get('what', 'retrained')}"
                   f"{'' if v.parent is None else f' from v{v.parent}'}{figures}"
                   f"{f', {len(dropped)} training positives dropped' if dropped else ''}")


@click.command(cls=OneLineErrors)
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--data", multiple=True, type=click.Path(file_okay=False),
              help="Labelled folders to train on (default: those the run's model was trained on).")
@click.option("--labels", "labels_store", type=click.Path(dir_okay=False),
              help="Label store (default: the one explore and feedback import use).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Embedding cache (default: user cache dir).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threshold", "threshold_from", type=click.Choice(["area", "training"]), default="area",
              show_default=True, help="Choose the threshold on this run's own labelled superpixels when there are "
              "enough (area; readers' reports do not count), or on the whole training set (training).")
@progress_every_option
def retrain(run_dir, data, labels_store, cache_dir, seed, threshold_from, progress_every):
    """Train the next model version of RUN_DIR on its training data, every label and the feedback;
    rescore the run from its stored embeddings (no tile is fetched) and write the diff."""
    from ..feedback.retrain import retrain as run_retrain
    from ..learn.labels import LabelStore

    with LabelStore(Path(labels_store) if labels_store else default_label_store()) as labels, \
            Progress("retrain", progress_every, "reading the run and the crops") as progress:
        report = run_retrain(run_dir, data=list(data) or None, labels=labels, cache_dir=cache_dir, seed=seed,
                             threshold=threshold_from, progress=progress.items("embedding", "crop", then="fitting, measuring, rescoring the run"))
    b, a = report.before, report.after
    click.echo(f"v{report.version} from v{report.parent}: {report.crops} crops + {report.run_superpixels} run "
               f"superpixels ({report.positives} positive, {report.negatives} negative)")
    click.echo(f"grouped out-of-fold: precision {b.precision:.3f} -> {a.precision:.3f}, recall {b.recall:.3f} -> "
               f"{a.recall:.3f}, F1 {b.f1:.3f} -> {a.f1:.3f}; threshold {a.threshold:.3f}")
    if report.area is not None:
        c = report.area
        click.echo(f"threshold re-chosen on this run's {report.area_labels} labelled superpixels: {c.threshold:.3f} "
                   f"(out-of-fold on them: precision {c.precision:.3f}, recall {c.recall:.3f}); the new version uses it")
    elif threshold_from == "area":
        from ..model.classify import AREA_MIN_LABELS, AREA_MIN_PER_CLASS

        click.echo(f"the threshold stays the training set's {a.threshold:.3f}: choosing it on this run's own labels "
                   f"needs {AREA_MIN_LABELS} labelled in explore or imported, with {AREA_MIN_PER_CLASS} of each class "
                   f"(it has {report.area_labels}; readers' reports do not count)")
    if report.feedback_right:
        click.echo(f"feedback superpixels called right: {report.feedback_right[0]:.0%} -> {report.feedback_right[1]:.0%} "
                   "(the new model has trained on them)")
    if report.dropped_positives:
        click.echo(f"dropped {len(report.dropped_positives)} training positives inside areas reported as not mining: "
                   + ", ".join(report.dropped_positives[:5]) + (" ..." if len(report.dropped_positives) > 5 else ""))
    _echo_diff(report.diff)
    _refresh(run_dir)
    click.echo(f"diff: {Path(run_dir) / 'diff.geojson'}; back with 'amber-hunter rollback {run_dir} v{report.parent}'")


@click.command(cls=OneLineErrors)
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--model", required=True, help="Model bundle folder, or default/balanced/fast; its embedder must be the run's.")
def rescore(run_dir, model):
    """Rescore RUN_DIR with another model from its stored embeddings, and write the diff."""
    from ..run.rescore import rescore_run

    _echo_diff(rescore_run(run_dir, model))
    _refresh(run_dir)


@click.command(cls=OneLineErrors)
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("version")
def rollback(run_dir, version):
    """Make model VERSION (v1, v2, ...) of RUN_DIR current again, and rescore the run with it."""
    from ..errors import ConfigError
    from ..run.rescore import rollback as run_rollback

    number = version.lower().removeprefix("v")
    if not number.isdigit():
        raise ConfigError(f"version {version!r} is not like v2; see 'amber-hunter feedback list {run_dir}'")
    _echo_diff(run_rollback(run_dir, int(number)))
    _refresh(run_dir)


@click.command(cls=OneLineErrors)
@click.option("--model", default="default", show_default=True, help="Model bundle folder, or default/balanced/fast.")
@click.option("--pool", "pool_path", required=True, type=click.Path(exists=True, file_okay=False),
              help="A flat folder of unlabelled superpixel crops, or a scanned run directory.")
@click.option("-n", "n", type=click.IntRange(min=1), default=20, show_default=True, help="How many to suggest.")
@click.option("--strategy", type=click.Choice(["margin", "typical", "mix", "stratified", "random"]),
              default="stratified", show_default=True,
              help="How to pick; stratified was best in training/adaptation.py (README).")
@click.option("--out", type=click.Path(dir_okay=False),
              help="Write the picks as a labels CSV (path,label,source,note) with the label left empty.")
@click.option("--labels", "labels_store", type=click.Path(dir_okay=False),
              help="Label store whose labelled superpixels are left out (default: the one explore uses).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Embedding cache (default: user cache dir).")
@click.option("--seed", type=int, default=0, show_default=True)
def suggest(model, pool_path, n, strategy, out, labels_store, cache_dir, seed):
    """List the unlabelled superpixels most worth labelling next."""
    from ..feedback.pool import folder_pool, run_pool, write_picks
    from ..learn.labels import LabelStore
    from ..learn.suggest import suggest as pick
    from ..model.classify import load_bundle, resolve_model

    bundle = load_bundle(resolve_model(model))
    with LabelStore(Path(labels_store) if labels_store else default_label_store()) as labels:
        if (Path(pool_path) / "run.sqlite").is_file():
            pool = run_pool(pool_path, bundle, labels)
        else:
            pool = folder_pool(pool_path, bundle, labels, cache_dir)
    picks = pick(bundle, pool.features, n, strategy, seed=seed)
    for rank, s in enumerate(picks, start=1):
        click.echo(f"{rank:3d}. {pool.name(s.index)}  p={s.probability:.3f}  {s.reason}")
    if out:
        click.echo(f"wrote {write_picks(pool, picks, out)}: fill in the label column, then 'amber-hunter train "
                   f"... --labels {out}'")
