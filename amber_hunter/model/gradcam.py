"""Grad-CAM style "why this score" heatmaps: which pixels of a superpixel's crop push its score
toward mining through the linear head of each CNN block.

The classifier never sees CNN channels directly: each conv block's average- and max-pooled
activations go through one linear head (:class:`~.classify.LinearHead`), and XGBoost combines the
heads' scores with the hand-made features. So the question "where in the crop does the CNN see
mining?" has an exact answer per head, with no autodiff:

* a head's logit is ``sum_k coef_k * (sqrt(max(p_k, 0)) - mean_k) / scale_k + intercept`` over
  the pooled values ``p_k`` of its block's feature map ``A`` (h x w x C);
* an average-pooled channel ``p_c = mean(A_c)`` owes its term to every cell in proportion to the
  cell's activation, and a max-pooled one to its argmax cell alone (split evenly between ties);
* ``sqrt(p) = p * (1 / sqrt(p))``, so giving cell ``(i, j)`` the share
  ``coef_c / scale_c / sqrt(p_c) * A_c[i, j] / (h * w)`` of an average-pooled channel's term (and
  the whole ``coef_c / scale_c * sqrt(p_c)`` of a max-pooled one to its argmax) makes the cells
  add up to the head's logit exactly, minus a constant ``offset`` (intercept and the standardising
  means), which belongs to no cell.

That share is exactly twice the gradient of the logit with respect to ``A`` times ``A`` (the
derivative of ``sqrt`` halves it), so the map has the shape of gradient-times-activation Grad-CAM
while its cells sum to the logit instead of half of it. As in Grad-CAM, only the positive part is
shown (cells that push toward mining) and it is upsampled from the feature map to the crop.

Blocks are combined by how much XGBoost relied on each head *for this crop*: each head score's
SHAP value in the booster (its contribution to this crop's log-odds). Heads that pushed the score
down get no weight, so the map shows the evidence that raised the score, from the blocks that
raised it. A plain mean of normalised maps would give a block the trees hardly use (or one that
argued against mining) the same say as the block that decided the score, and would stretch a
block's near-zero noise to full brightness.

TensorFlow is imported only when a CNN embedder is built, never by importing this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import EmbedderError, ImageError
from .classify import LinearHead, ModelBundle
from .embed import Embedder
from .embed.cnn import CnnEmbedder, _import_keras
from .segment import resize_nearest, whole_image_region

#: Readable names of each CNN embedder's tapped feature maps, in tap order.
TAP_NAMES = {
    "vgg16": ("conv block 3", "conv block 4", "conv block 5"),
    "efflite0": ("stride 8", "stride 16", "head"),
}


@dataclass(frozen=True)
class BlockCam:
    """One CNN block's evidence for one crop, in units of its linear head's logit."""

    name: str
    #: ``(h, w)`` signed, on the block's feature-map grid: each cell's share of the head's logit.
    grid: np.ndarray
    #: The part of the logit no cell owns (intercept and standardising means): logit = grid.sum() + offset.
    offset: float
    #: The head score's SHAP value in the booster for this crop: how far it moved the log-odds.
    tree_weight: float
    #: ``(H, W)`` in [0, 1]: the positive part of ``grid`` upsampled to the crop, divided by its maximum
    #: (all zero when no cell pushes toward mining).
    heatmap: np.ndarray

    @property
    def score(self) -> float:
        """The head's logit for the crop, as :meth:`LinearHead.score` gives it."""
        return float(self.grid.sum()) + self.offset


@dataclass(frozen=True)
class GradCam:
    """Why a crop scored as it did, as far as the CNN heads are concerned."""

    #: ``float32 (H, W)`` in [0, 1]: where the crop pushes the score toward mining (1 = most).
    heatmap: np.ndarray
    blocks: list[BlockCam]
    #: The model's probability for the crop embedded on its own (texture filters then see no
    #: neighbours beyond the bbox, so it can differ slightly from a scan's).
    probability: float
    #: Share of the heat inside the superpixel's mask, when a mask was given and there is heat.
    inside_share: float | None
    #: One line for the side panel: which blocks the map is made of, or why it is empty.
    note: str

    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]


