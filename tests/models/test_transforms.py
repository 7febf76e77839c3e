"""Every transform and flow variant: round trip, cancelling log-dets, and the log-det equal to
slogdet of the autograd Jacobian (float64, small inputs). Zero-initialised output layers are
re-initialised first, or the layers would be identities and the tests would pass for nothing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from models.config import EmbeddingFlowConfig, PixelFlowConfig
from models.coupling import AffineCoupling
from models.flows import build_pixel_transform, build_vector_transform
from models.layers import ActNorm, InvertibleConv1x1, Permutation
from models.masks import Mask
from models.nets import bottleneck_net, mlp_net, resnet_net
from models.preprocessing import LogitTransform
from models.transforms import CompositeTransform, InverseTransform, SplitApply, Squeeze, Transform


def randomize(module: nn.Module, scale: float = 0.2, seed: int = 0) -> nn.Module:
    """Give every parameter (zero-initialised heads included) random non-trivial values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)
    return module


def _small_pixel(**kw: object) -> PixelFlowConfig:
    base: dict[str, object] = dict(
        input_shape=(1, 8, 8),
        width=4,
        depth=1,
        latent_dim=3,
        num_scales=2,
        couplings_per_scale=2,
        channel_couplings=2,
        final_couplings=4,
        steps_per_level=2,
    )
    base.update(kw)
    return PixelFlowConfig(**base)  # type: ignore[arg-type]


CASES: dict[str, tuple[Callable[[], Transform], tuple[int, ...]]] = {
    "logit": (lambda: LogitTransform(0.05), (2, 3, 3)),
    "squeeze": (lambda: Squeeze(), (1, 4, 4)),
    "unsqueeze": (lambda: InverseTransform(Squeeze()), (4, 2, 2)),
    "actnorm-image": (lambda: ActNorm(3), (3, 3, 3)),
    "actnorm-vector": (lambda: ActNorm(6), (6,)),
    "invconv1x1": (lambda: InvertibleConv1x1(4, seed=1), (4, 3, 3)),
    "permutation": (lambda: Permutation(7, seed=2), (7,)),
    "split-apply": (lambda: SplitApply(1, ActNorm(1)), (2, 3, 3)),
    "composite": (lambda: CompositeTransform([ActNorm(2), InvertibleConv1x1(2), ActNorm(2)]), (2, 3, 3)),
}
for _mask in ("checkerboard", "horizontal", "cycle"):
    for _i in range(4 if _mask == "cycle" else 2):
        CASES[f"coupling-{_mask}-{_i}-resnet"] = (
            lambda m=_mask, i=_i: AffineCoupling((2, 4, 4), Mask(m, i), resnet_net(4, 1)),  # type: ignore[misc]
            (2, 4, 4),
        )
CASES["coupling-channel-resnet"] = (
    lambda: AffineCoupling((4, 3, 3), Mask("channel", 1), resnet_net(4, 1)),
    (4, 3, 3),
)
CASES["coupling-checkerboard-bottleneck"] = (
    lambda: AffineCoupling((1, 4, 4), Mask("checkerboard", 0), bottleneck_net(4, 1, 3)),
    (1, 4, 4),
)
CASES["coupling-checkerboard-bottleneck-pooled"] = (
    lambda: AffineCoupling((1, 4, 4), Mask("checkerboard", 1), bottleneck_net(4, 1, 3, pool=2)),
    (1, 4, 4),
)
CASES["coupling-vector-alternate"] = (lambda: AffineCoupling((6,), Mask("alternate", 0), mlp_net(8, 2)), (6,))
CASES["coupling-vector-half"] = (lambda: AffineCoupling((7,), Mask("half", 1), mlp_net(8, 1)), (7,))
for _mask in ("checkerboard", "horizontal", "cycle", "channel"):
    CASES[f"realnvp-{_mask}"] = (lambda m=_mask: build_pixel_transform(_small_pixel(mask=m)), (1, 8, 8))  # type: ignore[misc]
