"""``summary.json``: the run's totals, with the two area figures named for what they are."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from .detections import M2_PER_HA, RunDetections


@dataclass(frozen=True)
class ExportSummary:
    """The contents of ``summary.json``; the ``unlicensed`` counts are set only with a registry.

    ``positive_superpixel_ha`` is the whole area of the positive superpixels of flagged scenes:
    an upper bound on the damage, and the figure the study reported. ``disturbed_ha`` is the
    pixel-level estimate of the disturbed ground inside them (bare sand, pits and the ground
    between), over the ``scenes_estimated`` flagged scenes whose imagery could be read at export.
    Both are keyed by capture year in ``*_by_year`` (``"unknown"`` where the source gave no date).
    ``scenes_partial`` counts scanned scenes with some nodata (their hectares count valid pixels
    only); ``scenes_dropped`` counts scenes of an earlier grid that a forced change left out.
    """

    scenes_scanned: int
    scenes_flagged: int
    positive_superpixel_ha: float
    positive_superpixel_ha_by_year: dict
    disturbed_ha: float
    disturbed_ha_by_year: dict
    scenes_estimated: int
    scenes_failed: int
    scenes_no_imagery: int
    scenes_skipped: int
    scenes_pending: int
    scenes_partial: int = 0
    scenes_dropped: int = 0
    scenes_unlicensed: int | None = None
    scenes_partly_licensed: int | None = None
    superpixels_unlicensed: int | None = None
    positive_superpixel_ha_unlicensed: float | None = None
    disturbed_ha_unlicensed: float | None = None

    @property
    def damaged_ha(self) -> float:
        """The upper bound, under the name earlier versions used."""
        return self.positive_superpixel_ha

    @property
    def years(self) -> list[str]:
        return sorted(self.positive_superpixel_ha_by_year)


def summarise(run: RunDetections) -> ExportSummary:
    upper: dict[str, float] = defaultdict(float)
    disturbed: dict[str, float] = defaultdict(float)
    for s in run.scenes:
        upper[s.year] += s.positive_area_m2 / M2_PER_HA
        if s.disturbed_m2 is not None:
            disturbed[s.year] += s.disturbed_m2 / M2_PER_HA
    unlicensed = {}
    if run.registry is not None:
        outside = [p for s in run.scenes for p in s.superpixels if not p.licensed]
        unlicensed = {
            "scenes_unlicensed": sum(s.licence_status == "unlicensed" for s in run.scenes),
            "scenes_partly_licensed": sum(s.licence_status == "partly licensed" for s in run.scenes),
            "superpixels_unlicensed": len(outside),
            "positive_superpixel_ha_unlicensed": round(sum(p.area_m2 for p in outside) / M2_PER_HA, 4),
            "disturbed_ha_unlicensed": round(sum(p.disturbed_m2 or 0.0 for p in outside) / M2_PER_HA, 4),
        }
    status = run.status
    return ExportSummary(
        scenes_scanned=status.done,
        scenes_flagged=len(run.scenes),
        positive_superpixel_ha=round(sum(upper.values()), 4),
        positive_superpixel_ha_by_year={y: round(v, 4) for y, v in sorted(upper.items())},
        disturbed_ha=round(sum(disturbed.values()), 4),
        disturbed_ha_by_year={y: round(v, 4) for y, v in sorted(disturbed.items())},
        scenes_estimated=sum(s.disturbed_m2 is not None for s in run.scenes),
        scenes_failed=status.failed,
        scenes_no_imagery=status.no_imagery,
        scenes_skipped=status.skipped,
        scenes_pending=status.pending,
        scenes_partial=status.partial,
        scenes_dropped=status.dropped,
        **unlicensed,
    )
