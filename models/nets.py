"""St-networks: factories `(in_shape, out_features) -> nn.Module` injected into couplings.

The last layer of every network is zero-initialised so a fresh coupling is the identity.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

__all__ = ["NetFactory", "bottleneck_net", "mlp_net", "resnet_net"]

NetFactory = Callable[[tuple[int, ...], int], nn.Module]


class _ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.act(self.conv1(self.act(x))))


class _ResNet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, width: int, depth: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.Sequential(*[_ResidualBlock(width) for _ in range(depth)])
        self.act = nn.ReLU()
        self.head = nn.Conv2d(width, out_channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act(self.blocks(self.stem(x))))


class _Bottleneck(nn.Module):
    """ResNet encoder squeezed through a linear layer of `latent_dim` (Kirichenko et al. §8):
    the coupling can no longer copy local pixel detail straight through."""

    def __init__(
        self, shape: tuple[int, int, int], out_channels: int, width: int, depth: int, latent_dim: int
    ) -> None:
        super().__init__()
        c, h, w = shape
        self.spatial = (h, w)
        self.width = width
        self.stem = nn.Conv2d(c, width, 3, padding=1)
        self.encoder = nn.Sequential(*[_ResidualBlock(width) for _ in range(depth)])
        self.act = nn.ReLU()
        self.down = nn.Linear(width * h * w, latent_dim)
        self.up = nn.Linear(latent_dim, width * h * w)
        self.head = nn.Conv2d(width, out_channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.encoder(self.stem(x)))
        code = self.act(self.down(h.flatten(1)))
        h = self.act(self.up(code)).reshape(x.shape[0], self.width, *self.spatial)
        return self.head(h)


class _MLP(nn.Module):
    def __init__(self, in_features: int, out_features: int, hidden: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size = in_features
        for _ in range(depth):
            layers += [nn.Linear(size, hidden), nn.ReLU()]
            size = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(size, out_features)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def resnet_net(width: int = 32, depth: int = 2) -> NetFactory:
    def build(shape: tuple[int, ...], out_features: int) -> nn.Module:
        return _ResNet(shape[0], out_features, width, depth)

    return build


def bottleneck_net(width: int = 32, depth: int = 2, latent_dim: int = 32) -> NetFactory:
    def build(shape: tuple[int, ...], out_features: int) -> nn.Module:
        if len(shape) != 3:
            raise ValueError(f"bottleneck st-network needs an image shape (C, H, W), got {shape}")
        return _Bottleneck((shape[0], shape[1], shape[2]), out_features, width, depth, latent_dim)

    return build


def mlp_net(hidden: int = 512, depth: int = 2) -> NetFactory:
    def build(shape: tuple[int, ...], out_features: int) -> nn.Module:
        return _MLP(shape[0], out_features, hidden, depth)

    return build
