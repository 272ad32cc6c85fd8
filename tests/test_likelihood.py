"""The probability-flow ODE's likelihood (`ddpm.likelihood`) against independent computations: the
exact density of a known mixture (with the Bayes-optimal network, the flow carries the true
marginals, so its NLL is the true one), a scipy integration of the same ODE written here in
another time variable and form, finite differences and Monte Carlo for the divergence."""

import math

import numpy as np
import pytest
import torch

from ddpm.data.gmm import make_mixture
from ddpm.diffusion import GaussianDiffusion
from ddpm.likelihood import ODESettings, divergence, ode_nll
from ddpm.samplers.ode import SIGMA_AT_DATA
from ddpm.schedules import make_beta_schedule
from ddpm.truth import Oracle


def test_continuous_time_is_the_chain_at_its_steps_and_log_alpha_linear_between() -> None:
    """At the steps the continuous schedule is the chain's (abar and every coefficient of every
    prediction); at s = -1 it is the data (abar = 1); halfway between two steps abar is their
    geometric mean (log alpha linear in s); `step_at` inverts `log_alpha_at`."""
    T = 50
    for prediction in ("eps", "x0", "mean", "v"):
        diffusion = GaussianDiffusion(make_beta_schedule("cosine", T), prediction=prediction)
        steps = torch.arange(T)
        x = torch.zeros(T, 1, dtype=torch.float64)
        table, continuous = (
            diffusion.coefficients(steps, x),
            diffusion.coefficients(steps.double(), x),
        )
        for name, a, b in zip(table._fields, table, continuous, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14, msg=f"{prediction} {name}")
    abar = torch.cat([torch.ones(1, dtype=torch.float64), diffusion.alphas_cumprod])
    torch.testing.assert_close(diffusion.alphas_cumprod_at(steps.double()), abar[1:])
    assert diffusion.alphas_cumprod_at(torch.tensor([-1.0])).item() == 1.0
    halfway = torch.arange(-1, T - 1, dtype=torch.float64) + 0.5
    torch.testing.assert_close(diffusion.alphas_cumprod_at(halfway), (abar[:-1] * abar[1:]).sqrt())
    s = torch.rand(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = s * T - 1
    torch.testing.assert_close(diffusion.step_at(diffusion.log_alpha_at(s)), s)


def prior_mismatch(mixture, diffusion, out) -> torch.Tensor:
    """log q_T(x_T) - log N(x_T; 0, I): the flow's prior is N(0, I), the true marginal at the
    chain's last step is the mixture noised to abar_T."""
    last = torch.full((len(out["x_T"]),), diffusion.num_timesteps - 1)
    return mixture.marginal_log_prob(diffusion, out["x_T"], last) - out["prior"]


@pytest.mark.parametrize(
    ("dim", "prediction", "variance"),
    [
        (2, "eps", "beta"),
        (2, "x0", "learned_range"),
        (2, "mean", "tilde_beta"),
        (2, "v", "learned"),
        (16, "eps", "beta"),
    ],
)
def test_the_flow_of_the_bayes_optimal_network_has_the_exact_nll(dim, prediction, variance) -> None:
    """With `Oracle` (the exact E[x_0 | x_t] at any continuous step, output as each prediction
    and variance stands for), the flow's NLL of each point is the mixture's exact -log q(x) plus
    the prior's mismatch at T (computed from the truth), within 1e-3 nats at rtol = atol =
    1e-6, on the default chain (linear, T = 1000)."""
    loss = "hybrid" if variance.startswith("learned") else "simple"
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 1000), variance, prediction, loss)
    mixture = make_mixture(dim, 8, 1.0, 0.01, seed=0)
    x = mixture.sample(100, torch.Generator().manual_seed(1))
    settings = ODESettings(rtol=1e-6, atol=1e-6, divergence="exact").check(dim)
    out = ode_nll(diffusion, Oracle(mixture, diffusion), x, settings)
    exact = -mixture.log_prob(x)
    error = out["nll"] - prior_mismatch(mixture, diffusion, out) - exact
    assert error.abs().max() < 1e-3, error.abs().max()
    assert out["calls"] > 50  # adaptive: many calls at this tolerance


