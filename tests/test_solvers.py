"""The samplers of `ddpm.samplers` against independent references: diffusers' schedulers (the same
timesteps, the same x after every step) and the probability-flow ODE of a known distribution
integrated to 1e-10 by scipy (the solvers' error falls at their order)."""

import math

import numpy as np
import pytest
import torch

from ddpm.diffusion import GaussianDiffusion
from ddpm.samplers import DDIM, ODE, Ancestral, DPMSolver, UniPC, spaced_timesteps
from ddpm.schedules import make_beta_schedule
from ddpm.truth import GaussianMixture, Oracle

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy use

DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in network that depends on x and t, of order 1."""
    tt = t.to(x.dtype).reshape(-1, *(1,) * (x.ndim - 1)) / 1000
    return torch.tanh(0.8 * x + torch.sin(3 * tt) - 0.3 * x.flip(1))


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize(("T", "K"), [(1000, 10), (1000, 7), (1000, 50), (500, 12), (50, 3)])
def test_spacings_are_diffusers_timesteps(spacing: str, T: int, K: int) -> None:
    betas = make_beta_schedule("linear", T)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    scheduler.set_timesteps(K)
    ours = spaced_timesteps(spacing, K, torch.cumprod(1 - betas, 0))
    assert ours.tolist() == scheduler.timesteps.tolist()


def diffusers_dpm_solver(
    betas: torch.Tensor, order: int, stochastic: bool, prediction: str, timesteps: torch.Tensor
):
    """diffusers' DPM-Solver++ on our chain and timesteps. diffusers keeps abar in float32, where
    1 - abar near t = 0 has lost 3 of its digits (sigma_0^2 is 4e-5 on the cosine chain): it is
    given our float64 abar, from which it computes its float32 sigmas."""
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=len(betas),
        trained_betas=betas.numpy(),
        algorithm_type="sde-dpmsolver++" if stochastic else "dpmsolver++",
        solver_order=order,
        prediction_type=DIFFUSERS_PREDICTION[prediction],
        final_sigmas_type="zero",
        lower_order_final=True,
    )
    scheduler.alphas_cumprod = torch.cumprod(1 - betas, 0)
    scheduler.set_timesteps(timesteps=timesteps.tolist())
    assert scheduler.timesteps.tolist() == timesteps.tolist()
    return scheduler


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize(
    ("schedule", "spacing", "K"), [("linear", "logsnr", 12), ("cosine", "linspace", 20)]
)
def test_dpm_solver_is_diffusers_step_by_step(
    schedule: str, spacing: str, K: int, prediction: str, order: int, stochastic: bool
) -> None:
    """DPMSolver and diffusers' DPMSolverMultistepScheduler (dpmsolver++ or sde-dpmsolver++,
    final_sigmas_type="zero", lower_order_final), given our timesteps, the same network and the
    same noise, agree after every step to float32 rounding."""
    betas = make_beta_schedule(schedule, 1000)
    diffusion = GaussianDiffusion(betas, prediction=prediction)
    sampler = DPMSolver(steps=K, order=order, spacing=spacing, stochastic=stochastic)
    scheduler = diffusers_dpm_solver(
        betas, order, stochastic, prediction, sampler.timesteps(diffusion)
    )
    x_T = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    ours = list(sampler.iterate(network, diffusion, x_T, torch.Generator().manual_seed(1)))
    draws = torch.Generator().manual_seed(1)  # the noise our sampler drew, one per step
    x, scale = x_T, 1.0
    for (t, x_ours, x0), t_theirs in zip(ours, scheduler.timesteps, strict=True):
        # x_0 = (x - sigma eps) / alpha carries float32 rounding times 1 / alpha (160 at t = 999
        # of the linear chain) into what follows: the tolerance follows the largest x_0 so far
        scale = max(scale, 1 + x0.abs().max().item())
        assert t == int(t_theirs)
        noise = torch.randn(x.shape, generator=draws) if stochastic else None
        x = scheduler.step(network(x, t_theirs.expand(x.shape[0])), t_theirs, x,
                           variance_noise=noise).prev_sample  # fmt: skip
        torch.testing.assert_close(x_ours, x, rtol=1e-4, atol=1e-5 * scale)
    assert x.abs().max() > 0.1  # a real sample, not a collapse to 0


@pytest.mark.parametrize("stochastic", [False, True])
def test_third_order_differs_from_diffusers_only_in_the_second_difference(stochastic: bool) -> None:
    """Each third-order step, given diffusers the same x and history, is diffusers' step plus
    alpha_t (ours - theirs) D2, D2 = (D1_0 - D1_1) / (r0 + r1) (diffusers' own names): the
    weights of the second divided difference, which test_ode_samplers_converge shows ours gets
    right; every other part of the step is diffusers'."""
    betas = make_beta_schedule("cosine", 1000)
    diffusion = GaussianDiffusion(betas, prediction="v")
    sampler = DPMSolver(steps=20, order=3, spacing="linspace", stochastic=stochastic)
    timesteps = sampler.timesteps(diffusion)
    scheduler = diffusers_dpm_solver(betas, 3, stochastic, "v", timesteps)
    x_T = torch.randn(6, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = list(sampler.iterate(network, diffusion, x_T, torch.Generator().manual_seed(1)))
    abar = torch.cumprod(1 - betas, 0)[timesteps].tolist()
    lam = [0.5 * math.log(a / (1 - a)) for a in abar] + [math.inf]
    draws = torch.Generator().manual_seed(1)
    x, x0s, third = x_T, [], 0
    for i, (t, x_ours, x0) in enumerate(ours):
        noise = torch.randn(x.shape, generator=draws) if stochastic else None  # float32 draws
        theirs = scheduler.step(network(x, torch.full((6,), t)), t, x, variance_noise=noise)
        x0s.append(x0)
        correction = 0.0
        if 2 <= i < len(ours) - 1:  # diffusers' third-order steps
            third += 1
            h, h0, h1 = lam[i + 1] - lam[i], lam[i] - lam[i - 1], lam[i - 1] - lam[i - 2]
            d1_0, d1_1 = (x0s[-1] - x0s[-2]) * (h / h0), (x0s[-2] - x0s[-3]) * (h / h1)
            D2 = (d1_0 - d1_1) / ((h0 + h1) / h)
            if stochastic:
                p = -math.expm1(-2 * h)
                ours_w, theirs_w = 1 + (p - 2 * h) / (2 * h * h), (p - 2 * h) / (2 * h) ** 2 - 0.5
            else:
                p = -math.expm1(-h)
                ours_w, theirs_w = 1 - 2 * (h - p) / h**2, 0.5 - (h - p) / h**2
            correction = math.sqrt(abar[i + 1]) * (ours_w - theirs_w) * D2
        torch.testing.assert_close(x_ours, theirs.prev_sample + correction, rtol=1e-5, atol=1e-5)
        x = x_ours
    assert third == len(ours) - 3


def test_dpm_solver_order_1_is_ddim_with_eta_0() -> None:
    """Order 1 is DDIM with eta 0 on the same steps (Lu et al. 2022b, section 4.1), to rounding."""
    diffusion = GaussianDiffusion(make_beta_schedule("cosine", 200), prediction="v")
    x_T = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    dpm = DPMSolver(steps=15, order=1, spacing="linspace")
    ddim = DDIM(steps=15, eta=0.0, spacing="linspace")
    assert torch.equal(dpm.timesteps(diffusion), ddim.timesteps(diffusion))
    a = list(dpm.iterate(network, diffusion, x_T))
    b = list(ddim.iterate(network, diffusion, x_T))
    for (ta, _, x0a), (tb, _, x0b) in zip(a, b, strict=True):
        assert ta == tb
        torch.testing.assert_close(x0a, x0b, rtol=1e-10, atol=1e-10)
    # DDIM's last step lands on sqrt(abar_prev) x_0 with abar_prev = 1: x_0 itself
    torch.testing.assert_close(a[-1][1], b[-1][1], rtol=1e-10, atol=1e-10)


# A known 2-D distribution: its Bayes-optimal denoiser E[x_0 | x_t] in closed form, computed here
# in numpy for any lambda (independently of ddpm.truth, which the samplers call as `Oracle`).
MEANS = np.array([[-0.8, 0.5], [0.7, -0.4], [0.1, 0.9]])
VARIANCES = np.array([0.04, 0.09, 0.02])
WEIGHTS = np.array([0.5, 0.3, 0.2])


def denoise(x: np.ndarray, lam: float) -> np.ndarray:
    """E[x_0 | x] for x = alpha x_0 + sigma eps, lambda = log(alpha / sigma), x [N, 2]."""
    alpha2 = 1.0 / (1.0 + math.exp(-2.0 * lam))
    alpha, sigma2 = math.sqrt(alpha2), 1.0 - alpha2
    var = alpha2 * VARIANCES + sigma2  # of x under each component, per dimension
    d2 = ((x[:, None, :] - alpha * MEANS[None]) ** 2).sum(-1)
    logits = np.log(WEIGHTS) - d2 / (2 * var) - np.log(var)  # 2-D: log of var^(d/2), d = 2
    r = np.exp(logits - logits.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    gain = alpha * VARIANCES / var  # E[x_0 | x, k] = m_k + gain_k (x - alpha m_k)
    posterior = MEANS[None] + gain[None, :, None] * (x[:, None, :] - alpha * MEANS[None])
    return (r[:, :, None] * posterior).sum(1)


def flow(diffusion: GaussianDiffusion, x_T: np.ndarray, t_end: int = 0) -> np.ndarray:
    """The probability-flow ODE from t = T-1 to t_end, then the denoiser there (the map every ODE
    sampler's last step applies), by scipy's DOP853 to rtol = atol = 1e-10. In y = x / alpha and
    lambda the ODE is dy/dlambda = E[x_0 | x] - y (Lu et al. 2022b, eq. 5 in these variables)."""
    from scipy.integrate import solve_ivp

    abar = diffusion.alphas_cumprod.numpy()
    lam = 0.5 * (np.log(abar) - np.log1p(-abar))
    alpha = np.sqrt(abar)
    n = x_T.shape[0]

    def dy(lam_: float, y: np.ndarray) -> np.ndarray:
        a = math.sqrt(1.0 / (1.0 + math.exp(-2.0 * lam_)))
        y = y.reshape(n, 2)
        return (denoise(a * y, lam_) - y).ravel()

    y0 = (x_T / alpha[-1]).ravel()
    end = solve_ivp(dy, (lam[-1], lam[t_end]), y0, method="DOP853", rtol=1e-10, atol=1e-10)
    assert end.success
    return denoise(alpha[t_end] * end.y[:, -1].reshape(n, 2), lam[t_end])


@pytest.mark.parametrize(
    ("sampler", "slope"),
    [
        (lambda K: DDIM(K, spacing="logsnr"), 1),
        (lambda K: DPMSolver(K, order=1), 1),
        (lambda K: DPMSolver(K, order=2), 2),
        (lambda K: DPMSolver(K, order=3), 3),
        (lambda K: UniPC(K, order=1), 2),  # the corrector adds one order (Zhao et al. 2023)
        (lambda K: UniPC(K, order=2), 3),
        (lambda K: UniPC(K, order=3), 4),
    ],
)
def test_ode_samplers_converge_to_the_flow_at_their_order(sampler, slope: int) -> None:
    """With the exact denoiser (`Oracle`), an ODE sampler's end points from fixed x_T approach the
    probability-flow ODE's (integrated to 1e-10) as the calls grow, the error falling about as
    calls^-order (the fitted slope within 0.5 of it; UniPC-p is of order p + 1)."""
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 1000))
    mixture = GaussianMixture(
        torch.from_numpy(MEANS), torch.from_numpy(VARIANCES), torch.from_numpy(WEIGHTS)
    )
    oracle = Oracle(mixture, diffusion)
    x_T = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = flow(diffusion, x_T.numpy())
    calls = [20, 40, 80]
    errors = []
    for K in calls:
        x0 = sampler(K).sample(oracle, diffusion, x_T.clone()).numpy()
        errors.append(np.sqrt(((x0 - exact) ** 2).sum(1).mean()))
    fitted = -np.polyfit(np.log(calls), np.log(errors), 1)[0]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert abs(fitted - slope) < 0.5, (fitted, errors)


def test_the_ode_sampler_is_the_flow() -> None:
    """sampler=ode (torchdiffeq's dopri5 in lambda and x, the network at fractional steps) at
    rtol = atol = 1e-8 ends where scipy's DOP853 integration of the flow in y = x / alpha does,
    within 1e-6: the reference the fixed-step solvers converge to."""
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 1000))
    mixture = GaussianMixture(
        torch.from_numpy(MEANS), torch.from_numpy(VARIANCES), torch.from_numpy(WEIGHTS)
    )
    x_T = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sampler = ODE(rtol=1e-8, atol=1e-8)
    found = sampler.sample(Oracle(mixture, diffusion), diffusion, x_T).numpy()
    np.testing.assert_allclose(found, flow(diffusion, x_T.numpy()), rtol=0, atol=1e-6)
    assert sampler.network_calls(diffusion) > 100  # measured: the integrator's choice


