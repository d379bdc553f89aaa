"""The ``amber-hunter`` command: option parsing and printing over the library API, nothing more.

Every :class:`AmberHunterError` becomes one line on stderr and exit code 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from .. import __version__
from ..errors import AmberHunterError
from .progress import Progress, progress_every_option

EMBEDDER_HELP = "texture, vgg16, resnet50, efflite0, or parts joined with '+' (e.g. vgg16+efflite0+texture)"
#: The embedder of the bundled default model: what ``train`` trains and ``evaluate`` measures
#: unless told otherwise, so that both speak of the model a user gets.
DEFAULT_EMBEDDER = "vgg16+efflite0+texture"
#: The bundled default model's operating point (its model.json says so, and so does
#: ``model.classify.TARGET_PRECISION``; a test checks all three agree). Written out rather than
#: imported, because ``--help`` must not load scikit-image.
TARGET_PRECISION = 0.90
#: Scene rule help, shared by ``detect`` and ``scan``: the rule is "more than N", not "at least N".
MIN_POSITIVE_HELP = "Flag a scene when more than N superpixels are positive (2: flag at 3 or more)."


class _OneLine:
    """Reports user errors as one line and exit code 2 instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AmberHunterError as exc:
            click.echo(f"amber-hunter: error: {exc}", err=True)
            ctx.exit(2)


class Cli(_OneLine, click.Group):
    """The ``amber-hunter`` group: every subcommand's user errors become one line."""


class OneLineErrors(_OneLine, click.Command):
    """A command that reports user errors as one line also when run on its own (tests)."""


def _progress(desc: str):
    """A tqdm wrapper on stderr (items/s and ETA), for long embedding loops; no bar for no items."""

    def wrap(items):
        from tqdm import tqdm

        return tqdm(items, desc=desc, unit="img", file=sys.stderr, disable=None if items else True)

    return wrap


def _embedder(name: str, resnet_weights: str):
    """Build ``name`` with ``--resnet-weights`` applied to its resnet50 part, if it has one."""
    from ..model.embed import get_embedder

    resnet = {"weights": resnet_weights}
    if "+" in name:  # a combined embedder takes options keyed by part name, and ignores the others
        return get_embedder(name, resnet50=resnet)
    return get_embedder(name, **(resnet if name == "resnet50" else {}))


def _write_outputs(files: dict) -> None:
    """Write output files (path -> bytes) only once all of them are ready and their paths usable,
    so a bad second path never leaves the first output alone; each write is atomic."""
    from .. import atomic
    from ..errors import ConfigError

    files = {Path(p): data for p, data in files.items() if p}
    for path in files:
        if path.is_dir():
            raise ConfigError(f"output path {path} is a directory; give a file name")
    for path, data in files.items():
        try:
            atomic.write_bytes(path, data)
        except OSError as exc:
            raise ConfigError(f"cannot write {path}: {exc.strerror or exc}; choose another output path") from None


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


common_data = [
    click.option(
        "--labels", "labels_csv", type=click.Path(), help="CSV path,label,source,note that adds or overrides labels."
    ),
    click.option("--cache-dir", type=click.Path(file_okay=False), help="Embedding cache (default: user cache dir)."),
    click.option(
        "--resnet-weights", default="imagenet", show_default=True, help="imagenet | PATH | random (tests only)."
    ),
    click.option(
        "--target-precision",
        type=click.FloatRange(0.0, 1.0),
        default=TARGET_PRECISION,
        show_default=True,
        help="Pick the threshold that reaches this out-of-fold precision (the default is the bundled model's).",
    ),
    click.option("--seed", type=int, default=0, show_default=True),
]


def data_options(f):
    for option in reversed(common_data):
        f = option(f)
    return f


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="amber-hunter")
@click.option("-v", "--verbose", is_flag=True, envvar="AMBER_HUNTER_VERBOSE",
              help="Also show TensorFlow's, CUDA's and absl's own log lines (hidden by default).")
def main(verbose):
    """Find illegal surface mining (amber pits, sand and gold diggings) in map imagery."""
    if verbose:  # read where TensorFlow is imported (model.embed.cnn), which --help must not load
        os.environ["AMBER_HUNTER_VERBOSE"] = "1"


@main.command()
@click.argument("data_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--embedder", default=DEFAULT_EMBEDDER, show_default=True, help=EMBEDDER_HELP)
@click.option("--out", required=True, type=click.Path(), help="Model bundle directory to write.")
@data_options
@progress_every_option
def train(data_dirs, embedder, out, labels_csv, cache_dir, resnet_weights, target_precision, seed, progress_every):
    """Train a classifier on folders holding positive/ and negative/ crops."""
    from ..learn.workflows import train_model

    with Progress("train", progress_every, "reading the crops") as progress:
        bundle = train_model(
            data_dirs,
            _embedder(embedder, resnet_weights),
            out,
            labels_csv=labels_csv,
            target_precision=target_precision,
            cache_dir=cache_dir,
            seed=seed,
            progress=progress.items("embedding", "crop", then="fitting the classifier and choosing its threshold"),
        )
    m = bundle.metadata
    click.echo(
        f"wrote {out}: {m.embedder}, {m.training['n_samples']} crops, threshold {m.threshold:.3f} "
        f"(out-of-fold precision {m.metrics['oof_precision']:.3f}, recall {m.metrics['oof_recall']:.3f})"
    )


@main.command()
@click.argument("data_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--embedder", default=DEFAULT_EMBEDDER, show_default=True,
              help=EMBEDDER_HELP + "; cross-validated (not with --model).")
