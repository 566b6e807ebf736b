"""The two mechanism interfaces, per-token clipping, and the owner's noise stream."""
from __future__ import annotations

import hashlib
import secrets
from abc import ABC, abstractmethod

import torch


class HiddenMechanism(ABC):
    """Privatizes hidden states [B, T, d] per token: clip each token's vector to L2 norm ``clip``, add noise.

    ``apply`` is differentiable in x (the owner backpropagates through the clip; the noise is a constant),
    so the owner's graph matches what the next stage computes on.
    """

    def __init__(self, clip: float) -> None:
        self.clip = clip

    def apply(self, x: torch.Tensor, generator: torch.Generator, public: int = 0) -> torch.Tensor:
        """Positions < public (dim -2) pass untouched: under causal attention their states depend only on
        the shared public prefix. The noise is drawn for the full shape and its positions < public are
        dropped, so the noise a position gets does not depend on public."""
        return self.add_noise(x, self.noise(tuple(x.shape), generator).to(x.dtype), public)

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, public: int = 0) -> torch.Tensor:
        """clip(x) + noise (same shape as x) at positions >= public; positions < public pass untouched."""
        private = clip_tokens(x[..., public:, :], self.clip) + noise[..., public:, :]
        return torch.cat([x[..., :public, :], private], dim=-2) if public else private

    @abstractmethod
    def noise(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Noise of this shape (last dimension = the token vector), drawn from the generator."""

    @abstractmethod
    def mean_noise_norm(self, dim: int) -> float:
        """Expected L2 norm of one token's noise vector in dimension dim."""


class GradientMechanism(ABC):
    """Privatizes the gradient [B, T, d] the owner's tail sends back (it carries label information)."""

    @abstractmethod
    def apply(self, grad: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The privatized gradient, same shape."""


def clip_tokens(x: torch.Tensor, bound: float) -> torch.Tensor:
    """Scale every token vector (last dim) whose L2 norm exceeds bound down to norm bound."""
    norms = x.norm(dim=-1, keepdim=True)  # [..., 1]
    return x * torch.clamp(bound / norms.clamp_min(1e-12), max=1.0)


class NoiseStream:
    """Independent generators per (global step, micro-batch, stage, purpose), so the noise depends neither on
    the order a schedule runs micro-batches in nor on how often or on which split a step ran (a step
    replayed after a restore draws the same noise). The stage is the owner's role (head, tail), which a
    re-plan keeps, not its ring index, which a re-plan changes. The seed comes from the run's settings (reproducible runs)
    or from the operating system's CSPRNG (``secrets``) when none is given."""

    def __init__(self, seed: int | None) -> None:
        self.seed = secrets.randbits(64) if seed is None else seed

    def generator(self, step: int, microbatch: int, stage: str, purpose: str) -> torch.Generator:
        key = f"{self.seed}/{step}/{microbatch}/{stage}/{purpose}"
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