@pytest.mark.parametrize("stochastic", [False, True])
def test_third_order_step_has_local_error_h4(stochastic: bool) -> None:
    """One third-order step (from x = 0, so only the data term is left) against the integral of
    its kernel, alpha_t e^-(h-u) (ODE) or alpha_t 2 e^-2(h-u) (SDE, noise 0), times a smooth
    x_0(lambda), by scipy's quad: the error falls as h^4 (a third-order method)."""
    from scipy.integrate import quad

    from ddpm.samplers.dpm_solver import dpm_solver_step

    def x0(lam: float) -> float:
        return 0.1 * math.sin(lam) + 0.3 * lam * lam

    rate = 2.0 if stochastic else 1.0
    errors = []
    for h in (0.1, 0.05, 0.025):
        lams = [-2 * h, -h, 0.0, h]
        x0s = [torch.tensor([x0(lam)], dtype=torch.float64) for lam in lams[:3]]
        zero = torch.zeros(1, dtype=torch.float64)
        step = dpm_solver_step(zero, x0s, lams, 1.0, 1.0, 1.0, zero if stochastic else None)
        exact = quad(lambda u, h=h: rate * math.exp(-rate * (h - u)) * x0(u), 0, h, epsabs=1e-15)[0]
        errors.append(abs(step.item() - exact))
    slopes = [math.log2(a / b) for a, b in zip(errors, errors[1:], strict=False)]
    assert all(abs(s - 4) < 0.2 for s in slopes), (errors, slopes)


