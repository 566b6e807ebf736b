"""d_chi-privacy (SnD, arXiv 2310.09130): noise density proportional to exp(-epsilon * ||n||) per token."""
from __future__ import annotations

import torch

from edge_runtime.privacy.base import HiddenMechanism


class DChiMechanism(HiddenMechanism):
    """n = r * u: u uniform on the unit sphere (a normalized N(0, I) draw), r ~ Gamma(shape d, scale 1/epsilon).

    Not Gamma per coordinate times Uniform(-1, 1) (a bug in public SnD code): that has a different
    density. For integer d, Gamma(d, 1/epsilon) is a sum of d Exp(epsilon) draws, which a
    torch.Generator can produce exactly.
    """

    def __init__(self, epsilon: float, clip: float) -> None:
        super().__init__(clip)
        self.epsilon = epsilon

    def noise(self, shape, generator):
        *tokens, dim = shape
        direction = torch.randn(shape, generator=generator, dtype=torch.float64)  # [..., d]
        direction = direction / direction.norm(dim=-1, keepdim=True)
        uniforms = torch.rand(shape, generator=generator, dtype=torch.float64)  # [..., d]: d exponentials per token
        radius = -torch.log1p(-uniforms).sum(dim=-1, keepdim=True) / self.epsilon  # [..., 1]
        return (radius * direction).to(torch.float32)

    def mean_noise_norm(self, dim):
        return dim / self.epsilon
