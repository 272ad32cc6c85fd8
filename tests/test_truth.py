"""The true reverse process (ddpm.truth) against computations that share none of its mixture
algebra: 1-D densities on a fine grid (Bayes' rule with the forward kernels), a direct softmax
over data points, and Monte Carlo with stated tolerances."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm.diffusion import GaussianDiffusion
from ddpm.metrics import energy_distance
from ddpm.schedules import make_beta_schedule
from ddpm.truth import (
    GaussianMixture,
    Oracle,
    empirical,
    loss_floor,
    truth_terms,
)

GRID = torch.linspace(-7, 7, 4001, dtype=torch.float64)
DX = float(GRID[1] - GRID[0])
MIXTURE_1D = GaussianMixture(
    torch.tensor([[-1.0], [0.5], [2.0]]), [0.05, 0.2, 0.01], [0.3, 0.5, 0.2]
)


def chain(T: int = 50, variance: str = "beta", prediction: str = "eps") -> GaussianDiffusion:
    loss = "hybrid" if variance.startswith("learned") else "simple"
    return GaussianDiffusion(make_beta_schedule("linear", T), variance, prediction, loss)


def normal_pdf(x: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    return torch.exp(-((x - mean) ** 2) / (2 * variance)) / torch.sqrt(2 * math.pi * variance)


def data_density(mixture: GaussianMixture) -> torch.Tensor:
    """q(x_0) on the grid, from the mixture's parameters alone."""
    parts = zip(mixture.means[:, 0], mixture.variances, mixture.weights, strict=True)
    return sum(w * normal_pdf(GRID, m, v) for m, v, w in parts)


def grid_reverse(diffusion: GaussianDiffusion, t: int, x_t: torch.Tensor) -> torch.Tensor:
    """q(x_{t-1} | x_t) on the grid [len(x_t), G]: q(x_{t-1}) by integrating q(x_0) against the
    forward kernel q(x_{t-1} | x_0), times q(x_t | x_{t-1}), normalised."""
    abar_prev, beta = diffusion.alphas_cumprod_prev[t], diffusion.betas[t]
    p0 = data_density(MIXTURE_1D)
    if t == 0:
        prior = p0
    else:
        kernel = normal_pdf(GRID[:, None], abar_prev.sqrt() * GRID[None], 1 - abar_prev)
        prior = (kernel * p0[None]).sum(1) * DX
    reverse = prior[None] * normal_pdf(x_t[:, None], (1 - beta).sqrt() * GRID[None], beta)
    return reverse / (reverse.sum(1, keepdim=True) * DX)


