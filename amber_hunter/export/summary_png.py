"""``summary.png``: a one-page map for an article: the area, what was scanned, where the gaps are,
the flagged scenes, and the totals with both area figures.

Drawn with matplotlib (Agg, no display) in lon/lat with the aspect of the area's latitude, so the
shapes are not stretched; no base map, so it needs no network and carries no third-party tiles.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from .. import atomic
from .detections import RunDetections
from .summary import ExportSummary

#: Colours shared with the web map's legend.
COLOURS = {"area": "#3388ff", "flagged": "#e00000", "failed": "#7b3294", "no-imagery": "#9e9e9e",
           "skipped": "#bdbdbd", "licensed": "#1a9850"}


def _rings(geometry_coordinates: list) -> list:
    return [ring for polygon in geometry_coordinates for ring in polygon]


def write_summary_png(run: RunDetections, summary: ExportSummary, path: Path, *, dpi: int = 150) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    fig = Figure(figsize=(8.27, 11.0))  # A4 portrait
    ax = fig.add_axes((0.08, 0.30, 0.86, 0.62))
    b = run.area.bounds
    polygons = run.area.polygon_coordinates()
    rings = _rings(polygons) or [[[b.west, b.south], [b.east, b.south], [b.east, b.north], [b.west, b.north],
                                  [b.west, b.south]]]
    for ring in rings:
        xs, ys = zip(*ring)
        ax.plot(xs, ys, color=COLOURS["area"], lw=1.2, ls="--")
    if run.registry is not None:
        for ring in _rings(run.registry.area.polygon_coordinates()):
            xs, ys = zip(*ring)
            ax.fill(xs, ys, facecolor=COLOURS["licensed"], alpha=0.15, edgecolor=COLOURS["licensed"], lw=0.8)
    for gap in run.gaps:
        g = gap.bounds
        ax.add_patch(Rectangle((g.west, g.south), g.east - g.west, g.north - g.south, facecolor=COLOURS[gap.status],
                               alpha=0.5, edgecolor="none"))
    for s in run.scenes:
        g = s.bounds
        ax.add_patch(Rectangle((g.west, g.south), g.east - g.west, g.north - g.south, facecolor=COLOURS["flagged"],
                               alpha=0.35, edgecolor=COLOURS["flagged"], lw=0.8))
    pad_x, pad_y = (b.east - b.west) * 0.05 or 1e-3, (b.north - b.south) * 0.05 or 1e-3
    ax.set_xlim(b.west - pad_x, b.east + pad_x)
    ax.set_ylim(b.south - pad_y, b.north + pad_y)
    ax.set_aspect(1 / math.cos(math.radians((b.south + b.north) / 2)))
    ax.set_xlabel("longitude (°E)")
    ax.set_ylabel("latitude (°N)")
    ax.ticklabel_format(useOffset=False)
    ax.tick_params(labelsize=7)
    handles = [Patch(facecolor="none", edgecolor=COLOURS["area"], ls="--", label="area of interest"),
               Patch(facecolor=COLOURS["flagged"], alpha=0.5, label="scene flagged as mining"),
               Patch(facecolor=COLOURS["failed"], alpha=0.5, label="failed (not analysed)"),
               Patch(facecolor=COLOURS["no-imagery"], alpha=0.5, label="no imagery")]
    if run.registry is not None:
        handles.append(Patch(facecolor=COLOURS["licensed"], alpha=0.3, label="licensed area"))
    ax.legend(handles=handles, loc="upper left", fontsize=7, framealpha=0.9)
    date = f", started {run.started.isoformat()}" if run.started else ""
    fig.text(0.08, 0.955, f"Suspected surface mining: {run.name}", fontsize=15, weight="bold")
    fig.text(0.08, 0.935, f"amber-hunter scan{date}", fontsize=9, color="#555")
    years = ", ".join(summary.years) or "none"
    lines = [
        (f"Scenes scanned: {summary.scenes_scanned:,}   flagged: {summary.scenes_flagged:,}   "
         f"failed: {summary.scenes_failed:,}   no imagery: {summary.scenes_no_imagery:,}"),
        f"Area of positive superpixels (upper bound): {summary.positive_superpixel_ha:,.1f} ha",
        (f"Estimated disturbed ground inside them: {summary.disturbed_ha:,.1f} ha "
         f"({summary.scenes_estimated} of {summary.scenes_flagged} scenes measured)"),
        f"Capture years: {years}",
    ]
    for year in summary.years:
        lines.append(f"   {year}: {summary.positive_superpixel_ha_by_year[year]:,.1f} ha upper bound, "
                     f"{summary.disturbed_ha_by_year.get(year, 0.0):,.1f} ha estimated")
    if summary.positive_superpixel_ha_unlicensed is not None:
        lines.append(f"Outside licensed areas: {summary.positive_superpixel_ha_unlicensed:,.1f} ha upper bound, "
                     f"{summary.disturbed_ha_unlicensed:,.1f} ha estimated")
    lines.append("A flagged scene is a suspicion to check on the ground, not a survey.")
    fig.text(0.08, 0.24, "\n".join(lines[:14]), fontsize=9, va="top", linespacing=1.6)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic.write_bytes(path, buf.getvalue())