for _mask in ("checkerboard", "horizontal", "cycle"):
    CASES[f"realnvp-single-scale-{_mask}"] = (
        lambda m=_mask: build_pixel_transform(_small_pixel(mask=m, num_scales=1, final_couplings=8)),  # type: ignore[misc]
        (1, 8, 8),
    )
CASES["realnvp-single-scale-bottleneck"] = (
    lambda: build_pixel_transform(
        _small_pixel(num_scales=1, final_couplings=4, st_net="bottleneck", bottleneck_pool=2)
    ),
    (1, 8, 8),
)
CASES["realnvp-bottleneck"] = (lambda: build_pixel_transform(_small_pixel(st_net="bottleneck")), (1, 8, 8))
CASES["realnvp-rgb"] = (lambda: build_pixel_transform(_small_pixel(input_shape=(3, 4, 4))), (3, 4, 4))
CASES["glow"] = (lambda: build_pixel_transform(_small_pixel(architecture="glow")), (1, 8, 8))
CASES["glow-bottleneck"] = (
    lambda: build_pixel_transform(_small_pixel(architecture="glow", st_net="bottleneck")),
    (1, 8, 8),
)
CASES["vector-flow-permute"] = (
    lambda: build_vector_transform(
        EmbeddingFlowConfig(projection_dim=6, hidden=8, num_couplings=3, actnorm=True)
    ),
    (6,),
)
CASES["vector-flow-alternate"] = (
    lambda: build_vector_transform(EmbeddingFlowConfig(projection_dim=5, hidden=8, mask="alternate")),
    (5,),
)


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    """These are thousands of tiny ops: one thread is faster, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _input(shape: tuple[int, ...], batch: int, name: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    if name == "logit":
        return torch.rand((batch, *shape), generator=generator, dtype=torch.float64) * 0.98 + 0.01
    return torch.randn((batch, *shape), generator=generator, dtype=torch.float64)


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> tuple[str, Transform, tuple[int, ...]]:
    factory, shape = CASES[request.param]
    transform = factory().double()
    if request.param != "logit":
        randomize(transform)
    return request.param, transform.eval(), shape


def test_round_trip_and_logdets_cancel(case: tuple[str, Transform, tuple[int, ...]]) -> None:
    name, transform, shape = case
    x = _input(shape, 5, name)
    with torch.no_grad():
        z, forward_logdet = transform(x)
        x_back, inverse_logdet = transform.inverse(z)
    assert z.numel() == x.numel()
    assert forward_logdet.shape == (5,)
    torch.testing.assert_close(x_back, x, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(
        forward_logdet + inverse_logdet, torch.zeros(5, dtype=torch.float64), atol=1e-7, rtol=0
    )


def test_logdet_matches_autograd_jacobian(case: tuple[str, Transform, tuple[int, ...]]) -> None:
    name, transform, shape = case
    x = _input(shape, 2, name)
    _, logabsdet = transform(x)
    for i in range(2):

        def f(flat: torch.Tensor) -> torch.Tensor:
            return transform(flat.reshape(1, *shape))[0].reshape(-1)

        jacobian = torch.autograd.functional.jacobian(f, x[i].reshape(-1))
        _, expected = torch.linalg.slogdet(jacobian)
        torch.testing.assert_close(logabsdet[i], expected, rtol=1e-7, atol=1e-7)


def test_randomised_layers_are_not_identities(case: tuple[str, Transform, tuple[int, ...]]) -> None:
    """Guards the two tests above: the transforms under test really move their input."""
    name, transform, shape = case
    if name in ("squeeze", "unsqueeze", "permutation"):
        pytest.skip("pure permutations: identity log-det is the point")
    x = _input(shape, 3, name)
    z, logabsdet = transform(x)
    assert not torch.allclose(z, x)
    assert logabsdet.abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["checkerboard", "horizontal", "cycle", "channel"])
def test_masks_are_disjoint_and_cover(kind: str) -> None:
    shape = (4, 6, 6)
    covered = torch.zeros(shape)
    steps = 4 if kind == "cycle" else 2
    for i in range(steps):
        cond, trans = Mask(kind, i).tensors(shape)  # type: ignore[arg-type]
        assert cond.shape == (1, *shape)
        assert float((cond * trans).sum()) == 0.0
        assert float(trans.sum()) > 0
        covered += trans[0]
    assert bool((covered > 0).all()), "every entry is transformed by some coupling in the stack"


def test_cycle_mask_predicts_next_quadrant_from_previous() -> None:
    cond, trans = Mask("cycle", 0).tensors((1, 4, 4))
    assert cond[0, 0, :2, :2].eq(1).all() and cond.sum() == 4  # top-left conditions
    assert trans[0, 0, :2, 2:].eq(1).all() and trans.sum() == 4  # top-right is transformed
    cond, trans = Mask("cycle", 1).tensors((1, 4, 4))
    assert cond[0, 0, :2, 2:].eq(1).all() and trans[0, 0, 2:, 2:].eq(1).all()


def test_horizontal_mask_splits_top_and_bottom() -> None:
    cond, trans = Mask("horizontal", 0).tensors((1, 4, 4))
    assert cond[0, 0, :2].eq(1).all() and cond[0, 0, 2:].eq(0).all()
    assert trans[0, 0, 2:].eq(1).all()


def test_bottleneck_limits_information() -> None:
    """The bottleneck st-network's output depends on its input only through latent_dim numbers."""
    net = bottleneck_net(width=4, depth=1, latent_dim=2)((1, 4, 4), 2)
    assert net.down.out_features == 2
    randomize(net)
    jac = torch.autograd.functional.jacobian(
        lambda v: net(v.reshape(1, 1, 4, 4)).reshape(-1), torch.randn(16)
    )
    assert torch.linalg.matrix_rank(jac) <= 2