def block_grid(head: LinearHead, fmap: np.ndarray, poolings: list[str]) -> tuple[np.ndarray, float]:
    """Split ``head``'s logit over the cells of its block's feature map ``fmap`` (h x w x C).

    ``poolings`` names the pooling ("avg" or "max") of each of ``head.columns``' ranges, all over
    ``fmap``. Returns the signed ``(h, w)`` grid of shares and the offset no cell owns; see the
    module docstring for why the shares are exact.
    """
    h, w, c = fmap.shape
    cells = fmap.reshape(h * w, c).astype(np.float64)
    coef = head.coef.astype(np.float64) / head.scale
    grid = np.zeros(h * w)
    start = 0
    for pooling in poolings:
        k = coef[start : start + c]
        start += c
        pooled = cells.mean(axis=0) if pooling == "avg" else cells.max(axis=0)
        live = pooled > 0  # the head clips pooled values at 0: a channel below contributes nothing
        gain = np.where(live, k / np.sqrt(np.where(live, pooled, 1.0)), 0.0)  # coef/scale*sqrt(p) = gain*p
        if pooling == "avg":
            grid += cells @ gain / (h * w)
        else:
            at_max = cells == pooled
            grid += (at_max / at_max.sum(axis=0)) @ (gain * pooled)
    offset = float(head.intercept - np.sum(head.coef.astype(np.float64) * head.mean / head.scale))
    return grid.reshape(h, w), offset