@pytest.mark.parametrize("t", [0, 10, 49])
def test_mixture_against_bayes_rule_on_a_grid(t: int) -> None:
    diffusion = chain()
    x_t = torch.tensor([0.3, -1.2, 1.7, 2.5], dtype=torch.float64)
    tt = torch.full((4,), t)
    abar = diffusion.alphas_cumprod[t]
    p0 = data_density(MIXTURE_1D)
    # E[x_0 | x_t]: Bayes' rule with q(x_t | x_0)
    posterior = p0[None] * normal_pdf(x_t[:, None], abar.sqrt() * GRID[None], 1 - abar)
    evidence = posterior.sum(1) * DX
    expected_x0 = (posterior * GRID).sum(1) * DX / evidence
    torch.testing.assert_close(MIXTURE_1D.denoise(diffusion, x_t[:, None], tt)[:, 0], expected_x0)
    torch.testing.assert_close(
        MIXTURE_1D.marginal_log_prob(diffusion, x_t[:, None], tt), evidence.log()
    )
    # q(x_{t-1} | x_t): density at grid points, mean and variance
    reverse = grid_reverse(diffusion, t, x_t)
    index = torch.tensor([1943, 2086, 2457, 2686])  # x = -0.2, 0.3, 1.6, 2.4
    got = MIXTURE_1D.reverse_log_prob(diffusion, GRID[index][:, None], x_t[:, None], tt)
    torch.testing.assert_close(got, reverse[torch.arange(4), index].log(), rtol=1e-6, atol=1e-6)
    mean = (reverse * GRID).sum(1) * DX
    variance = (reverse * GRID**2).sum(1) * DX - mean**2
    moments = MIXTURE_1D.reverse_moments(diffusion, x_t[:, None], tt)
    torch.testing.assert_close(moments[0][:, 0], mean)
    torch.testing.assert_close(moments[1][:, 0, 0], variance, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(
        MIXTURE_1D.reverse_variance(diffusion, x_t[:, None], tt)[:, 0], variance, rtol=1e-5,
        atol=1e-9,
    )  # fmt: skip
    # the reverse sampler: its mean and variance, within 5 standard errors
    n = 40000
    draws = MIXTURE_1D.sample_reverse(
        diffusion, x_t[:1].repeat(n)[:, None], torch.full((n,), t), torch.Generator().manual_seed(0)
    )[:, 0]
    assert abs(draws.mean() - mean[0]) < 5 * (variance[0] / n).sqrt()
    assert abs(draws.var() - variance[0]) < 5 * variance[0] * math.sqrt(2 / n) + 1e-12
    torch.testing.assert_close(
        MIXTURE_1D.log_prob(GRID[index][:, None]), p0[index].log(), rtol=1e-9, atol=1e-9
    )


def test_sample_draws_each_component_by_its_weight() -> None:
    n = 60000
    mixture = GaussianMixture(torch.tensor([[-3.0], [0.0], [3.0]]), [0.09, 0.04, 0.01], [3, 5, 2])
    x = mixture.sample(n, torch.Generator().manual_seed(1))[:, 0]
    nearest = (x[:, None] - mixture.means[:, 0][None]).abs().argmin(1)
    share = torch.bincount(nearest, minlength=3).double() / n
    # the midpoints lie 5+ standard deviations from every mean: 5 binomial standard errors
    bound = 5 * (mixture.weights * (1 - mixture.weights) / n).sqrt()
    assert ((share - mixture.weights).abs() < bound).all(), share
    inside = x[nearest == 0]
    assert abs(inside.mean() + 3.0) < 5 * 0.3 / math.sqrt(len(inside))


def test_empirical_denoiser_is_a_softmax_over_the_points() -> None:
    points = torch.randn(30, 1, 2, 3, generator=torch.Generator().manual_seed(0)).double()
    diffusion = chain()
    x_t = torch.randn(5, 1, 2, 3, generator=torch.Generator().manual_seed(1)).double()
    t = torch.tensor([0, 3, 20, 35, 49])
    got = empirical(points).denoise(diffusion, x_t, t)
    for i in range(5):
        abar = diffusion.alphas_cumprod[t[i]]
        sq = ((x_t[i] - abar.sqrt() * points) ** 2).flatten(1).sum(1)
        weights = torch.softmax(-sq / (2 * (1 - abar)), dim=0)
        expected = (weights[:, None, None, None] * points).sum(0)
        torch.testing.assert_close(got[i], expected)


def test_the_true_reverse_chain_regenerates_a_finite_data_set() -> None:
    """Memorisation: sampling the empirical distribution's true reverse process from x_T ends
    on training points exactly, and reaches many of them."""
    points = torch.randn(40, 2, generator=torch.Generator().manual_seed(0)).double()
    truth, diffusion = empirical(points), chain()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(400, 2, generator=generator, dtype=torch.float64)
    for t in reversed(range(diffusion.num_timesteps)):
        x = truth.sample_reverse(diffusion, x, torch.full((400,), t), generator)
    distance = torch.cdist(x, points).min(1).values
    assert distance.max() < 1e-12
    assert len(torch.unique(torch.cdist(x, points).argmin(1))) > 30


def test_the_true_reverse_chain_reproduces_the_data_distribution() -> None:
    """From x_T ~ N(0, I), ancestral steps of q(x_{t-1} | x_t) give the data distribution (up to
    the prior's mismatch at T, here abar_T ~ 4e-5): energy distance to data draws no larger than
    between two data draws, up to Monte Carlo error."""
    truth = GaussianMixture(
        torch.tensor([[-1.5, 0.0], [1.0, 1.0], [0.5, -1.5]]), [0.05, 0.02, 0.1], [0.5, 0.3, 0.2]
    )
    diffusion, n = chain(100), 3000
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    for t in reversed(range(diffusion.num_timesteps)):
        x = truth.sample_reverse(diffusion, x, torch.full((n,), t), generator)
    data, other = truth.sample(n, generator), truth.sample(n, generator)
    floor = energy_distance(other, data)
    assert energy_distance(x, data) < 3 * abs(floor) + 3e-3, (energy_distance(x, data), floor)
    nearest = torch.cdist(x, truth.means).argmin(1)
    share = torch.bincount(nearest, minlength=3).double() / n
    assert ((share - truth.weights).abs() < 0.03).all(), share


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_floor_against_the_grid(prediction: str) -> None:
    """The floor E || target - E[target | x_t] ||^2 is Var(target | x_t) averaged over x_t; on a
    grid, with Var(x_0 | x_t) from Bayes' rule: eps's is abar / (1 - abar) times it, x0's itself,
    v's 1 / (1 - abar) times it. Monte Carlo within 4 standard errors."""
    diffusion = chain(prediction=prediction)
    steps = [0, 5, 25, 49]
    mean, stderr = loss_floor(diffusion, MIXTURE_1D, 8000, torch.Generator().manual_seed(0), steps)
    p0 = data_density(MIXTURE_1D)
    for i, t in enumerate(steps):
        abar = diffusion.alphas_cumprod[t]
        joint = p0[None] * normal_pdf(GRID[:, None], abar.sqrt() * GRID[None], 1 - abar)
        marginal = joint.sum(1) * DX  # q(x_t) on the grid
        m1 = (joint * GRID).sum(1) * DX / marginal
        m2 = (joint * GRID**2).sum(1) * DX / marginal
        expected_var_x0 = ((m2 - m1**2) * marginal).sum() * DX
        scale = {"eps": abar / (1 - abar), "x0": 1.0, "v": 1 / (1 - abar)}[prediction]
        expected = float(scale * expected_var_x0)
        assert abs(mean[i] - expected) < 4 * stderr[i] + 1e-6 * expected, (t, mean[i], expected)


def test_kl_is_zero_when_the_model_is_the_true_gaussian_step() -> None:
    """Data N(0, I): every true reverse step is Gaussian with variance beta_t and the oracle's
    mean, so with variance=beta the oracle's p is that step, and the KL and the Gaussian gap
    are 0 (t >= 1; at t = 0 the model's variance is beta_tilde_1, not beta_0)."""
    truth = GaussianMixture(torch.zeros(1, 3), [1.0], [1.0])
    diffusion = chain(30)
    rows = truth_terms(
        diffusion, truth, Oracle(truth, diffusion).double(), range(1, 30), 200,
        torch.Generator().manual_seed(0),
    )  # fmt: skip
    for row in rows:
        assert abs(row["kl"]) < 1e-9 and abs(row["gaussian_gap"]) < 1e-9, row
        assert abs(row["excess_loss"]) < 1e-9, row  # the oracle's loss is the floor


def test_kl_against_the_grid() -> None:
    """E over x_t ~ q of KL(q(x_{t-1} | x_t) || p(x_{t-1} | x_t)) for a model that predicts
    eps = 0 (p = N(x_t / sqrt(alpha_t), beta_t)), on a grid of x_t and x_{t-1}, against
    `truth_terms`' Monte Carlo (within 4 standard errors); the Gaussian gap, by the grid too."""
    diffusion, t = chain(), 30
    rows = truth_terms(
        diffusion, MIXTURE_1D, lambda x, _: torch.zeros_like(x), [t], 20000,
        torch.Generator().manual_seed(0),
    )  # fmt: skip
    x_t = torch.linspace(-4, 4, 801, dtype=torch.float64)
    abar, beta = diffusion.alphas_cumprod[t], diffusion.betas[t]
    p0 = data_density(MIXTURE_1D)
    q_xt = (p0[None] * normal_pdf(x_t[:, None], abar.sqrt() * GRID[None], 1 - abar)).sum(1) * DX
    reverse = grid_reverse(diffusion, t, x_t)
    model = normal_pdf(GRID[None], x_t[:, None] / (1 - beta).sqrt(), beta)
    mean = (reverse * GRID).sum(1) * DX
    variance = (reverse * GRID**2).sum(1) * DX - mean**2
    gaussian = normal_pdf(GRID[None], mean[:, None], variance[:, None])
    tiny = 1e-300
    for name, p in (("kl", model), ("gaussian_gap", gaussian)):
        kl_per_xt = (reverse * ((reverse + tiny).log() - (p + tiny).log())).sum(1) * DX
        expected = float((q_xt * kl_per_xt).sum() * float(x_t[1] - x_t[0]))
        got, stderr = rows[0][name], rows[0][f"{name}_stderr"]
        assert abs(got - expected) < 4 * stderr + 1e-3 * abs(expected), (name, got, expected)


@pytest.mark.parametrize(
    ("variance", "prediction"), [("beta", "x0"), ("learned_range", "v"), ("learned", "mean")]
)
def test_oracle_outputs_the_optimal_prediction_and_variance(variance: str, prediction: str) -> None:
    """Read back through the diffusion, the oracle's output gives E[x_0 | x_t] as its x_0 and,
    with a learned variance, the true step's variance per dimension."""
    diffusion = chain(variance=variance, prediction=prediction)
    truth = GaussianMixture(torch.randn(4, 2, generator=torch.Generator().manual_seed(0)),
                            [0.1, 0.2, 0.05, 0.3], [1, 2, 3, 4])  # fmt: skip
    x_t = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 25, 40, 49])
    out = Oracle(truth, diffusion)(x_t, t)
    _, _, log_variance, x0 = diffusion.p_mean_variance(out, x_t, t)
    torch.testing.assert_close(x0, truth.denoise(diffusion, x_t, t))
    if diffusion.learned_variance:
        torch.testing.assert_close(log_variance.exp(), truth.reverse_variance(diffusion, x_t, t))


