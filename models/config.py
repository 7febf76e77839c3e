"""Typed architecture configs (pydantic); saved whole in every artifact's manifest."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "FEATURE_KINDS",
    "POOLED_FEATURES",
    "SPATIAL_STAGES",
    "THUMBNAIL_SIDE",
    "EmbeddingFlowConfig",
    "FeatureKind",
    "ModelConfig",
    "PixelFlowConfig",
    "spatial_feature_width",
]

FeatureKind = Literal["pooled", "spatial"]
#: `pooled`: the backbone classifier's input, globally average-pooled (blind to layout).
#: `spatial`: stage-5 and stage-4 maps kept on their grids, plus an 8x8 thumbnail of the input
#: (models.backbones.EfficientNetLite0Features).
FEATURE_KINDS: tuple[FeatureKind, ...] = ("pooled", "spatial")
#: Spatial features: (stage index in timm's `blocks`, channels, stride), in output order.
SPATIAL_STAGES: tuple[tuple[int, int, int], ...] = ((5, 192, 32), (4, 112, 16))
THUMBNAIL_SIDE = 8
POOLED_FEATURES = 1280


def spatial_feature_width(resolution: int, channels: int = 3) -> int:
    """Length of the `spatial` feature vector at `resolution` (a multiple of 32)."""
    maps = sum(c * (resolution // stride) ** 2 for _, c, stride in SPATIAL_STAGES)
    return maps + channels * THUMBNAIL_SIDE**2


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PixelFlowConfig(_Config):
    """A flow on raw pixels. `mask` picks the spatial coupling mask and `st_net` the coupling
    network (`bottleneck`: squeezed through a linear layer of `latent_dim`); both are the
    "changing biases" of Kirichenko et al. 2020, §7. `num_scales=1` gives the paper's
    single-scale RealNVP: `final_couplings` couplings on the image grid, no squeeze."""

    kind: Literal["pixel"] = "pixel"
    architecture: Literal["realnvp", "glow"] = "realnvp"
    input_shape: tuple[int, int, int] = (1, 28, 28)
    mask: Literal["checkerboard", "channel", "horizontal", "cycle"] = "checkerboard"
    st_net: Literal["resnet", "bottleneck"] = "resnet"
    width: int = Field(32, ge=1)
    depth: int = Field(2, ge=0, description="residual blocks per st-network")
    latent_dim: int = Field(32, ge=1, description="bottleneck width (st_net='bottleneck')")
    bottleneck_pool: int = Field(
        1, ge=1, description="st_net='bottleneck': average-pool factor before the linear bottleneck"
    )
    num_scales: int = Field(3, ge=1, description="RealNVP scales / Glow levels (capped by the image size)")
    couplings_per_scale: int = Field(3, ge=1, description="RealNVP spatial couplings before each squeeze")
    channel_couplings: int = Field(3, ge=0, description="RealNVP channel-wise couplings after each squeeze")
    final_couplings: int = Field(4, ge=1, description="RealNVP couplings at the coarsest scale")
    steps_per_level: int = Field(8, ge=1, description="Glow: ActNorm + 1x1 conv + coupling steps per level")
    alpha: float = Field(0.05, ge=0.0, lt=0.5, description="logit pre-processing constant (RealNVP §4.1)")
    clamp: float = Field(2.0, gt=0.0, description="soft clamp of the coupling log-scale")
    seed: int = 0

    @model_validator(mode="after")
    def _check_shape(self) -> PixelFlowConfig:
        c, h, w = self.input_shape
        if c < 1 or h < 2 or w < 2:
            raise ValueError(f"input_shape must be (C>=1, H>=2, W>=2), got {self.input_shape}")
        return self


class EmbeddingFlowConfig(_Config):
    """Frozen EfficientNet-Lite0 features -> post-processing -> a coupling flow on vectors."""

    kind: Literal["embedding"] = "embedding"
    input_shape: tuple[int, int, int] = (1, 28, 28)
    backbone: Literal["efficientnet_lite0"] = "efficientnet_lite0"
    resolution: int = Field(64, ge=32, description="backbone input size in pixels")
    features: FeatureKind = Field(
        "pooled",
        description="backbone features: 'pooled' (1280, layout-blind) or 'spatial' (stage-5 and "
        "stage-4 maps on their grids plus an 8x8 input thumbnail; sees orientation and contrast)",
    )
    l2_normalize: bool = True
    projection_dim: int | None = Field(
        None, ge=2, description="whitened PCA dimension fitted on training features; None keeps all"
    )
    shrinkage: float = Field(0.05, ge=0.0, le=1.0, description="covariance shrinkage of the whitening")
    num_couplings: int = Field(4, ge=1)
    hidden: int = Field(256, ge=1)
    depth: int = Field(1, ge=0)
    mask: Literal["alternate", "permute"] = "permute"
    actnorm: bool = False
    clamp: float = Field(1.0, gt=0.0)
    seed: int = 0

    @model_validator(mode="after")
    def _check_resolution(self) -> EmbeddingFlowConfig:
        if self.features == "spatial" and self.resolution % 32:
            raise ValueError(
                f"spatial features need a resolution that is a multiple of 32, got {self.resolution}"
            )
        return self

    @property
    def backbone_features(self) -> int:
        if self.features == "spatial":
            return spatial_feature_width(self.resolution)
        return POOLED_FEATURES

    @property
    def flow_features(self) -> int:
        return self.projection_dim or self.backbone_features


ModelConfig = Annotated[PixelFlowConfig | EmbeddingFlowConfig, Field(discriminator="kind")]
