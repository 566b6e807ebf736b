"""The Gaussian mechanism: clip each token to L2 norm C, add N(0, sigma^2 I)."""
from __future__ import annotations

import math

import torch

from edge_runtime.privacy.base import HiddenMechanism


class GaussianMechanism(HiddenMechanism):
    """Per token (epsilon, delta)-DP with sensitivity 2C: see PrivacySpec.token_epsilon."""

    def __init__(self, sigma: float, clip: float) -> None:
        super().__init__(clip)
        self.sigma = sigma

    def noise(self, shape, generator):
        return torch.randn(shape, generator=generator) * self.sigma

    def mean_noise_norm(self, dim):
        # E ||N(0, sigma^2 I_d)|| = sigma * sqrt(2) * Gamma((d+1)/2) / Gamma(d/2)
        return self.sigma * math.sqrt(2) * math.exp(math.lgamma((dim + 1) / 2) - math.lgamma(dim / 2))
