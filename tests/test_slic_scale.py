"""SLIC on a shrunk scene (``SlicParams.scale``): full-size labels, the study's result at scale 1,
nodata kept out, and clear errors for a bad factor."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage.segmentation import slic

from amber_hunter.errors import ConfigError, ImageError
from amber_hunter.images import read_rgb
from amber_hunter.model.classify import BUNDLED_MODELS, load_bundle, resolve_model
from amber_hunter.model.segment import SlicParams, segment


def study_slic(image: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """SLIC called as the study (and bundles without a scale) call it, at full size."""
    return slic(
        image.astype(np.float32) / np.float32(255.0),
        n_segments=30,
        compactness=35.0,
        sigma=sigma,
        start_label=1,
        channel_axis=-1,
    ).astype(np.int32)


def test_scale_one_is_the_default_and_the_study_segmentation(positive_crop):
    image = read_rgb(positive_crop)
    assert SlicParams().scale == 1
    np.testing.assert_array_equal(segment(image).labels, study_slic(image))


@pytest.mark.parametrize("name", BUNDLED_MODELS)
def test_bundled_models_segment_at_their_measured_scale(name):
    """The CNN models ship SLIC at 1/2, the texture-only one at 1/3, where SLIC would otherwise be
    a quarter of its time (training/results/slic_scale.md: flags kept at both)."""
    expected = {"default": 2, "balanced": 2, "fast": 3}
    assert load_bundle(resolve_model(name)).slic_params().scale == expected[name]


def test_a_model_json_without_scale_segments_at_full_size(tmp_path):
    """model.json files written before ``scale`` existed keep segmenting as they were trained."""
    import json
    import shutil

    folder = shutil.copytree(resolve_model("fast"), tmp_path / "old")
    meta = json.loads((folder / "model.json").read_text())
    del meta["slic"]["scale"]
    (folder / "model.json").write_text(json.dumps(meta))
    assert load_bundle(folder).slic_params().scale == 1


@pytest.mark.parametrize("scale", [2, 3])
def test_scaled_labels_are_slic_of_the_box_average_brought_back_by_nearest(positive_crop, scale):
    image = read_rgb(positive_crop)[:101, :130]  # sizes that are no multiple of the factor
    seg = segment(image, SlicParams(scale=scale))
    small = np.asarray(Image.fromarray(image).reduce(scale))
    expected = study_slic(small, sigma=1.0 / scale)
    assert seg.labels.shape == image.shape[:2]
    np.testing.assert_array_equal(seg.labels, expected.repeat(scale, 0).repeat(scale, 1)[:101, :130])
    assert [r.label for r in seg.regions] == sorted(np.unique(seg.labels).tolist())
    for region in seg.regions:
        r0, c0, r1, c1 = region.bbox
        np.testing.assert_array_equal(region.mask, seg.labels[r0:r1, c0:c1] == region.label)
        assert region.area_px == int((seg.labels == region.label).sum())


def test_scaled_superpixels_stay_close_to_full_size_on_a_real_scene(scene_path):
    """The agreement measured in training/results/slic_scale.md (ARI 0.98 at 1/2 on this scene)."""
    from sklearn.metrics import adjusted_rand_score

    image = read_rgb(scene_path)
    full = segment(image).labels
    half = segment(image, SlicParams(scale=2)).labels
    assert adjusted_rand_score(full.ravel(), half.ravel()) > 0.95
    assert abs(len(np.unique(half)) - len(np.unique(full))) <= 2


@pytest.mark.parametrize("scale", [2, 4])
def test_flat_quadrants_on_block_edges_are_exact(make_fixtures, scale):
    image, quadrant = make_fixtures.quadrants(48, 80)  # edges at rows 24 and cols 40: whole blocks
    seg = segment(image, SlicParams(n_segments=4, sigma=0.0, scale=scale))
    assert len(seg.regions) == 4
    for region in seg.regions:
        inside = quadrant[seg.labels == region.label]
        np.testing.assert_array_equal(seg.labels == region.label, quadrant == inside[0])


def test_nodata_gets_no_label_and_every_valid_pixel_gets_one(positive_crop):
    image = read_rgb(positive_crop)[:100, :95]
    valid = np.ones(image.shape[:2], bool)
    valid[:, 61:] = False  # column 61 splits a 3-px block: that block holds imagery and nodata
    seg = segment(image, SlicParams(n_segments=12, scale=3), valid)
    assert (seg.labels[~valid] == 0).all()
    assert (seg.labels[valid] > 0).all()
    assert sum(r.area_px for r in seg.regions) == int(valid.sum())


def test_scaled_segmentation_is_deterministic(scene_path):
    """Re-segmenting a stored scene (run/resegment.py) must give the scan's superpixels back."""
    image = read_rgb(scene_path)
    params = SlicParams(scale=3)
    np.testing.assert_array_equal(segment(image, params).labels, segment(image, params).labels)


@pytest.mark.parametrize("scale", [0, -2, 1.5, True, "2"])
def test_bad_scale_is_a_config_error(scale):
    with pytest.raises(ConfigError, match=f"SLIC scale {scale!r}"):
        SlicParams(scale=scale)


def test_image_too_small_at_the_scale_names_the_scale():
    image = np.zeros((12, 12, 3), np.uint8)
    segment(image, SlicParams(n_segments=30))  # 144 px hold 30 superpixels at full size
    with pytest.raises(ImageError, match=r"scale 1/4 \(3x3 px\) is too small"):
        segment(image, SlicParams(n_segments=30, scale=4))


def test_a_scan_at_a_scale_re_segments_to_its_own_superpixels(region, tiny_model, tmp_path):
    """Explore, feedback and rescore find a stored superpixel again by re-segmenting its scene with
    the run's model: with a scale in that model, they must get the scan's superpixels back, not the
    full-size ones."""
    import json
    import shutil

    from amber_hunter.run.resegment import resegment
    from amber_hunter.run.scan import scan
    from amber_hunter.run.store import RunStore

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    meta = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**meta, "slic": {**meta["slic"], "scale": 2}}))
    scan(region.config(region.folder, model), tmp_path / "run")
    with RunStore(tmp_path / "run") as store:
        slic = load_bundle(store.config.model).slic_params()
        assert slic.scale == 2
        done = [s.scene_id for s in store.scenes() if s.status == "done"]
        assert done
        for scene_id in done:
            stored = {r.label: r.area_m2 for r in store.regions(scene_id)}
            again = {label: r.area_px for label, r in resegment(store, scene_id, slic).regions.items()}
            full = {label: r.area_px for label, r in resegment(store, scene_id, SlicParams()).regions.items()}
            assert again.keys() == stored.keys()
            per_px = np.array([stored[label] / again[label] for label in stored])
            np.testing.assert_allclose(per_px, per_px[0], rtol=1e-5)  # the same pixels, label by label
            assert full != again, "the full-size segmentation would have matched too: the test proves nothing"
