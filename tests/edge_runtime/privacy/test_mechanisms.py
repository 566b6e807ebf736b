"""The mechanisms have the stated distributions (fixed-seed statistical tests) and bounds."""
import math

import pytest
import torch

from edge_runtime.privacy.base import NoiseStream, clip_tokens
from edge_runtime.privacy.dchi import DChiMechanism
from edge_runtime.privacy.gaussian import GaussianMechanism
from edge_runtime.privacy.maxnorm import MaxNormMechanism


def ks_statistic(samples: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov distance between the samples' empirical CDF and cdf."""
    ordered = samples.double().sort().values
    n = len(ordered)
    model = cdf(ordered)
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - model
    below = model - torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum(above, below).max())


def ks_critical(n: int, alpha: float = 0.001) -> float:
    return math.sqrt(-0.5 * math.log(alpha / 2) / n)


@pytest.mark.parametrize("dim,epsilon", [(8, 2.0), (64, 10.0)])
def test_dchi_radius_is_gamma_and_direction_uniform(dim, epsilon):
    n = 4000
    noise = DChiMechanism(epsilon, clip=1.0).noise((n, dim), torch.Generator().manual_seed(1))  # [n, d]
    radius = noise.norm(dim=-1)
    # Gamma(shape d, scale 1/epsilon): CDF is the regularized lower incomplete gamma function
    assert ks_statistic(radius, lambda r: torch.special.gammainc(torch.tensor(float(dim), dtype=torch.float64),
                                                                 epsilon * r)) < ks_critical(n)
    assert abs(float(radius.mean()) - dim / epsilon) < 4 * math.sqrt(dim) / epsilon / math.sqrt(n)
    direction = (noise / radius[:, None]).double()
    assert float(direction.mean(0).abs().max()) < 4 / math.sqrt(n * dim)  # mean of a uniform unit vector is 0
    covariance = direction.T @ direction / n  # [d, d]; for a uniform direction: I / d
    assert float((covariance - torch.eye(dim, dtype=torch.float64) / dim).abs().max()) < 5 / (dim * math.sqrt(n)) * 2
    # one coordinate of a uniform unit vector: (u1 + 1) / 2 ~ Beta((d-1)/2, (d-1)/2)
    half = torch.tensor((dim - 1) / 2, dtype=torch.float64)
    beta_cdf = lambda u: _beta_cdf((u + 1) / 2, half)
    assert ks_statistic(direction[:, 0], beta_cdf) < ks_critical(n)