def test_hutchinson_flow_nll_is_unbiased_in_16_dimensions() -> None:
    """16-D, one Rademacher probe per call: each point's NLL is noisy, but the mean error over
    500 points is within 4 standard errors of 0 (plus 1e-3 for the integrator)."""
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 1000))
    mixture = make_mixture(16, 8, 1.0, 0.01, seed=0)
    x = mixture.sample(500, torch.Generator().manual_seed(2))
    settings = ODESettings(divergence="hutchinson", probes=1).check(16)
    out = ode_nll(diffusion, Oracle(mixture, diffusion), x, settings, torch.Generator())
    error = out["nll"] - prior_mismatch(mixture, diffusion, out) + mixture.log_prob(x)
    stderr = error.std() / math.sqrt(len(error))
    assert error.std() > 0.01  # the estimate is noisy per point...
    assert abs(error.mean()) < 4 * stderr + 1e-3, (error.mean(), stderr)  # ...and unbiased


class Net(torch.nn.Module):
    """A small float64 network of (x, t): a tanh layer of both, then a linear one."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim + 1, 32), torch.nn.Tanh(), torch.nn.Linear(32, dim)
        ).double()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.cat([x, t[:, None].to(x) / 10], dim=1))


def test_exact_divergence_is_the_trace_of_the_finite_difference_jacobian() -> None:
    """`divergence` (exact: a backward pass per dimension) of a network's output against the
    trace of its Jacobian by central differences (float64, h = 1e-6)."""
    net, t = Net(5), torch.full((3,), 7.5, dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    xx = x.clone().requires_grad_(True)
    found = divergence(net(xx, t), xx, None)
    h, trace = 1e-6, torch.zeros(3, dtype=torch.float64)
    for i in range(5):
        step = torch.zeros_like(x)
        step[:, i] = h
        trace += (net(x + step, t) - net(x - step, t))[:, i] / (2 * h)
    torch.testing.assert_close(found, trace, rtol=1e-7, atol=1e-8)


def test_hutchinson_divergence_is_unbiased() -> None:
    """Hutchinson's estimate with Rademacher probes: its mean over 4000 probes is the exact
    divergence within 4 standard errors (of the probes' spread), per example."""
    net, t = Net(6), torch.full((4,), 3.0, dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    xx = x.clone().requires_grad_(True)
    out = net(xx, t)
    exact = divergence(out, xx, None)
    bits = torch.randint(0, 2, (4000, 4, 6), generator=torch.Generator().manual_seed(2))
    probes = 2.0 * bits.double() - 1.0
    each = torch.stack([divergence(out, xx, v[None]) for v in probes])  # [probes, examples]
    stderr = each.std(0) / math.sqrt(len(probes))
    assert bool((each.std(0) > 1e-3).all())  # the probes disagree: an estimate, not the trace
    assert bool(((each.mean(0) - exact).abs() < 4 * stderr).all()), (each.mean(0), exact, stderr)


def stand_in(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A network of x and its (fractional) step, of order 1: 0.8 x_i + 0.3 x_j + sin(3 t / 1000)
    inside a tanh (2-D); its Jacobian's diagonal is 0.8 (1 - tanh^2)."""
    tt = t.to(x.dtype).reshape(-1, 1) / 1000
    return torch.tanh(0.8 * x + 0.3 * x.flip(1) + torch.sin(3 * tt))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_flow_nll_is_a_scipy_integration_of_the_score_form(prediction) -> None:
    """The same flow written independently: in the continuous step s (not lambda), in the form
    dx/ds = f x - f eps / sigma with f = dlog alpha/ds (the probability-flow ODE of Song et al.
    2021 for this alpha), integrated by scipy's DOP853 at 1e-11 knot to knot (f jumps at each
    step) from sigma = 1e-4 to the last step, the divergence from the network's closed form. The
    NLLs of `ode_nll` (torchdiffeq in lambda, x_0 form, autograd divergence) agree to 1e-6."""
    from scipy.integrate import solve_ivp

    T = 20
    diffusion = GaussianDiffusion(make_beta_schedule("cosine", T), prediction=prediction)
    x = torch.tensor([[0.3, -0.7], [1.2, 0.4], [-0.5, -1.1]], dtype=torch.float64)
    settings = ODESettings(rtol=1e-10, atol=1e-10, divergence="exact").check(2)
    found = ode_nll(diffusion, stand_in, x, settings)["nll"].numpy()

    knots = 0.5 * np.log(np.concatenate([[1.0], diffusion.alphas_cumprod.numpy()]))  # s = -1..T-1

    def eps_and_div(y: np.ndarray, s: float, log_alpha: float) -> tuple[np.ndarray, float]:
        alpha = math.exp(log_alpha)
        sigma = math.sqrt(-math.expm1(2 * log_alpha))
        out = stand_in(torch.from_numpy(y[None]), torch.tensor([s])).numpy()[0]
        d_out = 0.8 * (1 - out**2)  # the diagonal of d out / d x
        if prediction == "eps":
            return out, d_out.sum()
        return alpha * out + sigma * y, alpha * d_out.sum() + 2 * sigma  # eps = alpha v + sigma x

    def rhs(s: float, state: np.ndarray, k: int) -> np.ndarray:
        f = knots[k + 1] - knots[k]  # the slope of log alpha on [k - 1, k]
        log_alpha = knots[k] + (s + 1 - k) * f
        sigma = math.sqrt(-math.expm1(2 * log_alpha))
        eps, div_eps = eps_and_div(state[:2], s, log_alpha)
        return np.array([*(f * state[:2] - f * eps / sigma), f * (2 - div_eps / sigma)])

    log_alpha_start = 0.5 * math.log1p(-(SIGMA_AT_DATA**2))
    start = log_alpha_start / knots[1] - 1  # on [-1, 0], log alpha = (s + 1) log alpha_0
    expected = []
    for point in x.numpy():
        state, s = np.array([*point, 0.0]), start
        for k in range(T):  # the segment [k - 1, k] of s
            end = solve_ivp(rhs, (s, k), state, method="DOP853", rtol=1e-11, atol=1e-12, args=(k,))
            state, s = end.y[:, -1], float(k)
        log_prior = -0.5 * (2 * math.log(2 * math.pi) + (state[:2] ** 2).sum())
        expected.append(-(log_prior + state[2]))  # log p(x) = log p_T(x_T) + the divergence's
    np.testing.assert_allclose(found, expected, rtol=0, atol=1e-6)


def test_dequantized_nll_bounds_the_discrete_nll_of_a_known_density() -> None:
    """Discrete data (5 levels in [-1, 1], bins of width 0.5): for data N(0, I) every x_t is
    N(0, I), so the oracle's flow stays still and the ODE's NLL of x + u is -log N(x + u; 0, I).
    With one uniform draw its mean over u is D/2 log 2 pi + (|x|^2 + D width^2 / 12) / 2 -
    D log width (nats; the dequantization bound of Theis et al.), matched within 4 standard
    errors over 8000 draws; with 16 draws the importance-weighted estimate is tighter, within
    0.005 nats above the exact discrete NLL -log P(bin) (normal CDFs) that both bound."""
    from types import SimpleNamespace

    from ddpm.likelihood import ode_bpd
    from ddpm.truth import GaussianMixture

    dim, levels, width = 4, 5, 0.5
    mixture = GaussianMixture(torch.zeros(1, dim), [1.0], [1.0])
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 100))
    trained = SimpleNamespace(backbone=Oracle(mixture, diffusion), diffusion=diffusion)
    point = torch.tensor([-1.0, 1.0, 0.5, 0.0])  # on the levels -1 + k width
    data = point.repeat(8000, 1)
    nll = {}
    for draws in (1, 16):
        settings = ODESettings(dequantization=draws).check(dim)
        rows = ode_bpd(trained, data, levels, settings, batch_size=8000)["rows"]
        nll[draws] = torch.tensor([row["nll_nats"] for row in rows], dtype=torch.float64)
    jensen = dim / 2 * math.log(2 * math.pi) + (point.pow(2).sum() + dim * width**2 / 12) / 2
    jensen -= dim * math.log(width)
    stderr = nll[1].std() / math.sqrt(len(nll[1]))
    assert abs(nll[1].mean() - jensen) < 4 * stderr, (nll[1].mean(), jensen, stderr)
    bins = torch.special.ndtr(point + width / 2) - torch.special.ndtr(point - width / 2)
    exact = -bins.double().log().sum()
    assert exact < nll[16].mean() < exact + 0.005 < nll[1].mean() - 0.015, (exact, nll)