def test_dpm_solver_is_closest_to_the_data_with_a_perfect_network(compose_cfg, tmp_path) -> None:
    """`ddpm-eval backbone=oracle data=gmm sampler=... sampler.steps=K`: with the exact denoiser
    only the sampler's own error is left; at 10 and 20 calls DPM-Solver++'s samples are closer
    to held-out data (energy distance) than DDIM's and the respaced ancestral chain's, every
    sampler starting from the same x_T (seed 0) against the same data."""
    from ddpm.cli.evaluate import evaluate

    for calls in (10, 20):
        distance = {}
        for sampler in ("dpm_solver", "ddim", "ancestral"):
            overrides = ["backbone=oracle", "data=gmm", f"sampler={sampler}",
                         f"sampler.steps={calls}", "logger=none", "likelihood=[]"]  # fmt: skip
            found = evaluate(compose_cfg(overrides, config_name="eval"), tmp_path / sampler)
            assert found["network_calls"] == calls
            distance[sampler] = found["energy_distance"]["model"]
        floor = found["energy_distance"]["floor_two_held_out_draws"]
        assert distance["dpm_solver"] < min(distance["ddim"], distance["ancestral"]), distance
        assert distance["dpm_solver"] < 0.01 and floor < 0.01, (distance, floor)
    # sampler=ode, the flow to tolerance: at the floor, its network calls measured
    overrides = ["backbone=oracle", "data=gmm", "sampler=ode", "logger=none", "likelihood=[]"]
    found = evaluate(compose_cfg(overrides, config_name="eval"), tmp_path / "ode")
    assert found["network_calls"] > 50 and found["sampler"] == {
        "name": "ode", "rtol": 1e-5, "atol": 1e-5, "method": "dopri5"
    }  # fmt: skip
    assert found["energy_distance"]["model"] < distance["dpm_solver"] + 0.002, found


