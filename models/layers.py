"""Glow's layers: ActNorm, invertible 1x1 convolution (LU-parametrised), and a fixed
permutation for vector flows."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.transforms import Transform

__all__ = ["ActNorm", "InvertibleConv1x1", "Permutation", "initialize_actnorm"]


def _spatial(x: Tensor) -> int:
    return int(x[0, 0].numel())


class ActNorm(Transform):
    """Per-channel affine `y = (x + bias) * exp(log_scale)` for `(N, C)` or `(N, C, H, W)`.

    Data-dependent initialisation is an explicit call (`initialize` or `initialize_actnorm`),
    never a branch inside `forward`, so the served graph is static.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))

    def _view(self, p: Tensor, x: Tensor) -> Tensor:
        return p.view(1, -1, *([1] * (x.dim() - 2)))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set bias and scale so that `x` maps to zero mean, unit variance per channel."""
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims)
        std = x.std(dim=dims).clamp_min(1e-6)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = (x + self._view(self.bias, x)) * torch.exp(self._view(self.log_scale, x))
        logabsdet = self.log_scale.sum() * _spatial(x)
        return y, logabsdet.expand(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x = z * torch.exp(-self._view(self.log_scale, z)) - self._view(self.bias, z)
        logabsdet = -self.log_scale.sum() * _spatial(z)
        return x, logabsdet.expand(z.shape[0])


@torch.no_grad()
def initialize_actnorm(flow: nn.Module, x: Tensor) -> int:
    """Run `flow` once on a data batch and initialise every ActNorm from the activations it
    receives, in order. Returns how many layers were initialised."""
    handles = []
    count = 0

    def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        nonlocal count
        assert isinstance(module, ActNorm)
        module.initialize(args[0])
        count += 1

    for module in flow.modules():
        if isinstance(module, ActNorm):
            handles.append(module.register_forward_pre_hook(hook))
    try:
        flow(x)
    finally:
        for handle in handles:
            handle.remove()
    return count


class InvertibleConv1x1(Transform):
    """Glow's 1x1 convolution with `W = P L (U + diag(sign * exp(log_s)))` so that the
    log-determinant is `H * W * sum(log_s)`: cheap and exportable (no slogdet in the graph)."""

    perm: Tensor
    sign_s: Tensor
    lower_mask: Tensor
    eye: Tensor

    def __init__(self, channels: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(torch.abs(s)))

    def weight(self) -> Tensor:
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        w = self.weight()
        y = torch.einsum("ij,bjhw->bihw", w, x)
        return y, (self.log_s.sum() * _spatial(x)).expand(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        w_inv = torch.linalg.inv(self.weight())
        x = torch.einsum("ij,bjhw->bihw", w_inv, z)
        return x, (-self.log_s.sum() * _spatial(z)).expand(z.shape[0])


class Permutation(Transform):
    """A fixed random permutation of vector features (volume preserving)."""

    perm: Tensor
    inv_perm: Tensor

    def __init__(self, features: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        perm = torch.randperm(features, generator=generator)
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x[:, self.perm], x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z[:, self.inv_perm], z.new_zeros(z.shape[0])
