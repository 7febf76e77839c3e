"""St-networks: factories `(in_shape, out_features) -> nn.Module` injected into couplings.

The last layer of every network is zero-initialised so a fresh coupling is the identity.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.nn import functional

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
    """A ResNet st-network whose output depends on its input only through `latent_dim` numbers
    (Kirichenko et al. 2020, §7: the bottleneck is a *linear* low-dimensional layer).

    encoder (stem + residual blocks) -> 1x1 conv to one channel -> average-pool by `pool` ->
    linear map to `latent_dim` (no nonlinearity: the bottleneck) -> linear map back to the pooled
    grid -> nearest upsampling -> 3x3 conv to `width` -> ReLU -> head. Pooling keeps the two
    linear maps small, so a bottleneck flow can be built with the parameter count of a plain one
    and compared with it fairly.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        out_channels: int,
        width: int,
        depth: int,
        latent_dim: int,
        pool: int = 1,
    ) -> None:
        super().__init__()
        c, h, w = shape
        if h % pool or w % pool:
            raise ValueError(f"bottleneck pool {pool} must divide the st-network's input size {h}x{w}")
        self.pool = pool
        self.grid = (h // pool, w // pool)
        self.stem = nn.Conv2d(c, width, 3, padding=1)
        self.encoder = nn.Sequential(*[_ResidualBlock(width) for _ in range(depth)])
        self.act = nn.ReLU()
        self.reduce = nn.Conv2d(width, 1, 1)
        self.down = nn.Linear(self.grid[0] * self.grid[1], latent_dim)
        self.up = nn.Linear(latent_dim, self.grid[0] * self.grid[1])
        self.expand = nn.Conv2d(1, width, 3, padding=1)
        self.head = nn.Conv2d(width, out_channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        h = self.reduce(self.act(self.encoder(self.stem(x))))
        if self.pool > 1:
            h = functional.avg_pool2d(h, self.pool)
        code = self.down(h.flatten(1))  # (N, latent_dim), linear: the paper's bottleneck
        h = self.up(code).reshape(x.shape[0], 1, *self.grid)
        if self.pool > 1:
            h = functional.interpolate(h, scale_factor=self.pool, mode="nearest")
        return self.head(self.act(self.expand(h)))


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


def bottleneck_net(width: int = 32, depth: int = 2, latent_dim: int = 32, pool: int = 1) -> NetFactory:
    def build(shape: tuple[int, ...], out_features: int) -> nn.Module:
        if len(shape) != 3:
            raise ValueError(f"bottleneck st-network needs an image shape (C, H, W), got {shape}")
        return _Bottleneck((shape[0], shape[1], shape[2]), out_features, width, depth, latent_dim, pool)

    return build


def mlp_net(hidden: int = 512, depth: int = 2) -> NetFactory:
    def build(shape: tuple[int, ...], out_features: int) -> nn.Module:
        return _MLP(shape[0], out_features, hidden, depth)

    return build