def test_bad_mixtures_are_refused() -> None:
    with pytest.raises(ValueError, match="variances and weights must be"):
        GaussianMixture(torch.zeros(2, 1), [1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="no density"):
        empirical(torch.zeros(3, 2)).log_prob(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="do not fit"):
        MIXTURE_1D.denoise(chain(), torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))


def test_data_modules_expose_the_distribution_their_points_come_from() -> None:
    """data=gmm's splits and toy2d 8gaussians' are draws of the mixture `distribution()` returns:
    their log-likelihood under it matches the mixture's own draws (mean within 5 standard
    errors); the other toy sets have none."""
    from ddpm.data import GaussianMixtureDataModule, Toy2DDataModule

    for module in (GaussianMixtureDataModule(dim=3, num_train=4000),
                   Toy2DDataModule("8gaussians", num_train=4000)):  # fmt: skip
        truth = module.distribution()
        data = module.train_data.double()
        own = truth.sample(len(data), torch.Generator().manual_seed(0))
        ll_data, ll_own = truth.log_prob(data), truth.log_prob(own)
        stderr = math.hypot(ll_data.std(), ll_own.std()) / math.sqrt(len(data))
        assert abs(ll_data.mean() - ll_own.mean()) < 5 * stderr
        assert energy_distance(data, own) < 0.01
    assert Toy2DDataModule("moons").distribution() is None