@click.option("--model", type=click.Path(), help="Score this bundle on DATA_DIR instead of cross-validating.")
@click.option(
    "--protocol", type=click.Choice(["seed-split", "grouped", "spatial"]), default="grouped", show_default=True
)
@click.option("--folds", type=click.IntRange(2, 50), default=5, show_default=True)
@click.option(
    "--axis", type=click.Choice(["lon", "lat"]), default="lon", show_default=True, help="Spatial bands along."
)
@click.option("--json", "json_out", type=click.Path(), help="Write the metrics here.")
@click.option("--plot", type=click.Path(), help="PR-curve PNG (default: next to --json).")
@data_options
@progress_every_option
def evaluate(
    data_dirs,
    embedder,
    model,
    protocol,
    folds,
    axis,
    json_out,
    plot,
    labels_csv,
    cache_dir,
    resnet_weights,
    target_precision,
    seed,
    progress_every,
):
    """Measure a detector: cross-validate an embedder, or score a trained --model."""
    from ..errors import ConfigError
    from ..learn.workflows import evaluate_model, evaluate_protocol

    plot = plot or (str(Path(json_out).with_suffix(".pr.png")) if json_out else None)
    named = click.get_current_context().get_parameter_source("embedder") is not ParameterSource.DEFAULT
    if model and (named or len(data_dirs) != 1):
        raise ConfigError("with --model give exactly one DATA_DIR and no --embedder (the model names its own)")
    with Progress("evaluate", progress_every, "reading the crops") as progress:
        if model:
            embedding = progress.items("embedding", "crop", then="scoring")
            report = evaluate_model(
                data_dirs[0], model, labels_csv=labels_csv, cache_dir=cache_dir, progress=embedding, plot=plot
            )
        else:
            report = evaluate_protocol(
                data_dirs,
                _embedder(embedder, resnet_weights),
                protocol,
                folds=folds,
                axis=axis,
                labels_csv=labels_csv,
                target_precision=target_precision,
                cache_dir=cache_dir,
                seed=seed,
                progress=progress.items("embedding", "crop", then=f"cross-validating ({protocol}, {folds} folds)"),
                plot=plot,
            )
    d = report.to_json()
    _write_outputs({json_out: _json_bytes(d)})
    click.echo(
        f"{d['protocol']}{' (' + d['axis'] + ')' if d['axis'] else ''} {d['embedder']}: "
        f"precision {d['precision']:.3f} recall {d['recall']:.3f} F1 {d['f1']:.3f} F2 {d['f2']:.3f} "
        f"ROC AUC {d['roc_auc']:.3f} PR AUC {d['pr_auc']:.3f} confusion {d['confusion']}"
    )
    if plot:
        click.echo(f"PR curve: {plot}")


@main.command()
@click.argument("scene", type=click.Path())
@click.option("--model", type=click.Path(), help="Model bundle (default: the bundled model).")
@click.option("--min-positive", type=click.IntRange(0), default=2, show_default=True, metavar="N",
              help=MIN_POSITIVE_HELP)
@click.option("--json", "json_out", type=click.Path(), help="Write the result here.")
@click.option("--overlay", type=click.Path(), help="PNG with superpixels outlined and positives filled.")
@click.option("--m-per-px", type=float, default=None, help="Ground resolution, to report areas in m².")
@click.option("--allow-random", is_flag=True, help="Accept a model trained on random-weight features (tests).")
def detect(scene, model, min_positive, json_out, overlay, m_per_px, allow_random):
    """Classify the superpixels of one scene image and flag it as mining or not."""
    from dataclasses import asdict

    from ..images import encode_png, read_rgb
    from ..model.detect import Detector
    from ..model.detect import overlay as draw_overlay

    image = read_rgb(scene)
    detector = Detector.load(model, min_positive=min_positive, allow_random=allow_random)
    result, seg = detector.detect(image, m_per_px)
    _write_outputs(
        {
            json_out: _json_bytes({"scene": str(scene), **asdict(result)}),
            overlay: encode_png(draw_overlay(image, seg, result)) if overlay else None,
        }
    )
    click.echo(
        f"{scene}: {'FLAGGED' if result.flagged else 'clean'} — {result.n_positive} of "
        f"{result.n_superpixels} superpixels positive "
        f"(threshold {result.threshold:.3f}, max p {result.max_probability:.3f})"
    )


@main.group()
def data():
    """Download the datasets that training, the notebooks and the demo use."""


@data.command("fetch")
@click.argument("name", type=click.Choice(["texty"]))
@click.option(
    "--dest",
    type=click.Path(file_okay=False),
    help="Folder to download into (default: the user data folder, searched last).",
)
@click.option("--base-url", default=None, help="A mirror of texty/amber-methodology's model/datasets folder.")
def data_fetch(name, dest, base_url):
    """Download the labelled crops and example scenes, checked by sha256; run again to resume."""
    from ..learn.download import DEFAULT_BASE_URL, fetch_texty

    path = fetch_texty(dest, base_url or DEFAULT_BASE_URL)
    hint = "" if dest is None else f"; set AMBER_HUNTER_DATA={path} (or pass the path) so amber-hunter finds it"
    click.echo(f"texty-amber dataset in {path}{hint}")


from .explore import explore, labels
from .feedback import feedback, rescore, retrain, rollback, suggest
from .scan import export, scan, status

for _command in (scan, status, export, explore, labels, feedback, retrain, rescore, rollback, suggest):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
