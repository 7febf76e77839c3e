"""The likelihood-ratio model of Ren et al. 2019 as one exportable graph.

A pixel flow and a *background* flow (the same kind of flow, trained on perturbed inputs in which
each pixel was replaced by uniform noise with rate μ) score the same image. The background flow
captures the population-level, low-level statistics (smoothness, amount of background) that
dominate raw likelihood; their difference `log p(x) − log p_background(x)` keeps the semantic part.

The graph has the main flow's outputs `log_likelihood` and `bits_per_dim` (unchanged, so raw
likelihood is always returned) plus `background_log_likelihood` (nats).
"""

from __future__ import annotations

from torch import Tensor, nn

from models.artifact import BACKGROUND_OUTPUT, GRAPH_OUTPUTS
from models.flows import PixelFlow
from models.scores import bits_per_dim

__all__ = ["BACKGROUND_OUTPUT", "LikelihoodRatioModel"]


class LikelihoodRatioModel(nn.Module):
    """`images: (N, C, H, W) uint8 -> (log_likelihood, bits_per_dim, background_log_likelihood)`,
    each `(N,)` float32, nats / bits per dim / nats."""

    kind = "pixel"
    output_names = (*GRAPH_OUTPUTS, BACKGROUND_OUTPUT)

    def __init__(self, main: PixelFlow, background: PixelFlow) -> None:
        super().__init__()
        if main.input_shape != background.input_shape:
            raise ValueError(
                f"background flow input {background.input_shape} differs from the model's {main.input_shape}"
            )
        self.main = main
        self.background = background
        self.input_shape = main.input_shape
        self.num_dims = main.num_dims
        self.config = main.config

    def log_likelihood(self, images: Tensor) -> Tensor:
        return self.main.log_likelihood(images)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        log_likelihood = self.main.log_likelihood(images)
        background = self.background.log_likelihood(images)
        return log_likelihood, bits_per_dim(log_likelihood, self.num_dims), background
