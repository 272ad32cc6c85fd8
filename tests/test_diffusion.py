"""GaussianDiffusion against independent float64 computations (grids, closed forms, Monte Carlo)."""

import math

import numpy as np
import pytest
import torch

from ddpm.diffusion import GaussianDiffusion
from ddpm.schedules import make_beta_schedule

T = 100


def schedule_np(name: str = "linear") -> tuple[np.ndarray, np.ndarray]:
    """betas and abar as plain float64 numpy arrays, computed outside the class under test."""
    betas = make_beta_schedule(name, T).numpy()
    return betas, np.cumprod(1.0 - betas)


def gauss(x: np.ndarray, mean: float, var: float) -> np.ndarray:
    return np.exp(-((x - mean) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("t", [1, 2, 37, T - 1])
def test_posterior_matches_bayes_rule_on_a_grid(name: str, t: int) -> None:
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), normalised numerically."""
    betas, abar = schedule_np(name)
    x0, xt = 0.7, -0.4
    grid = np.linspace(-12, 12, 400_001)
    density = gauss(xt, math.sqrt(1 - betas[t]) * grid, betas[t]) * gauss(
        grid, math.sqrt(abar[t - 1]) * x0, 1 - abar[t - 1]
    )
    weights = density / density.sum()
    mean = (weights * grid).sum()
    var = (weights * (grid - mean) ** 2).sum()

    d = GaussianDiffusion(make_beta_schedule(name, T))
    tt = torch.tensor([t])
    m, v, logv = d.q_posterior_mean_variance(
        torch.tensor([[x0]], dtype=torch.float64), torch.tensor([[xt]], dtype=torch.float64), tt
    )
    assert m.item() == pytest.approx(mean, rel=1e-6, abs=1e-9)
    assert v.item() == pytest.approx(var, rel=1e-6)
    assert logv.item() == pytest.approx(math.log(var), abs=1e-6)


def test_posterior_at_t0_is_x0_with_zero_variance_and_clipped_log() -> None:
    betas, abar = schedule_np()
    d = GaussianDiffusion(torch.from_numpy(betas))
    x0, xt = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[0.9]], dtype=torch.float64)
    m, v, logv = d.q_posterior_mean_variance(x0, xt, torch.tensor([0]))
    assert m.item() == pytest.approx(0.3, abs=1e-12)
    assert v.item() == 0.0
    beta_tilde_1 = (1 - abar[0]) / (1 - abar[1]) * betas[1]
    assert logv.item() == pytest.approx(math.log(beta_tilde_1), rel=1e-12)
    assert torch.isfinite(d.posterior_log_variance_clipped).all()


def test_q_sample_moments_monte_carlo() -> None:
    """Mean sqrt(abar) x0 and variance 1 - abar, within 5 standard errors over 400k draws."""
    _, abar = schedule_np()
    d = GaussianDiffusion(make_beta_schedule("linear", T))
    n, x0 = 400_000, 0.8
    torch.manual_seed(0)
    for t in [0, 10, 60, T - 1]:
        x = d.q_sample(torch.full((n, 1), x0, dtype=torch.float64), torch.full((n,), t))
        mean, var = x.mean().item(), x.var().item()
        sd = math.sqrt(1 - abar[t])
        assert abs(mean - math.sqrt(abar[t]) * x0) < 5 * sd / math.sqrt(n)
        assert abs(var - (1 - abar[t])) < 5 * (1 - abar[t]) * math.sqrt(2 / n)


@pytest.mark.parametrize("variance", ["beta", "tilde_beta"])
def test_p_sample_with_perfect_eps_is_posterior_mean_plus_sigma_noise(variance: str) -> None:
    betas, abar = schedule_np()
    d = GaussianDiffusion(torch.from_numpy(betas), variance=variance)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(T, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.arange(T)
    xt = d.q_sample(x0, t, eps)
    out = d.p_sample(eps, xt, t, noise)

    c = lambda a: torch.from_numpy(a).reshape(-1, 1, 1, 1)  # noqa: E731
    abar_prev = np.append(1.0, abar[:-1])
    mean = (
        c(np.sqrt(abar_prev) * betas / (1 - abar)) * x0
        + c(np.sqrt(1 - betas) * (1 - abar_prev) / (1 - abar)) * xt
    )
    beta_tilde = (1 - abar_prev) / (1 - abar) * betas
    sigma2 = betas if variance == "beta" else beta_tilde
    sigma = c(np.sqrt(sigma2))
    sigma[0] = 0.0  # no noise at the last step
    torch.testing.assert_close(out, mean + sigma * noise, rtol=1e-9, atol=1e-9)
    assert torch.equal(out[0], d.p_mean_variance(eps, xt, t)[0][0])  # exactly no noise at t = 0


def test_p_mean_is_equation_11_without_clipping() -> None:
    betas, abar = schedule_np("cosine")
    d = GaussianDiffusion(torch.from_numpy(betas))
    g = torch.Generator().manual_seed(2)
    xt = torch.randn(T, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(T, 5, generator=g, dtype=torch.float64)
    mean, var, logvar, _ = d.p_mean_variance(eps, xt, torch.arange(T))
    b, a = torch.from_numpy(betas)[:, None], torch.from_numpy(abar)[:, None]
    expected = (xt - b / torch.sqrt(1 - a) * eps) / torch.sqrt(1 - b)
    torch.testing.assert_close(mean, expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(var.log(), logvar)
    # variance="beta": beta_t for t > 0, and beta_tilde at t = 1 in place of t = 0.
    torch.testing.assert_close(var[1:, 0], b[1:, 0])
    assert var[0, 0].item() == pytest.approx((1 - abar[0]) / (1 - abar[1]) * betas[1])


def test_dtype_follows_input_and_buffers_stay_float64() -> None:
    d = GaussianDiffusion(make_beta_schedule("linear", T))
    assert d.betas.dtype == torch.float64
    d = d.to(torch.float32).half()
    assert d.alphas_cumprod.dtype == torch.float64
    x = torch.randn(4, 2)
    t = torch.tensor([0, 1, 50, 99])
    assert d.q_sample(x, t).dtype == torch.float32
    assert d.p_sample(x, x, t, x).dtype == torch.float32
    assert d.training_loss(lambda x, t: x, x).dtype == torch.float32
    assert "betas" not in d.state_dict()


def test_training_loss_is_l_simple() -> None:
    d = GaussianDiffusion(make_beta_schedule("linear", T))
    x0 = torch.randn(8, 1, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.randint(0, T, (8,))
    # A network that knows the noise has zero loss; one that predicts 0 pays E||eps||^2.
    abar = torch.cumprod(1 - make_beta_schedule("linear", T), 0).float()

    def oracle(x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        a = abar[tt].reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    loss = d.training_loss(oracle, x0, t, noise)
    assert loss.shape == (8,)
    assert loss.abs().max().item() < 1e-8
    zero = d.training_loss(lambda x, tt: torch.zeros_like(x), x0, t, noise)
    torch.testing.assert_close(zero, noise.pow(2).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("variance", ["beta", "tilde_beta"])
def test_sample_loop_with_the_exact_eps_of_a_point_mass_returns_the_point(variance: str) -> None:
    """For data x0 = c the optimal eps is (x_t - sqrt(abar) c) / sqrt(1 - abar); the chain
    must end exactly at c (whatever the noise), and be repeatable from a seed."""
    d = GaussianDiffusion(make_beta_schedule("cosine", 40), variance=variance)
    c = torch.tensor([0.25, -0.5])

    def eps_star(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = d.alphas_cumprod[t].float()[:, None]
        return (x - a.sqrt() * c) / (1 - a).sqrt()

    out = d.sample_loop(
        eps_star, (16, 2), generator=torch.Generator().manual_seed(0), clip_denoised=False
    )
    torch.testing.assert_close(out, c.expand(16, 2), atol=1e-5, rtol=0)
    noisy = lambda x, t: torch.randn_like(x)  # noqa: E731
    torch.manual_seed(3)
    a = d.sample_loop(noisy, (4, 2), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(3)
    b = d.sample_loop(noisy, (4, 2), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"variance": "fixed"},
            r"variance='fixed' is unknown: allowed are beta, tilde_beta, learned",
        ),
        ({"prediction": "noise"}, r"prediction='noise' is unknown: allowed are eps, x0, mean, v\."),
        ({"loss": "l2"}, r"loss='l2' is unknown: allowed are simple, hybrid, vlb\."),
        ({"variance": "learned"}, r"loss=simple with variance=learned: .* nothing would train"),
        ({"loss": "hybrid"}, r"loss=hybrid with variance=beta: .*trains only a learned variance"),
        ({"vlb_weight": 0.0}, r"loss.vlb_weight=0.0 is invalid: it must be a number > 0\."),
        ({"weighting": "min_snr", "min_snr_gamma": -1}, r"loss.min_snr_gamma=-1 is invalid"),
        ({"weighting": "snr", "loss": "vlb"}, r"loss.weighting=snr with loss=vlb: .*allowed"),
        ({"weighting": "p2"}, r"loss.weighting='p2' is unknown: allowed are none, snr, min_snr"),
    ],
)
def test_bad_parameterisations_are_one_sentence(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GaussianDiffusion(make_beta_schedule("linear", T), **kwargs)


def test_bad_betas() -> None:
    with pytest.raises(ValueError, match=r"strictly inside \(0, 1\)"):
        GaussianDiffusion([0.1, 1.0])


def test_single_step_chain_is_finite() -> None:
    d = GaussianDiffusion([0.5])
    assert torch.isfinite(d.model_log_variance).all()
    out = d.sample_loop(
        lambda x, t: torch.zeros_like(x),
        (3, 2),
        generator=torch.Generator().manual_seed(0),
        clip_denoised=False,
    )
    # One step from x_1 with eps = 0: x_0 = x_1 / sqrt(abar_1), and no noise added.
    x1 = torch.randn((3, 2), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x1 / math.sqrt(0.5))
