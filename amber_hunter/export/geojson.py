"""``detections.geojson``: flagged scenes and their positive superpixels, for GIS and newsrooms."""

from __future__ import annotations

from ..geo.tiles import Bounds
from .detections import RunDetections, SceneDetection


def rectangle(b: Bounds) -> dict:
    """A lon/lat rectangle as a GeoJSON Polygon, counter-clockwise."""
    ring = [[b.west, b.south], [b.east, b.south], [b.east, b.north], [b.west, b.north], [b.west, b.south]]
    return {"type": "Polygon", "coordinates": [ring]}


def scene_features(scene: SceneDetection) -> list[dict]:
    """A flagged scene's rectangle, then its positive superpixels.

    A scene feature names its areas apart, ``scene_area_m2`` (the footprint), ``positive_area_m2``
    (its positive superpixels, the upper bound) and ``disturbed_m2`` (the pixel estimate), and
    has no ``area_m2``: only superpixel features do, so a GIS user who sums ``area_m2`` over the
    layer counts the positive area once (and summing ``disturbed_m2`` over superpixels, the
    estimate once).
    """
    date = scene.capture_date.isoformat() if scene.capture_date else None
    common = {"scene_id": scene.scene_id, "capture_date": date}
    head = {**common, "kind": "scene", "probability": scene.max_probability, "scene_area_m2": scene.scene_area_m2,
            "positive_area_m2": scene.positive_area_m2, "disturbed_area_m2": scene.disturbed_m2,
            "valid_fraction": scene.valid_fraction, "n_positive": scene.n_positive}
    if scene.licence_status is not None:
        head["licensed"] = scene.licence_status == "licensed"
        head["licence_status"] = scene.licence_status
        head["unlicensed_area_m2"] = scene.unlicensed_m2
    features = [{"type": "Feature", "geometry": rectangle(scene.bounds), "properties": head}]
    for s in scene.superpixels:
        properties = {**common, "kind": "superpixel", "label": s.label, "probability": s.probability,
                      "area_m2": s.area_m2, "disturbed_m2": s.disturbed_m2}
        if s.licensed is not None:
            properties["licensed"] = s.licensed
        features.append({"type": "Feature", "geometry": s.polygon, "properties": properties})
    return features


def feature_collection(run: RunDetections) -> dict:
    return {"type": "FeatureCollection", "features": [f for s in run.scenes for f in scene_features(s)]}
