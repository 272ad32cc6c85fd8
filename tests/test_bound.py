"""The variational bound in bits/dim against an independent float64 computation: Gaussian data,
whose optimal eps-network is known in closed form."""

import math

import numpy as np
import pytest
import torch

from ddpm.diffusion import GaussianDiffusion, discretized_gaussian_log_likelihood
from ddpm.schedules import make_beta_schedule

T = 60
M, S = 0.1, 0.5  # the data: every coordinate ~ N(M, S^2)


def phi(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))


def reference_bound(x0, noises, betas, variance, num_levels):
    """Every term of L_T + sum_t L_{t-1} + L_0 by hand, in bits/dim (numpy float64)."""
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    beta_tilde = (1 - abar_prev) / (1 - abar) * betas
    terms = np.zeros((x0.shape[0], T))
    for t in range(T):
        xt = math.sqrt(abar[t]) * x0 + math.sqrt(1 - abar[t]) * noises[t]
        eps = (
            math.sqrt(1 - abar[t]) * (xt - math.sqrt(abar[t]) * M) / (abar[t] * S**2 + 1 - abar[t])
        )
        pred_x0 = (xt - math.sqrt(1 - abar[t]) * eps) / math.sqrt(abar[t])

        def posterior_mean(x_start, t=t, xt=xt):
            c1 = math.sqrt(abar_prev[t]) * betas[t] / (1 - abar[t])
            c2 = math.sqrt(1 - betas[t]) * (1 - abar_prev[t]) / (1 - abar[t])
            return c1 * x_start + c2 * xt

        if variance == "beta":
            p_var = beta_tilde[1] if t == 0 else betas[t]
        else:
            p_var = beta_tilde[1] if t == 0 else beta_tilde[t]
        p_mean = posterior_mean(pred_x0)
        if t == 0:
            h = 1 / (num_levels - 1)
            sd = math.sqrt(p_var)
            up = np.where(x0 > 1 - h / 2, 1.0, phi((x0 + h - p_mean) / sd))
            lo = np.where(x0 < -1 + h / 2, 0.0, phi((x0 - h - p_mean) / sd))
            terms[:, 0] = -np.log2(up - lo).mean(axis=1)
        else:
            q_mean, q_var = posterior_mean(x0), beta_tilde[t]
            kl = 0.5 * (np.log(p_var / q_var) + (q_var + (q_mean - p_mean) ** 2) / p_var - 1)
            terms[:, t] = kl.mean(axis=1) / math.log(2)
    a = abar[-1]
    prior = (0.5 * (-1 - math.log(1 - a) + (1 - a) + a * x0**2)).mean(axis=1) / math.log(2)
    return terms, prior