ALL_KINDS = [
    DPMSolver(10),
    DPMSolver(8, order=3, stochastic=True),
    UniPC(10, order=3),
    DDIM(10, eta=0.5),
    Ancestral(10),
    ODE(),
]


@pytest.mark.parametrize("sampler", ALL_KINDS)
def test_every_parameterisation_samples_alike(sampler) -> None:
    """With the exact denoiser as its network (`Oracle`, which outputs what each prediction and
    learned variance stands for), every prediction gives the samples of eps (the ODE solvers and
    DDIM read only x_0; the ancestral step reads the mean too, and the learned variance is the
    true reverse step's): the conversion from an output runs through one parameterisation."""
    betas = make_beta_schedule("cosine", 200)
    mixture = GaussianMixture(
        torch.from_numpy(MEANS), torch.from_numpy(VARIANCES), torch.from_numpy(WEIGHTS)
    )
    x_T = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    samples = {}
    for prediction in ("eps", "x0", "mean", "v"):
        for variance in ("beta", "learned_range"):
            loss = "hybrid" if variance == "learned_range" else "simple"
            diffusion = GaussianDiffusion(betas, variance, prediction, loss)
            oracle = Oracle(mixture, diffusion)
            generator = torch.Generator().manual_seed(1)
            samples[prediction, variance] = sampler.sample(oracle, diffusion, x_T, generator)
    reference = samples["eps", "beta"]
    assert reference.abs().max() > 0.1
    for (prediction, variance), x in samples.items():
        if isinstance(sampler, Ancestral) and variance != "beta":
            continue  # a learned variance is the true step's, not beta_t: other samples
        torch.testing.assert_close(x, reference, rtol=1e-6, atol=1e-6, msg=f"{prediction}")
    if isinstance(sampler, Ancestral):  # with the learned variance, alike among predictions
        learned = samples["eps", "learned_range"]
        for prediction in ("x0", "mean", "v"):
            torch.testing.assert_close(samples[prediction, "learned_range"], learned)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize(("schedule", "K"), [("linear", 10), ("cosine", 20)])