def _upsample(grid: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The positive part of ``grid`` stretched bilinearly over a crop of ``shape``, scaled to [0, 1].

    The CNN saw the crop resized to a square, so stretching the grid to the crop's own aspect
    puts each cell back over the pixels it saw.
    """
    positive = Image.fromarray(np.maximum(grid, 0.0).astype(np.float32))
    up = np.maximum(np.asarray(positive.resize(shape[::-1], Image.Resampling.BILINEAR)), 0.0)
    top = float(up.max())
    return up / top if top > 0 else up


def _keras_maps(part: Embedder, crop: np.ndarray) -> tuple[list[np.ndarray], list[tuple[int, str, int]]]:
    """The feature maps a Keras CNN embedder pools, for one crop, and its column layout.

    vgg16, efflite0 and resnet50 are all Keras functional models ending in global pooling layers
    (joined by a ``Concatenate`` when there are several), so the maps are those layers' inputs: a
    sub-model up to them runs the same weights and preprocessing as ``embed``. Returns the maps
    (``h x w x C`` each) and, in column order, ``(map index, "avg"|"max", width)``.
    """
    if not isinstance(part, CnnEmbedder):
        raise EmbedderError(f"no Grad-CAM for the {part.name!r} embedder; only the Keras CNN embedders have one")
    keras = _import_keras()  # quietly: TensorFlow's start-up lines only with --verbose
    model = part.model
    last = model.layers[-1]
    pooled = list(last.input) if isinstance(last, keras.layers.Concatenate) else [model.output]
    pools = {
        id(layer.output): layer
        for layer in model.layers
        if isinstance(layer, (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D))
    }
    maps, layout = [], []
    for tensor in pooled:
        pool = pools[id(tensor)]
        index = next((i for i, m in enumerate(maps) if m is pool.input), len(maps))
        if index == len(maps):
            maps.append(pool.input)
        kind = "avg" if isinstance(pool, keras.layers.GlobalAveragePooling2D) else "max"
        layout.append((index, kind, int(tensor.shape[-1])))
    batch = part._preprocess(resize_nearest(crop, part.input_size)[None])
    values = keras.Model(model.input, maps)(batch, training=False)
    return [np.asarray(v)[0] for v in values], layout


def _check(crop: np.ndarray, mask: np.ndarray | None) -> None:
    if crop.dtype != np.uint8 or crop.ndim != 3 or crop.shape[2] != 3:
        raise ImageError(f"gradcam needs an RGB uint8 crop (H, W, 3), got {crop.dtype} {crop.shape}; read it with read_rgb")
    if mask is not None and (mask.dtype != bool or mask.shape != crop.shape[:2]):
        raise ImageError(
            f"the superpixel mask is {mask.dtype} {mask.shape}, not a boolean {crop.shape[:2]} mask over the crop; "
            "pass Region.mask of the region the crop was cut from"
        )


def gradcam(
    bundle: ModelBundle, crop: np.ndarray, mask: np.ndarray | None = None, *, embedder: Embedder | None = None
) -> GradCam | None:
    """The heatmap of why ``bundle`` scores ``crop`` (a superpixel's bbox crop) as it does.

    Returns None for a model without CNN heads (a texture-only bundle such as 'fast'): it has no
    feature maps to point at, and its caller shows the feature reasons instead, so None is an
    expected answer, not an error. ``mask`` (the superpixel over the crop) only sets
    ``inside_share``: the map itself covers the whole crop, because the CNN sees the neighbours in
    the bbox too, and heat on them says the score comes from the surroundings.

    ``embedder`` is the bundle's built embedder (``Detector.embedder``); pass it when calling
    repeatedly, since building one loads the CNN weights (seconds). One call runs each CNN once.
    """
    heads = bundle.classifier.heads
    if not heads:
        return None
    _check(crop, mask)
    if embedder is None:
        embedder = bundle.build_embedder()
    else:
        bundle.check_embedder(embedder.name, embedder.version)

    features, sources, start = [], {}, 0  # sources: global column range -> (block name, map, pooling)
    for part in getattr(embedder, "parts", [embedder]):
        if part.kind != "cnn":
            features.append(part.embed(crop, [whole_image_region(crop)])[0])
        else:
            maps, layout = _keras_maps(part, crop)
            names = TAP_NAMES.get(part.name, ())
            column = start
            for index, pooling, width in layout:
                fmap = maps[index]
                name = f"{part.name} {names[index] if index < len(names) else f'tap {index + 1}'}"
                sources[(column, column + width)] = (name, fmap, pooling)
                features.append(fmap.mean(axis=(0, 1)) if pooling == "avg" else fmap.max(axis=(0, 1)))
                column += width
        start += part.dim
    row = np.concatenate(features).astype(np.float32)[None]

    import xgboost as xgb

    shap = bundle.classifier.booster.predict(xgb.DMatrix(bundle.classifier.tree_features(row)), pred_contribs=True)[0]
    blocks = []
    for head, weight in zip(heads, shap[: len(heads)], strict=True):  # head columns come first
        found = [sources[tuple(r)] for r in head.columns]
        grid, offset = block_grid(head, found[0][1], [pooling for _, _, pooling in found])
        blocks.append(BlockCam(found[0][0], grid, offset, float(weight), _upsample(grid, crop.shape[:2])))

    weights = np.maximum([b.tree_weight for b in blocks], 0.0)
    if weights.sum() > 0:
        weights /= weights.sum()
        heat = np.tensordot(weights, np.stack([b.heatmap for b in blocks]), axes=1)
        heat = heat / heat.max() if heat.max() > 0 else heat  # zero only if those blocks have no positive cell
        share = ", ".join(f"{b.name} {w:.0%}" for b, w in zip(blocks, weights) if w > 0)
        note = f"CNN evidence for mining, by the blocks that raised the score: {share}"
    else:
        heat = np.zeros(crop.shape[:2])
        note = "no CNN block raised the score (every head's tree contribution is <= 0), so the map is empty"
    heat = heat.astype(np.float32)
    inside = None
    if mask is not None and heat.sum() > 0:
        inside = float(heat[mask].sum() / heat.sum())
    return GradCam(heat, blocks, float(bundle.predict_proba(row)[0]), inside, note)


def overlay(crop: np.ndarray, heatmap: np.ndarray, mask: np.ndarray | None = None, alpha: float = 0.5) -> np.ndarray:
    """``crop`` blended with ``heatmap`` in the inferno colours, and the superpixel's outline.

    The colour goes over every pixel at the same strength, as Grad-CAM figures do: inferno runs
    from black to yellow, so cold pixels are dimmed and the evidence is lit like a spotlight, and
    the brightness stays proportional to the heat (a heat-dependent blend would hide the broad,
    weaker evidence next to the few max-pooled hot spots). The outline (cyan, which inferno never
    uses) shows which superpixel of the crop is being explained.
    """
    _check(crop, mask)
    if heatmap.shape != crop.shape[:2]:
        raise ImageError(f"heatmap of shape {heatmap.shape} does not match the {crop.shape[:2]} crop; pass GradCam.heatmap")
    from matplotlib import colormaps

    heat = np.clip(np.nan_to_num(heatmap.astype(np.float32)), 0.0, 1.0)
    colour = colormaps["inferno"](heat)[..., :3].astype(np.float32) * 255
    out = (1 - alpha) * crop.astype(np.float32) + alpha * colour
    if mask is not None:
        from skimage.segmentation import find_boundaries

        out[find_boundaries(mask, mode="inner")] = (0, 255, 255)
    return np.round(out).astype(np.uint8)