def test_gmm_keys_set_the_mixture() -> None:
    """data.components, data.variance and data.spread are what the mixture has; data.seed
    draws other means."""
    from ddpm.data import GaussianMixtureDataModule

    wide = GaussianMixtureDataModule(dim=16, components=400, spread=3.0, variance=0.04)
    truth = wide.distribution()
    assert truth.means.shape == (400, 16) and truth.shape == (16,)
    assert torch.allclose(truth.variances, torch.full((400,), 0.04, dtype=torch.float64))
    assert abs(truth.means.std().item() - 3.0) < 0.1  # 6400 draws of N(0, 9): stderr ~0.03
    other = GaussianMixtureDataModule(dim=16, components=400, seed=1).distribution()
    assert not torch.allclose(other.means, GaussianMixtureDataModule(dim=16, components=400)
                              .distribution().means)  # fmt: skip


@pytest.mark.parametrize("samples", [0, 8])
def test_loss_floor_samples_switches_the_excess_loss(compose_cfg, samples: int) -> None:
    """model.loss_floor_samples=0 turns train/excess_loss_q* off; otherwise each is the quarter's
    simple loss minus the floor that `loss_floor` gives with that many draws per t."""
    from ddpm.cli.train import build

    short = ["trainer.max_steps=4", "trainer.log_every_n_steps=4", "trainer.val_check_interval=4"]
    short += ["callbacks.samples.num_samples=4", "timesteps=40", "logger=none"]
    cfg = compose_cfg(["experiment=gmm", *short, f"model.loss_floor_samples={samples}"])
    run = build(cfg)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    logged = {k for k in run.trainer.callback_metrics if k.startswith("train/excess_loss_q")}
    assert logged == (set() if samples == 0 else {f"train/excess_loss_q{q}" for q in range(4)})
    if samples:
        expected, _ = loss_floor(run.module.diffusion.cpu(), run.datamodule.distribution(),
                                 samples, torch.Generator().manual_seed(0))  # fmt: skip
        torch.testing.assert_close(run.module.loss_floor.cpu(), expected.float())
