"""Density models built from configs: `PixelFlow` (RealNVP / Glow on pixels) and
`EmbeddingFlow` (frozen backbone + feature post-processing + vector coupling flow).

Both take uint8 images `(N, C, H, W)` at their native size and return
`(log_likelihood, bits_per_dim)`, each `(N,)` float32; that `forward` is the exported graph.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.config import EmbeddingFlowConfig, PixelFlowConfig
from models.coupling import AffineCoupling
from models.layers import ActNorm, InvertibleConv1x1, Permutation
from models.masks import Mask
from models.nets import NetFactory, bottleneck_net, mlp_net, resnet_net
from models.preprocessing import Dequantization, LogitTransform, dequantize
from models.scores import bits_per_dim, discrete_log_likelihood
from models.transforms import CompositeTransform, InverseTransform, SplitApply, Squeeze, Transform

__all__ = [
    "EmbeddingFlow",
    "FeatureProjection",
    "PixelFlow",
    "build_model",
    "build_pixel_transform",
    "build_vector_transform",
    "check_images",
    "standard_normal_log_prob",
]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """`z: (N, ...)` -> `(N,)` log N(z; 0, I) in nats."""
    return (-0.5 * z.pow(2) - _HALF_LOG_2PI).flatten(1).sum(1)


def check_images(images: Tensor, shape: tuple[int, int, int]) -> None:
    """Raise ValueError unless `images` is `(N, *shape)` of integer or float pixel values."""
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a torch.Tensor of shape (N, {shape[0]}, {shape[1]}, {shape[2]})")
    if images.dim() != 4 or tuple(images.shape[1:]) != tuple(shape):
        raise ValueError(
            f"images must have shape (N, {shape[0]}, {shape[1]}, {shape[2]}), got {tuple(images.shape)}"
        )
    if images.dtype not in (torch.uint8, torch.float32, torch.float64):
        raise ValueError(f"images must be uint8 (or float with values 0..255), got {images.dtype}")


# ---------------------------------------------------------------- pixel flows


def _net_factory(config: PixelFlowConfig) -> NetFactory:
    if config.st_net == "bottleneck":
        return bottleneck_net(config.width, config.depth, config.latent_dim, config.bottleneck_pool)
    return resnet_net(config.width, config.depth)


def _can_squeeze(shape: tuple[int, int, int]) -> bool:
    return shape[1] % 2 == 0 and shape[2] % 2 == 0 and shape[1] >= 4 and shape[2] >= 4


def _realnvp_scale(shape: tuple[int, int, int], level: int, config: PixelFlowConfig) -> Transform:
    """One RealNVP scale: spatial couplings, squeeze, channel couplings, factor out half,
    recurse on the rest, unsqueeze (Dinh et al. 2017, §3.6)."""
    factory = _net_factory(config)
    c, h, w = shape
    last = level >= config.num_scales - 1 or not _can_squeeze(shape)
    layers: list[Transform] = []
    spatial_mask = config.mask
    if spatial_mask == "channel" and c < 2:
        # A channel mask needs channels to split: squeeze first, then couple channel-wise.
        if last:
            raise ValueError(f"mask 'channel' needs a squeezable input, got {shape}")
        spatial_mask = "skip"  # type: ignore[assignment]
    if spatial_mask != "skip":
        count = config.final_couplings if last else config.couplings_per_scale
        layers += [AffineCoupling(shape, Mask(spatial_mask, i), factory, config.clamp) for i in range(count)]
    if last:
        return CompositeTransform(layers)
    squeezed = (c * 4, h // 2, w // 2)
    layers.append(Squeeze())
    layers += [
        AffineCoupling(squeezed, Mask("channel", i), factory, config.clamp)
        for i in range(config.channel_couplings)
    ]
    inner = _realnvp_scale((c * 2, h // 2, w // 2), level + 1, config)
    layers += [SplitApply(c * 2, inner), InverseTransform(Squeeze())]
    return CompositeTransform(layers)


def _glow_level(shape: tuple[int, int, int], level: int, config: PixelFlowConfig) -> Transform:
    """One Glow level: squeeze, K x (ActNorm, 1x1 conv, affine coupling), split (Kingma &
    Dhariwal 2018)."""
    factory = _net_factory(config)
    c, h, w = shape
    if not _can_squeeze(shape):
        raise ValueError(f"Glow needs even image sides >= 4 at every level, got {shape}")
    squeezed = (c * 4, h // 2, w // 2)
    coupling_mask = "channel" if config.mask == "checkerboard" else config.mask
    layers: list[Transform] = [Squeeze()]
    for k in range(config.steps_per_level):
        layers += [
            ActNorm(squeezed[0]),
            InvertibleConv1x1(squeezed[0], seed=config.seed * 1000 + level * 100 + k),
            AffineCoupling(squeezed, Mask(coupling_mask, k), factory, config.clamp),
        ]
    last = level >= config.num_scales - 1 or not _can_squeeze((c * 2, h // 2, w // 2))
    if not last:
        layers.append(SplitApply(c * 2, _glow_level((c * 2, h // 2, w // 2), level + 1, config)))
    layers.append(InverseTransform(Squeeze()))
    return CompositeTransform(layers)


def build_pixel_transform(config: PixelFlowConfig) -> Transform:
    """The flow on logit space; its latent has the input's shape."""
    torch.manual_seed(config.seed)
    if config.architecture == "glow":
        return _glow_level(config.input_shape, 0, config)
    return _realnvp_scale(config.input_shape, 0, config)


