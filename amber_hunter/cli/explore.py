"""``amber-hunter explore`` and ``amber-hunter labels export|import``: option parsing and printing
over ``amber_hunter.explore`` and ``amber_hunter.learn.labels``, nothing more."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import Cli, OneLineErrors, _progress


def default_label_store() -> Path:
    """One label store for every label a person gives: ``$AMBER_HUNTER_LABELS`` or the user data folder."""
    import os

    env = os.environ.get("AMBER_HUNTER_LABELS")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("amber-hunter")) / "labels.sqlite"


@click.command(cls=OneLineErrors)
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--model", type=click.Path(), help="Model bundle, or default/balanced/fast (default: the run's model, or the "
              "bundled default model for dataset folders).")
@click.option("--labels", "labels_store", type=click.Path(dir_okay=False),
              help="Label store (SQLite) to read and write (default: one in the user data folder).")
@click.option("--projection", type=click.Choice(["umap", "pca", "tsne"]), default="umap", show_default=True)
@click.option("--clusters", "cluster_method", type=click.Choice(["kmeans", "hdbscan"]), default="kmeans",
              show_default=True, help="How the cluster list groups similar superpixels.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="Port; a busy one moves on to the next free port. 0: any free port.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--no-browser", is_flag=True, help="Do not open the page in a browser.")
@click.option("--static", "static_out", type=click.Path(dir_okay=False),
              help="Write a read-only, self-contained page here instead of serving.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Embedding cache (default: user cache dir).")
@click.option("--seed", type=int, default=0, show_default=True)
def explore(paths, model, labels_store, projection, cluster_method, port, host, no_browser, static_out, cache_dir, seed):
    """Explore DATA_DIR... (labelled crops) or RUN_DIR in an interactive scatterplot: look at the
    classifier's mistakes, and label superpixels."""
    from ..explore.data import load_points
    from ..explore.server import ExploreApp, make_server, url_of, write_static
    from ..learn.labels import LabelStore

    options = {"method": projection, "seed": seed, "cluster_method": cluster_method}
    is_run = len(paths) == 1 and (Path(paths[0]) / "run.sqlite").is_file()
    if not is_run:
        options.update(cache_dir=cache_dir, progress=_progress("embedding"))
    points = load_points(paths, model, **options)
    store_path = Path(labels_store) if labels_store else default_label_store()
    store = LabelStore(store_path)
    if static_out:
        write_static(points, static_out, store)
        click.echo(f"wrote {static_out}: {len(points)} points, read-only; open it in any browser")
        return
    server, note = make_server(ExploreApp(points, store), host, port)
    url = url_of(server)
    if note:
        click.echo(note)
    click.echo(f"explore {points.title} at {url} (labels in {store_path}); Ctrl-C stops")
    if not no_browser:
        import webbrowser

        webbrowser.open(url)
    _stop_on_ctrl_c_and_term()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        store.close()
    click.echo("stopped", err=True)


def _stop_on_ctrl_c_and_term() -> None:
    """Make Ctrl-C and SIGTERM stop the server, whatever the disposition we inherited.

    A process started in the background by a non-interactive shell, or by a parent that ignores
    SIGINT, inherits SIGINT as *ignored*, and Python then never installs its KeyboardInterrupt
    handler: the server would ignore Ctrl-C for ever. Both signals raise KeyboardInterrupt in the
    main thread, which leaves ``serve_forever`` and closes the label store."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


@click.group(cls=Cli)
def labels():
    """The label store: export its labels as a train --labels CSV, or import one."""


@labels.command("export")
@click.argument("store", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="CSV to write (path,label,source,note).")
@click.option("--crops", "crops_dir", type=click.Path(file_okay=False),
              help="Also cut every labelled run superpixel from the run's tiles into this folder, as a crop "
                   "named the study's way, and list it in the CSV.")
def labels_export(store, out, crops_dir):
    """Write the latest label of every dataset crop (and, with --crops, every run superpixel) as
    the CSV that 'train --labels' reads."""
    from ..errors import LabelsError
    from ..learn.labels import LabelStore

    if not Path(store).is_file():
        raise LabelsError(f"label store {store} does not exist; label something with 'amber-hunter explore' first")
    with LabelStore(store) as s:
        cut = []
        if crops_dir:
            from ..explore.crops import export_superpixel_crops

            exported = export_superpixel_crops(s, crops_dir, Path(out).resolve().parent)
            cut = [(c.path, c.label, c.source, c.note) for c in exported.crops]
            for key, reason in exported.skipped:
                click.echo(f"skipped {key}: {reason}", err=True)
            click.echo(f"cut {len(cut)} run superpixels into {crops_dir}")
        n, left_out = s.export_csv(out, cut)
    extra = (f"; {left_out} labels on run superpixels left out (no crop file{'' if crops_dir else '; add --crops DIR'})"
             if left_out else "")
    click.echo(f"wrote {out}: {n} labels{extra}")


@labels.command("import")
@click.argument("store", type=click.Path(dir_okay=False))
@click.argument("csv_file", type=click.Path(dir_okay=False))
@click.option("--root", type=click.Path(file_okay=False),
              help="Dataset folder the crops' paths are kept relative to (default: the CSV's folder).")
def labels_import(store, csv_file, root):
    """Add the labels of a path,label,source,note CSV to the store (all rows or none)."""
    from ..learn.labels import LabelStore

    with LabelStore(store) as s:
        n = s.import_csv(csv_file, root=root)
    click.echo(f"imported {n} label{'s' if n != 1 else ''} into {store}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(explore())