def test_unipc_is_diffusers_step_by_step(
    schedule: str, K: int, prediction: str, order: int
) -> None:
    """UniPC and diffusers' UniPCMultistepScheduler (bh2, predict_x0, lower_order_final,
    final_sigmas_type="zero", the corrector on), on the same "trailing" timesteps, the same
    network and our float64 abar, agree after every step to float32 rounding."""
    betas = make_beta_schedule(schedule, 1000)
    diffusion = GaussianDiffusion(betas, prediction=prediction)
    sampler = UniPC(steps=K, order=order, spacing="trailing")
    scheduler = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000,
        trained_betas=betas.numpy(),
        solver_order=order,
        prediction_type=DIFFUSERS_PREDICTION[prediction],
        timestep_spacing="trailing",
        final_sigmas_type="zero",
    )
    scheduler.alphas_cumprod = torch.cumprod(1 - betas, 0)
    scheduler.set_timesteps(K)
    assert scheduler.timesteps.tolist() == sampler.timesteps(diffusion).tolist()
    x_T = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    x, scale = x_T, 1.0
    for (t, x_ours, x0), t_theirs in zip(
        sampler.iterate(network, diffusion, x_T), scheduler.timesteps, strict=True
    ):
        scale = max(scale, 1 + x0.abs().max().item())  # as in the DPM-Solver++ test
        assert t == int(t_theirs)
        x = scheduler.step(network(x, t_theirs.expand(x.shape[0])), t_theirs, x).prev_sample
        torch.testing.assert_close(x_ours, x, rtol=1e-4, atol=1e-5 * scale)
    assert x.abs().max() > 0.1