@pytest.mark.parametrize("variance", ["beta", "tilde_beta"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_bound_of_the_optimal_network_for_gaussian_data(variance: str, schedule: str) -> None:
    betas = make_beta_schedule(schedule, T)
    d = GaussianDiffusion(betas, variance=variance)
    levels = 256
    g = torch.Generator().manual_seed(0)
    x0 = M + S * torch.randn(5, 3, generator=g, dtype=torch.float64)
    x0 = ((x0.clamp(-1, 1) + 1) / 2 * (levels - 1)).round() / (levels - 1) * 2 - 1
    x0[0, 0], x0[1, 1] = -1.0, 1.0  # the two outer bins

    abar = torch.cumprod(1 - betas, 0)

    def eps_star(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = abar[t][:, None]
        return (1 - a).sqrt() * (x - a.sqrt() * M) / (a * S**2 + 1 - a)

    out = d.nll_bpd(eps_star, x0, num_levels=levels, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    noises = [torch.randn(x0.shape, generator=g).double().numpy() for _ in range(T)]
    terms, prior = reference_bound(x0.numpy(), noises, betas.numpy(), variance, levels)

    np.testing.assert_allclose(out["terms_bpd"].numpy(), terms, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(out["prior_bpd"].numpy(), prior, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(out["total_bpd"].numpy(), terms.sum(1) + prior, rtol=1e-8)
    assert out["terms_bpd"].shape == (5, T) and bool((out["terms_bpd"][:, 1:] >= 0).all())


def test_discretized_likelihood_sums_to_one_over_the_levels() -> None:
    levels = 17
    x = torch.linspace(-1, 1, levels, dtype=torch.float64)
    for mean, log_scale in [(0.0, -3.0), (0.93, -1.0), (-2.0, 0.5), (0.3, -9.0)]:
        logp = discretized_gaussian_log_likelihood(
            x, torch.tensor(mean).double(), torch.tensor(log_scale).double(), levels
        )
        assert torch.isfinite(logp).all()
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_terms_are_finite_at_t0_where_the_posterior_variance_is_zero() -> None:
    d = GaussianDiffusion(make_beta_schedule("linear", 100))
    x0 = torch.zeros(2, 1, 4, 4)
    t = torch.tensor([0, 1])
    out = d.vb_terms_bpd(torch.zeros_like(x0), x0, d.q_sample(x0, t), t, num_levels=256)
    assert torch.isfinite(out).all() and out.dtype == torch.float32


def reference_log_bin(x: float, mean: float, scale: float, num_levels: int) -> float:
    """log P(bin of x) under N(mean, scale^2) with 50-digit arithmetic (mpmath), each bin's mass
    taken as a difference within the tail it lies in."""
    import mpmath

    mpmath.mp.dps = 50
    h = mpmath.mpf(1) / (num_levels - 1)
    x, mean, scale = mpmath.mpf(x), mpmath.mpf(mean), mpmath.mpf(scale)
    a, b = (x - mean - h) / scale, (x - mean + h) / scale
    if x < -1 + h / 2:
        return float(mpmath.log(mpmath.ncdf(b)))
    if x > 1 - h / 2:
        return float(mpmath.log(mpmath.ncdf(-a)))
    if b <= 0:
        mass = mpmath.ncdf(b) - mpmath.ncdf(a)
    elif a >= 0:
        mass = mpmath.ncdf(-a) - mpmath.ncdf(-b)
    else:
        mass = 1 - mpmath.ncdf(a) - mpmath.ncdf(-b)
    return float(mpmath.log(mass))


@pytest.mark.parametrize("num_levels", [17, 256])
def test_discretized_likelihood_is_exact_far_in_the_tails(num_levels: int) -> None:
    """Every bin (outer and inner), the mean up to 40 levels away and scales from 1e-3 to 2:
    within 1e-12 (relative, or absolute near 0) of the 50-digit value. A difference of ndtr
    values would floor such a bin at log(1e-300), ~996.6 bits, where the truth is ~56 bits."""
    cases = []
    for k in (0, 1, num_levels // 2, num_levels - 2, num_levels - 1):
        x = -1 + 2 * k / (num_levels - 1)
        for offset in (-40, -9, -1, -0.3, 0, 0.4, 1, 8.5, 35):
            for scale in (1e-3, 0.01, 0.05, 0.3, 2.0):
                cases.append((x, x + offset * 2 / (num_levels - 1), scale))
    x, mean, scale = (torch.tensor(c, dtype=torch.float64) for c in zip(*cases, strict=True))
    got = discretized_gaussian_log_likelihood(x, mean, scale.log(), num_levels)
    expected = torch.tensor([reference_log_bin(*c, num_levels) for c in cases], dtype=torch.float64)
    assert torch.isfinite(got).all()
    assert ((got - expected).abs() / expected.abs().clamp(min=1)).max() < 1e-12
    # The example: 17 levels, the mean one level off, a bin ~8.5 sigma out: ~56 bits.
    h = 2 / 16
    one = discretized_gaussian_log_likelihood(
        torch.tensor([0.0], dtype=torch.float64),
        torch.tensor([h], dtype=torch.float64),
        torch.tensor([math.log(h / 2 / 8.8)], dtype=torch.float64),
        17,
    )
    assert 40 < -one.item() / math.log(2) < 80


def test_clipped_bound_is_the_bound_of_the_clipped_eps() -> None:
    """vb_terms_bpd with clip_denoised equals, computed independently, the unclipped terms of the
    eps that the clamped predicted x_0 implies (eq. 4 solved for eps)."""
    diffusion = GaussianDiffusion(make_beta_schedule("linear", T))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 17, (6, 1, 4, 4), generator=g).double() / 8 - 1
    t = torch.tensor([0, 1, 5, 20, 40, 59])
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_t = diffusion.q_sample(x0, t, noise)
    eps = 3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)  # pred_x0 well outside
    abar = diffusion.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    pred_x0 = ((x_t - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
    clipped_eps = (x_t - abar.sqrt() * pred_x0) / (1 - abar).sqrt()
    got = diffusion.vb_terms_bpd(eps, x0, x_t, t, 17, clip_denoised=True)
    expected = diffusion.vb_terms_bpd(clipped_eps, x0, x_t, t, 17)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got, diffusion.vb_terms_bpd(eps, x0, x_t, t, 17))
