"""Max-norm gradient noise (Li et al., ICLR'22 "Label leakage and protection in two-party split learning").

Positive and negative examples' cut gradients differ in norm; scaling example i's gradient by
(1 + sigma_i * xi_i), xi_i ~ N(0, 1), with sigma_i = sqrt(max_j ||g_j||^2 / ||g_i||^2 - 1) gives every
example in the micro-batch the expected squared norm of the largest one. A micro-batch of one
sequence is left as is (nothing to equalize against).
"""
from __future__ import annotations

import torch

from edge_runtime.privacy.base import GradientMechanism


class MaxNormMechanism(GradientMechanism):
    def apply(self, grad, generator):
        squared = grad.flatten(1).pow(2).sum(dim=1)  # [B]
        sigma = (squared.max() / squared.clamp_min(1e-30) - 1).clamp_min(0).sqrt()  # [B]
        xi = torch.randn(squared.shape, generator=generator, dtype=grad.dtype)  # [B]
        return grad * (1 + sigma * xi).view(-1, *[1] * (grad.dim() - 1))