@pytest.mark.parametrize("pool", [1, 2])
def test_bottleneck_is_a_linear_low_dimensional_layer(pool: int) -> None:
    """Kirichenko et al. §7: nothing nonlinear between the map down to `latent_dim` and the map
    back up (the old version had a ReLU there)."""
    net = bottleneck_net(width=4, depth=1, latent_dim=3, pool=pool)((1, 8, 8), 2)
    randomize(net)
    seen: dict[str, torch.Tensor] = {}
    net.down.register_forward_hook(lambda m, a, out: seen.__setitem__("code", out))
    net.up.register_forward_pre_hook(lambda m, a: seen.__setitem__("up_input", a[0]))
    net(torch.randn(5, 1, 8, 8))
    assert seen["code"].shape == (5, 3)
    assert (seen["code"] < 0).any(), "a ReLU would clip these"
    assert torch.equal(seen["code"], seen["up_input"])
    with pytest.raises(ValueError, match="pool 3 must divide"):
        bottleneck_net(4, 1, 3, pool=3)((1, 8, 8), 2)


def test_single_scale_cycle_flow_goes_twice_around_the_quadrants() -> None:
    """The paper's cycle-mask RealNVP: 8 couplings on the image grid, no squeeze; coupling i
    transforms quadrant i+1 from quadrant i, so every quadrant is transformed exactly twice."""
    flow = build_pixel_transform(_small_pixel(mask="cycle", num_scales=1, final_couplings=8))
    modules = list(flow.modules())
    assert not any(isinstance(m, Squeeze) for m in modules)
    couplings = [m for m in modules if isinstance(m, AffineCoupling)]
    assert [c.mask.index for c in couplings] == list(range(8)) and all(
        c.shape == (1, 8, 8) for c in couplings
    )
    transformed = sum(c.transformed[0, 0] for c in couplings)
    assert torch.equal(transformed, torch.full((8, 8), 2.0))
    for a, b in zip(couplings, couplings[1:], strict=False):
        assert torch.equal(b.condition, a.transformed)  # each step reads the quadrant the last one wrote


def test_mask_variants_have_equal_parameter_counts() -> None:
    counts = {
        m: sum(
            p.numel()
            for p in build_pixel_transform(_small_pixel(mask=m, num_scales=1, final_couplings=8)).parameters()
        )
        for m in ("checkerboard", "horizontal", "cycle")
    }
    assert len(set(counts.values())) == 1, counts
