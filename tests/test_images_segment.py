"""Reading images into uint8 RGB, and SLIC segmentation on images with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from amber_hunter.errors import AmberHunterError, ImageError
from amber_hunter.images import decode_rgb, encode_png, read_rgb, to_rgb8, write_png
from amber_hunter.model import segment as segment_module
from amber_hunter.model.segment import (
    Region,
    SlicParams,
    regions_of,
    resize_nearest,
    segment,
    whole_image_region,
)

CONVERTED = [
    "grey.png",
    "grey_alpha.png",
    "rgba.png",
    "palette.png",
    "grey16.png",
    "rgb16.png",
    "quadrants.png",
    "tiny4x4.png",
]


# --- the fixtures themselves --------------------------------------------------------------------


def test_committed_fixtures_match_their_seeded_script(make_fixtures, tmp_path, fixture_file):
    """``make_fixtures.py`` regenerates the committed files (pixel for pixel), and they stay tiny."""
    written = make_fixtures.main(tmp_path)
    total = 0
    for fresh in written:
        committed = fixture_file(fresh.name)
        total += committed.stat().st_size
        if fresh.name == "not_an_image.png":
            assert committed.read_bytes() == fresh.read_bytes()
        else:
            np.testing.assert_array_equal(read_rgb(committed), read_rgb(fresh), err_msg=fresh.name)
    assert total < 8_000, f"fixtures must stay a few KB, they are {total} bytes"


# --- read_rgb: every odd format becomes uint8 (H, W, 3) -----------------------------------------


@pytest.mark.parametrize("name", CONVERTED)
def test_read_rgb_converts_to_uint8_rgb(name, fixture_file, expected_pixels):
    image = read_rgb(fixture_file(name))
    assert image.dtype == np.uint8
    assert image.ndim == 3 and image.shape[2] == 3
    assert image.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(image, expected_pixels[name])


def test_read_rgb_of_real_crop(positive_crop):
    image = read_rgb(positive_crop)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert min(image.shape[:2]) >= 50
    assert image.std() > 1  # real imagery, not a blank


def test_truncated_real_png_is_an_image_error(positive_crop, tmp_path):
    data = positive_crop.read_bytes()
    bad = tmp_path / "truncated.png"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as info:
        read_rgb(bad)
    message = str(info.value)
    assert str(bad) in message and "\n" not in message


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda d: d / "missing.png", "no such file"),
        (lambda d: d, "is a directory"),
        (lambda d: (d / "text.png").write_text("hello, not an image\n") and d / "text.png", "not a readable image"),
        (lambda d: (d / "empty.png").write_bytes(b"") or d / "empty.png", "not a readable image"),
    ],
    ids=["missing", "directory", "text", "empty"],
)
def test_unreadable_files_are_one_line_image_errors(make, fragment, tmp_path):
    path = make(tmp_path)
    with pytest.raises(ImageError) as info:
        read_rgb(path)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, AmberHunterError)


def test_committed_non_image_is_rejected(fixture_file):
    with pytest.raises(ImageError, match="not a readable image"):
        read_rgb(fixture_file("not_an_image.png"))


def test_decode_truncated_synthetic_png():
    data = encode_png(np.full((40, 40, 3), 7, np.uint8) + np.arange(40, dtype=np.uint8)[:, None, None])
    with pytest.raises(ImageError):
        decode_rgb(data[: len(data) // 2], name="half")


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.array([[0, 255]], np.uint8), np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8)),
        (np.array([[[10, 20, 30, 40]]], np.uint8), np.array([[[10, 20, 30]]], np.uint8)),
        (np.array([[[0, 1, 65535]]], np.uint16), np.array([[[0, 0, 255]]], np.uint8)),
        (np.array([[0.0, 0.5, 1.0]], np.float32), np.array([[[0] * 3, [127] * 3, [255] * 3]], np.uint8)),
        (np.array([[True, False]]), np.array([[[255] * 3, [0] * 3]], np.uint8)),
        (np.array([[[9], [200]]], np.uint8), np.array([[[9] * 3, [200] * 3]], np.uint8)),
    ],
    ids=["grey", "rgba", "uint16", "float01", "bool", "grey1"],
)
def test_to_rgb8(array, expected):
    out = to_rgb8(array)
    assert out.dtype == np.uint8 and out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    "array",
    [np.zeros((2, 2, 5), np.uint8), np.zeros((2,), np.uint8), np.zeros((2, 2, 3), np.int64)],
    ids=["5ch", "1d", "int64"],
)
def test_to_rgb8_rejects_non_images(array):
    with pytest.raises(ImageError):
        to_rgb8(array)


def test_write_png_round_trip_leaves_no_temp_files(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    path = tmp_path / "sub" / "out.png"
    write_png(path, image)
    np.testing.assert_array_equal(read_rgb(path), image)
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.png"]


# --- SLIC with a known answer -------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 64), (100, 100), (48, 80)])
def test_slic_on_flat_quadrants_without_blur_is_exact(make_fixtures, shape):
    image, quadrant = make_fixtures.quadrants(*shape)
    seg = segment(image, SlicParams(n_segments=4, sigma=0.0))
    assert len(seg.regions) == 4
    covered = []
    for region in seg.regions:
        inside = quadrant[seg.labels == region.label]
        assert len(np.unique(inside)) == 1, f"region {region.label} spans quadrants {np.unique(inside)}"
        covered.append(int(inside[0]))
        np.testing.assert_array_equal(seg.labels == region.label, quadrant == inside[0])
    assert sorted(covered) == [0, 1, 2, 3]


def test_slic_on_committed_quadrants_with_study_blur(fixture_file, make_fixtures):
    """With the study's sigma=1 the four regions are still the quadrants; only the few blurred
    pixels where all four colours meet may go to a neighbour."""
    image = read_rgb(fixture_file("quadrants.png"))
    _, quadrant = make_fixtures.quadrants(*image.shape[:2])
    seg = segment(image, SlicParams(n_segments=4))
    assert len(seg.regions) == 4
    majority = []
    for region in seg.regions:
        counts = np.bincount(quadrant[seg.labels == region.label], minlength=4)
        majority.append(int(counts.argmax()))
        assert counts.max() >= region.area_px - 4, f"region {region.label}: {counts}"
    assert sorted(majority) == [0, 1, 2, 3]


def check_regions_match_labels(seg):
    labels = seg.labels
    assert labels.dtype == np.int32
    assert labels.min() >= 1
    assert [r.label for r in seg.regions] == sorted(r.label for r in seg.regions)
    union = np.zeros(labels.shape, bool)
    for region in seg.regions:
        r0, c0, r1, c1 = region.bbox
        assert 0 <= r0 < r1 <= labels.shape[0] and 0 <= c0 < c1 <= labels.shape[1]
        assert region.mask.shape == (r1 - r0, c1 - c0) and region.mask.dtype == bool
        assert region.area_px == int(region.mask.sum()) == int((labels == region.label).sum())
        np.testing.assert_array_equal(region.mask, labels[r0:r1, c0:c1] == region.label)
        # The bbox is tight: the mask touches every side.
        assert region.mask[0].any() and region.mask[-1].any() and region.mask[:, 0].any() and region.mask[:, -1].any()
        assert not (union & (labels == region.label)).any()
        union |= labels == region.label
    assert union.all(), "regions must cover the whole image"
    assert sum(r.area_px for r in seg.regions) == labels.size


def test_regions_consistent_with_label_image_on_real_crop(positive_crop):
    image = read_rgb(positive_crop)
    seg = segment(image)
    assert seg.labels.shape == image.shape[:2]
    assert 10 <= len(seg.regions) <= 60  # around the study's 30
    check_regions_match_labels(seg)


def test_regions_consistent_on_noise():
    image = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    check_regions_match_labels(segment(image, SlicParams(n_segments=12)))


def test_segment_feeds_slic_float32_and_returns_int32(monkeypatch, fixture_file):
    seen = []
    real = segment_module.slic

    def spy(image, **kwargs):
        seen.append((image.dtype, float(image.max())))
        return real(image, **kwargs)

    monkeypatch.setattr(segment_module, "slic", spy)
    image = read_rgb(fixture_file("quadrants.png"))
    assert image.dtype == np.uint8
    seg = segment(image, SlicParams(n_segments=4))
    assert seen and seen[0][0] == np.float32 and seen[0][1] <= 1.0
    assert seg.labels.dtype == np.int32


def test_segment_is_deterministic(positive_crop):
    image = read_rgb(positive_crop)
    np.testing.assert_array_equal(segment(image).labels, segment(image).labels)


@pytest.mark.parametrize(
    "shape, params",
    [((4, 4, 3), SlicParams()), ((1, 200, 3), SlicParams(n_segments=4)), ((5, 5, 3), SlicParams(n_segments=26))],
    ids=["4x4-for-30", "one-row", "25px-for-26"],
)
def test_too_small_image_is_an_image_error(shape, params):
    with pytest.raises(ImageError, match="too small"):
        segment(np.zeros(shape, np.uint8), params)


def test_committed_tiny_image_is_too_small_for_the_study_segments(fixture_file):
    with pytest.raises(ImageError, match="4x4 px is too small for 30 superpixels"):
        segment(read_rgb(fixture_file("tiny4x4.png")))


@pytest.mark.parametrize("shape", [(10, 10), (10, 10, 4), (10, 10, 1)])
def test_segment_rejects_non_rgb(shape):
    with pytest.raises(ImageError, match="RGB"):
        segment(np.zeros(shape, np.uint8))


def test_regions_of_skips_missing_labels():
    labels = np.array([[1, 1, 3], [1, 3, 3]], np.int32)
    regions = regions_of(labels)
    assert [r.label for r in regions] == [1, 3]
    assert regions[1].bbox == (0, 1, 2, 3) and regions[1].area_px == 3


def test_region_crop_whole_region_and_resize():
    image = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    region = Region(label=1, bbox=(1, 2, 4, 7), area_px=15, mask=np.ones((3, 5), bool))
    np.testing.assert_array_equal(region.crop(image), image[1:4, 2:7])
    whole = whole_image_region(image)
    assert whole.bbox == (0, 0, 6, 8) and whole.area_px == 48 and whole.mask.all()
    resized = resize_nearest(image, 12)
    assert resized.shape == (12, 12, 3) and resized.dtype == np.uint8
    assert set(np.unique(resized)) <= set(np.unique(image))  # nearest neighbour invents no values


@given(arrays(np.int32, array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
              elements=st.sampled_from([0, 1, 7, 255, 256, 40000, 65535])))
@settings(max_examples=60, deadline=None)
def test_a_packed_label_map_comes_back_exactly(labels):
    from amber_hunter.model.segment import pack_labels, unpack_labels

    back = unpack_labels(pack_labels(labels))
    assert back.dtype == np.int32 and np.array_equal(back, labels)


def test_a_scene_label_map_packs_small_and_damage_is_said(data_root):
    from amber_hunter.model.segment import pack_labels, unpack_labels

    example = data_root / "example" / "positive1.png"
    if not example.is_file():
        pytest.skip(f"{example} not found")
    labels = segment(read_rgb(example), SlicParams(scale=2)).labels
    packed = pack_labels(labels)
    assert len(packed) < 40_000 and np.array_equal(unpack_labels(packed), labels)
    with pytest.raises(ImageError, match="damaged.*rescan"):
        unpack_labels(packed[:-100])
    with pytest.raises(ImageError, match="labels from 70000 to 70000"):
        pack_labels(np.full((2, 2), 70_000))
    with pytest.raises(ImageError, match="labels from -1 to 3"):
        pack_labels(np.array([[-1, 3]]))
    with pytest.raises(ImageError, match=r"shape \(2, 2, 3\)"):
        pack_labels(np.ones((2, 2, 3), int))


@settings(max_examples=150, deadline=None)
@given(labels=arrays(np.int32, array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=24), elements=st.integers(0, 3)))
def test_boundaries_mark_what_scikit_image_marks(labels):
    """The scan's map picture outlines superpixels with ``boundaries``, a shortcut for
    ``find_boundaries``: the same pixels, thick and inner, on any label image."""
    from skimage.segmentation import find_boundaries

    from amber_hunter.model.segment import boundaries

    np.testing.assert_array_equal(boundaries(labels), find_boundaries(labels, mode="thick"))
    positive = labels >= 2
    np.testing.assert_array_equal(boundaries(positive, inner=True), find_boundaries(positive, mode="inner"))
