"""DiagonalGaussianDistribution against torch.distributions and diffusers' implementation."""

import math

import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as DiffusersGaussian
from torch.distributions import Normal, kl_divergence

from latentvae import DiagonalGaussianDistribution


def moments(batch=3, channels=4, size=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(batch, channels, size, size, generator=g)
    logvar = torch.randn(batch, channels, size, size, generator=g) - 1.0
    return torch.cat([mean, logvar], dim=1)


def test_mean_logvar_split_and_derived_quantities():
    params = moments()
    q = DiagonalGaussianDistribution(params)
    torch.testing.assert_close(q.mean, params[:, :4])
    torch.testing.assert_close(q.logvar, params[:, 4:])
    torch.testing.assert_close(q.var, params[:, 4:].exp())
    torch.testing.assert_close(q.std, params[:, 4:].exp().sqrt())
    assert q.mode() is q.mean


def test_logvar_is_clamped_to_minus_30_plus_20():
    params = torch.zeros(1, 2, 1, 3)
    params[0, 1, 0] = torch.tensor([-100.0, 0.0, 100.0])
    q = DiagonalGaussianDistribution(params)
    assert q.logvar.flatten().tolist() == [-30.0, 0.0, 20.0]
    assert torch.isfinite(q.var).all() and torch.isfinite(q.kl()).all()


def test_kl_to_standard_normal_equals_torch_distributions():
    q = DiagonalGaussianDistribution(moments())
    expected = kl_divergence(Normal(q.mean, q.std), Normal(0.0, 1.0)).sum(dim=[1, 2, 3])
    torch.testing.assert_close(q.kl(), expected)


def test_kl_between_two_gaussians_equals_torch_distributions():
    p, q = DiagonalGaussianDistribution(moments(seed=1)), DiagonalGaussianDistribution(moments(seed=2))
    expected = kl_divergence(Normal(p.mean, p.std), Normal(q.mean, q.std)).sum(dim=[1, 2, 3])
    torch.testing.assert_close(p.kl(q), expected)


def test_nll_equals_minus_log_prob():
    q = DiagonalGaussianDistribution(moments())
    x = torch.randn_like(q.mean)
    torch.testing.assert_close(q.nll(x), -Normal(q.mean, q.std).log_prob(x).sum(dim=[1, 2, 3]))
    torch.testing.assert_close(q.nll(x, dims=(1,)), -Normal(q.mean, q.std).log_prob(x).sum(dim=1))


def test_monte_carlo_kl_from_reparameterised_samples_agrees():
    """E_q[log q(z) - log N(z; 0, I)] over samples z = mu + sigma * eps estimates the closed-form KL."""
    q = DiagonalGaussianDistribution(moments(batch=1, channels=2, size=3))
    n = 20000
    g = torch.Generator().manual_seed(0)
    z = torch.stack([q.sample(generator=g)[0] for _ in range(n)])  # (n, C, H, W)
    log_ratio = Normal(q.mean[0], q.std[0]).log_prob(z) - Normal(0.0, 1.0).log_prob(z)
    estimates = log_ratio.sum(dim=[1, 2, 3])
    standard_error = estimates.std() / math.sqrt(n)
    assert abs(estimates.mean() - q.kl()[0]) < 4 * standard_error


def test_sample_is_reproducible_and_matches_diffusers():
    params = moments()
    ours, ref = DiagonalGaussianDistribution(params), DiffusersGaussian(params)
    a = ours.sample(generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, ours.sample(generator=torch.Generator().manual_seed(7)), rtol=0, atol=0)
    torch.testing.assert_close(a, ref.sample(generator=torch.Generator().manual_seed(7)), rtol=0, atol=0)
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    expected = ref.sample(generator=[torch.Generator().manual_seed(i) for i in range(3)])
    torch.testing.assert_close(ours.sample(generator=generators), expected, rtol=0, atol=0)
    assert not torch.equal(a, ours.sample(generator=torch.Generator().manual_seed(8)))


def test_sample_gradients_reach_mean_and_logvar():
    """dz/dmu = 1 and dz/dlogvar = 0.5 * sigma * eps for z = mu + exp(logvar / 2) * eps."""
    params = moments().requires_grad_(True)
    q = DiagonalGaussianDistribution(params)
    z = q.sample(generator=torch.Generator().manual_seed(3))
    z.sum().backward()
    eps = (z - q.mean) / q.std
    torch.testing.assert_close(params.grad[:, :4], torch.ones_like(q.mean))
    torch.testing.assert_close(params.grad[:, 4:], (0.5 * q.std * eps).detach())


def test_deterministic_is_a_point_mass():
    q = DiagonalGaussianDistribution(moments(), deterministic=True)
    assert torch.equal(q.sample(generator=torch.Generator().manual_seed(0)), q.mean)
    assert torch.equal(q.kl(), torch.zeros(3)) and torch.equal(q.std, torch.zeros_like(q.mean))


def test_cuda_generator_for_cpu_latents_is_refused():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    q = DiagonalGaussianDistribution(moments())
    with pytest.raises(ValueError, match="generator"):
        q.sample(generator=torch.Generator("cuda"))
