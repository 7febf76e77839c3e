"""Known answers and robustness of the density models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.config import PixelFlowConfig
from models.flows import PixelFlow, standard_normal_log_prob
from models.scores import bits_per_dim, discrete_log_likelihood, ood_score, p_value
from tests.models.test_transforms import randomize

SMALL = dict(width=8, depth=1, num_scales=2, couplings_per_scale=2, channel_couplings=1, final_couplings=2)


def test_uniform_density_on_8bit_data_is_exactly_8_bits_per_dim() -> None:
    for d in (1, 784, 3072):
        ll = discrete_log_likelihood(0.0, d)  # log-density 0 on [0, 1]^D is the uniform density
        assert bits_per_dim(ll, d) == pytest.approx(8.0, abs=1e-12)
        assert ll == pytest.approx(-d * math.log(256))


def test_identity_flow_equals_analytic_standard_normal_density() -> None:
    """A fresh flow (zero-initialised coupling heads) is the identity, so its likelihood is the
    analytic one: N(logit(p)) times the logit Jacobian, minus D ln 256."""
    model = PixelFlow(PixelFlowConfig(**SMALL)).double().eval()  # type: ignore[arg-type]
    images = torch.randint(
        0, 256, (4, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    y = (images.double().numpy() + 0.5) / 256.0
    alpha = 0.05
    p = alpha + (1 - 2 * alpha) * y
    z = np.log(p) - np.log1p(-p)
    log_normal = (-0.5 * z**2 - 0.5 * np.log(2 * np.pi)).reshape(4, -1).sum(1)
    log_jac = (np.log(1 - 2 * alpha) - np.log(p) - np.log1p(-p)).reshape(4, -1).sum(1)
    expected = log_normal + log_jac - 784 * np.log(256)
    with torch.no_grad():
        got = model.log_likelihood(images.double()).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_standard_normal_log_prob() -> None:
    z = torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    torch.testing.assert_close(standard_normal_log_prob(z), expected)


@pytest.mark.parametrize("architecture", ["realnvp", "glow"])
def test_bits_per_dim_is_consistent_and_deterministic(architecture: str) -> None:
    model = randomize(
        PixelFlow(PixelFlowConfig(architecture=architecture, steps_per_level=2, **SMALL))
    ).eval()  # type: ignore[arg-type]
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        ll1, bpd1 = model(images)
        ll2, bpd2 = model(images)
    assert torch.equal(ll1, ll2) and torch.equal(bpd1, bpd2)
    torch.testing.assert_close(bpd1, -ll1 / (784 * math.log(2)))


@pytest.mark.parametrize("architecture", ["realnvp", "glow"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_extreme_inputs_give_finite_scores(architecture: str, shape: tuple[int, int, int]) -> None:
    model = PixelFlow(
        PixelFlowConfig(architecture=architecture, input_shape=shape, steps_per_level=2, **SMALL)
    )  # type: ignore[arg-type]
    randomize(model, scale=1.0).eval()
    generator = torch.Generator().manual_seed(1)
    batch = torch.stack(
        [
            torch.zeros(shape, dtype=torch.uint8),
            torch.full(shape, 255, dtype=torch.uint8),
            torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8),
        ]
    )
    with torch.no_grad():
        ll, bpd = model(batch)
    assert torch.isfinite(ll).all() and torch.isfinite(bpd).all()


@pytest.mark.parametrize("architecture", ["realnvp", "glow"])
@pytest.mark.parametrize("st_net", ["resnet", "bottleneck"])
def test_every_parameter_receives_a_gradient(architecture: str, st_net: str) -> None:
    model = randomize(
        PixelFlow(
            PixelFlowConfig(
                architecture=architecture, st_net=st_net, steps_per_level=2, latent_dim=4, **SMALL
            )
        )  # type: ignore[arg-type]
    )
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    loss = -model.log_likelihood(images, dequantization="uniform").mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"


def test_uniform_dequantization_is_random_midpoint_is_not() -> None:
    model = randomize(PixelFlow(PixelFlowConfig(**SMALL))).eval()  # type: ignore[arg-type]
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        a = model.log_likelihood(images, "uniform")
        b = model.log_likelihood(images, "uniform")
    assert not torch.equal(a, b)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(2, 1, 27, 28, dtype=torch.uint8), r"\(N, 1, 28, 28\)"),
        (torch.zeros(1, 28, 28, dtype=torch.uint8), r"\(N, 1, 28, 28\)"),
        (torch.zeros(2, 3, 28, 28, dtype=torch.uint8), r"\(N, 1, 28, 28\)"),
        (torch.zeros(2, 1, 28, 28, dtype=torch.int64), "uint8"),
        (np.zeros((2, 1, 28, 28), dtype=np.uint8), "torch.Tensor"),
    ],
)
def test_wrong_shapes_and_dtypes_raise_value_error(bad: object, message: str) -> None:
    model = PixelFlow(PixelFlowConfig(**SMALL))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        model.log_likelihood(bad)  # type: ignore[arg-type]


def test_ood_statistics_and_p_values_by_hand() -> None:
    d = 4
    ll = -np.array([8.0, 4.0, 2.0]) * d * math.log(2)  # 8, 4 and 2 bits/dim
    np.testing.assert_allclose(ood_score("nll", ll, num_dims=d), [8.0, 4.0, 2.0])
    np.testing.assert_allclose(
        ood_score("typicality", ll, num_dims=d, reference_nll_mean=4.0), [4.0, 0.0, 2.0]
    )
    ref = np.array([1.0, 2.0, 3.0, 4.0])
    # (1 + #{ref >= s}) / (1 + n)
    np.testing.assert_allclose(p_value(np.array([0.0, 2.5, 4.0, 9.0]), ref), [1.0, 3 / 5, 2 / 5, 1 / 5])