def _beta_cdf(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """CDF of Beta(a, a) by numerical integration on a fine grid (torch has no incomplete beta)."""
    grid = torch.linspace(0, 1, 200_001, dtype=torch.float64)[1:-1]
    density = torch.exp((a - 1) * (torch.log(grid) + torch.log1p(-grid)))
    cumulative = torch.cumsum(density, 0)
    cumulative = cumulative / cumulative[-1]
    return cumulative[torch.searchsorted(grid, x.clamp(grid[0], grid[-1]))]


def test_gaussian_noise_is_normal_with_sigma():
    noise = GaussianMechanism(sigma=0.7, clip=1.0).noise((2000, 16), torch.Generator().manual_seed(2)).flatten()
    normal = torch.distributions.Normal(0.0, 0.7)
    assert ks_statistic(noise, lambda v: normal.cdf(v)) < ks_critical(len(noise))
    expected = GaussianMechanism(0.7, 1.0).mean_noise_norm(16)
    assert abs(float(noise.view(-1, 16).norm(dim=-1).mean()) - expected) < 0.05 * expected


def test_clipping_bounds_each_token_and_keeps_small_ones():
    x = torch.randn(3, 5, 8) * torch.tensor([0.01, 1.0, 100.0]).view(3, 1, 1)
    clipped = clip_tokens(x, 2.0)
    assert float(clipped.norm(dim=-1).max()) <= 2.0 + 1e-5
    small = x.norm(dim=-1) <= 2.0
    assert torch.equal(clipped[small], x[small])
    cosine = torch.nn.functional.cosine_similarity(clipped, x, dim=-1)
    assert float(cosine.min()) > 1 - 1e-5  # clipping alone keeps the direction: noise must do the work


def test_mechanism_output_is_clipped_input_plus_its_noise():
    mechanism = DChiMechanism(epsilon=5.0, clip=1.5)
    x = torch.randn(2, 4, 8) * 3
    out = mechanism.apply(x, torch.Generator().manual_seed(9))
    noise = mechanism.noise(tuple(x.shape), torch.Generator().manual_seed(9))
    assert torch.allclose(out, clip_tokens(x, 1.5) + noise)


def test_maxnorm_equalizes_expected_squared_norms():
    grad = torch.randn(4, 6, 8) * torch.tensor([1.0, 2.0, 0.5, 4.0]).view(4, 1, 1)
    mechanism = MaxNormMechanism()
    squared = torch.stack([mechanism.apply(grad, torch.Generator().manual_seed(s)).flatten(1).pow(2).sum(1)
                           for s in range(4000)])  # [draws, B]
    target = grad.flatten(1).pow(2).sum(1).max()
    assert torch.allclose(squared.mean(0), target.expand(4), rtol=0.1)
    largest = int(grad.flatten(1).norm(dim=1).argmax())
    assert torch.equal(mechanism.apply(grad, torch.Generator().manual_seed(0))[largest], grad[largest])


def test_noise_stream_depends_on_step_microbatch_stage_and_purpose_only():
    a, b = NoiseStream(7), NoiseStream(7)
    draw = lambda stream, *key: torch.rand(3, generator=stream.generator(*key))
    assert torch.equal(draw(a, 1, 2, "head", "hidden"), draw(b, 1, 2, "head", "hidden"))
    assert not torch.equal(draw(a, 1, 2, "head", "hidden"), draw(a, 1, 3, "head", "hidden"))
    assert not torch.equal(draw(a, 1, 2, "head", "hidden"), draw(a, 2, 2, "head", "hidden"))
    assert not torch.equal(draw(a, 1, 2, "head", "hidden"), draw(a, 1, 2, "tail", "hidden"))
    assert not torch.equal(draw(a, 1, 2, "head", "hidden"), draw(a, 1, 2, "head", "gradient"))
    assert NoiseStream(None).seed != NoiseStream(None).seed  # from the CSPRNG


@pytest.mark.parametrize("mechanism", [DChiMechanism(epsilon=5.0, clip=1.5), GaussianMechanism(0.5, clip=1.5)],
                         ids=["dchi", "gaussian"])
def test_public_positions_pass_untouched_and_the_rest_get_the_same_noise_as_without(mechanism):
    x = torch.randn(2, 6, 8) * 3
    everything = mechanism.apply(x, torch.Generator().manual_seed(9))
    noise = mechanism.noise(tuple(x.shape), torch.Generator().manual_seed(9))
    assert torch.equal(everything, clip_tokens(x, 1.5) + noise)  # public=0: exactly as before
    out = mechanism.apply(x, torch.Generator().manual_seed(9), public=2)
    assert torch.equal(out[:, :2], x[:, :2])  # bit-identical
    assert torch.equal(out[:, 2:], everything[:, 2:])  # the noise of a position does not depend on public
    assert bool((out[:, 2:] != x[:, 2:]).all(dim=-1).all())


def test_backward_through_public_positions_is_the_identity_and_through_the_rest_the_clip():
    mechanism = DChiMechanism(epsilon=5.0, clip=1.5)
    x = (torch.randn(2, 6, 8) * 3).requires_grad_(True)
    weight = torch.randn(2, 6, 8)
    (mechanism.apply(x, torch.Generator().manual_seed(1), public=2) * weight).sum().backward()
    clipped = x.detach().clone().requires_grad_(True)
    (clip_tokens(clipped, 1.5) * weight).sum().backward()
    assert torch.equal(x.grad[:, :2], weight[:, :2])
    assert torch.allclose(x.grad[:, 2:], clipped.grad[:, 2:])