class PixelFlow(nn.Module):
    """Exact likelihood of 8-bit images: dequantize -> logit -> flow -> standard normal."""

    kind = "pixel"

    def __init__(self, config: PixelFlowConfig) -> None:
        super().__init__()
        self.config = config
        self.input_shape = config.input_shape
        self.num_dims = int(math.prod(config.input_shape))
        self.logit = LogitTransform(config.alpha)
        self.flow = build_pixel_transform(config)

    def log_density_unit(self, y: Tensor) -> Tensor:
        """`y: (N, C, H, W)` in (0, 1) -> `(N,)` continuous log-density on [0, 1]^D (nats)."""
        x, logdet_logit = self.logit(y)
        z, logdet_flow = self.flow(x)
        return standard_normal_log_prob(z) + logdet_logit + logdet_flow

    def log_likelihood(
        self,
        images: Tensor,
        dequantization: Dequantization = "midpoint",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """`images: (N, C, H, W)` values 0..255 -> `(N,)` log P(image) in nats (DESIGN.md §3)."""
        check_images(images, self.input_shape)
        y = dequantize(images, dequantization, generator)
        return discrete_log_likelihood(self.log_density_unit(y), self.num_dims)

    def latent(self, images: Tensor) -> Tensor:
        """The flow's latent `z` for evaluation-mode images, shape `(N, C, H, W)`."""
        check_images(images, self.input_shape)
        x, _ = self.logit(dequantize(images, "midpoint"))
        return self.flow(x)[0]

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        log_likelihood = self.log_likelihood(images)
        return log_likelihood, bits_per_dim(log_likelihood, self.num_dims)


# ---------------------------------------------------------------- embedding flows


def build_vector_transform(config: EmbeddingFlowConfig) -> Transform:
    torch.manual_seed(config.seed)
    d = config.flow_features
    factory = mlp_net(config.hidden, config.depth)
    layers: list[Transform] = []
    for i in range(config.num_couplings):
        if config.actnorm:
            layers.append(ActNorm(d))
        if config.mask == "permute":
            layers.append(Permutation(d, seed=config.seed * 1000 + i))
            mask = Mask("half", i)
        else:
            mask = Mask("alternate", i)
        layers.append(AffineCoupling((d,), mask, factory, config.clamp))
    return CompositeTransform(layers)


class FeatureProjection(nn.Module):
    """Feature post-processing inside the model: optional L2 normalisation, then a fitted
    whitening `(f − mean) @ matrix` (shrunk-covariance PCA). Identity until `fit` is called."""

    mean: Tensor
    matrix: Tensor

    def __init__(self, in_features: int, out_features: int, l2_normalize: bool) -> None:
        super().__init__()
        self.l2_normalize = l2_normalize
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("matrix", torch.eye(in_features, out_features))

    def normalize(self, features: Tensor) -> Tensor:
        if self.l2_normalize:
            return features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return features

    @torch.no_grad()
    def fit(self, features: Tensor, shrinkage: float) -> None:
        """Fit on raw backbone features `(N, in_features)` of in-distribution training data."""
        f = self.normalize(features.double())
        mean = f.mean(0)
        cov = torch.cov((f - mean).T)
        cov = (1 - shrinkage) * cov + shrinkage * torch.trace(cov) / cov.shape[0] * torch.eye(cov.shape[0])
        eigvals, eigvecs = torch.linalg.eigh(cov)
        order = torch.argsort(eigvals, descending=True)[: self.matrix.shape[1]]
        matrix = eigvecs[:, order] / eigvals[order].clamp_min(1e-12).sqrt()
        self.mean.copy_(mean.float())
        self.matrix.copy_(matrix.float())

    def forward(self, features: Tensor) -> Tensor:
        return (self.normalize(features) - self.mean) @ self.matrix


class EmbeddingFlow(nn.Module):
    """`log_likelihood` is the flow's log-density (nats) of the post-processed feature vector;
    `bits_per_dim` is per feature dimension."""

    kind = "embedding"

    def __init__(self, config: EmbeddingFlowConfig) -> None:
        super().__init__()
        from models.backbones import EfficientNetLite0Features

        self.config = config
        self.input_shape = config.input_shape
        self.num_dims = config.flow_features
        self.backbone = EfficientNetLite0Features(resolution=config.resolution, kind=config.features)
        self.projection = FeatureProjection(
            config.backbone_features, config.flow_features, config.l2_normalize
        )
        self.flow = build_vector_transform(config)

    def features(self, images: Tensor) -> Tensor:
        """`images: (N, C, H, W)` values 0..255 -> raw backbone features `(N, backbone_features)`."""
        check_images(images, self.input_shape)
        return self.backbone(images.to(torch.float32))

    def log_likelihood_features(self, features: Tensor) -> Tensor:
        """Raw backbone features `(N, backbone_features)` -> `(N,)` log-density of the projected features."""
        z, logabsdet = self.flow(self.projection(features))
        return standard_normal_log_prob(z) + logabsdet

    def log_likelihood(self, images: Tensor) -> Tensor:
        return self.log_likelihood_features(self.features(images))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        log_likelihood = self.log_likelihood(images)
        return log_likelihood, bits_per_dim(log_likelihood, self.num_dims)


def build_model(config: PixelFlowConfig | EmbeddingFlowConfig) -> PixelFlow | EmbeddingFlow:
    if isinstance(config, PixelFlowConfig):
        return PixelFlow(config)
    return EmbeddingFlow(config)
