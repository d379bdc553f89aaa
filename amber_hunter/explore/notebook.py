"""The explore scatterplot inline in Jupyter: the same projection and colouring, read-only.

    from amber_hunter.explore.notebook import scatter
    from bokeh.io import output_notebook, show
    output_notebook()
    show(scatter(["../shared/datasets/texty-amber"], model="fast"))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def scatter(paths: Sequence[str | Path] | None = None, model=None, *, points=None, colour: str | None = None,
            **options):
    """A Bokeh figure of a labelled dataset (coloured by out-of-fold confusion cell) or a run
    (by probability), with the thumbnails inlined in the hover tooltip. Give ``paths`` (and
    ``model``, ``method=``, ``cache_dir=``…) or already loaded ``points``."""
    from .data import load_points
    from .page import build_figure, columns, data_uri

    if points is None:
        points = load_points(list(paths), model, **options)
    labels, origins = points.current_labels(None)
    thumbs = [data_uri(points.thumbnail(i, 80, "JPEG"), "image/jpeg") for i in range(len(points))]
    data = columns(points, labels, origins, thumbs)
    mode = colour or ("cell" if points.kind == "dataset" else "prob")
    data["color"] = data[f"c_{mode}"]
    fig = build_figure(points, data)
    fig.title.text += f" · colour: {mode}"
    return fig
