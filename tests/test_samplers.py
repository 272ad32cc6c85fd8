"""Respaced and DDIM samplers against the ancestral chain and their definitions."""

import numpy as np
import pytest
import torch

from ddpm.diffusion import GaussianDiffusion
from ddpm.samplers import normal_draws
from ddpm.schedules import make_beta_schedule

T = 50


def noisy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in network that depends on x and t."""
    return torch.tanh(x * 0.7 + t[:, None].to(x.dtype) / T)


def test_respacing_to_all_steps_is_the_ancestral_chain() -> None:
    d = GaussianDiffusion(make_beta_schedule("cosine", T), variance="tilde_beta")
    r = d.respace(T)
    torch.testing.assert_close(r.betas, d.betas, rtol=1e-12, atol=1e-15)
    assert torch.equal(r.timestep_map, torch.arange(T))
    a = d.sample_loop(noisy_model, (8, 2), generator=torch.Generator().manual_seed(1))
    b = r.sample_loop(noisy_model, (8, 2), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_respaced_betas_use_the_previous_kept_step() -> None:
    betas = make_beta_schedule("linear", 1000)
    d = GaussianDiffusion(betas)
    r = d.respace(10)
    kept = np.round(np.arange(10) * 999 / 9).astype(int)
    assert r.timestep_map.tolist() == kept.tolist()
    abar = np.cumprod(1 - betas.numpy())
    expected = 1 - abar[kept] / np.append(1.0, abar[kept][:-1])
    np.testing.assert_allclose(r.betas.numpy(), expected, rtol=1e-12)
    # q(x_t | x_0) is unchanged at every kept step.
    np.testing.assert_allclose(r.alphas_cumprod.numpy(), abar[kept], rtol=1e-12)
    seen = []

    def recording(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    r.sample_loop(recording, (2, 2))
    assert seen == kept[::-1].tolist()


def test_bad_respacing_is_refused() -> None:
    d = GaussianDiffusion(make_beta_schedule("linear", 100))
    with pytest.raises(
        ValueError, match=r"steps=0 is invalid: it must be an integer in \[1, 100\]"
    ):
        d.respace(0)
    with pytest.raises(ValueError, match=r"steps=101"):
        d.respace(101)


def test_ddim_with_eta_1_is_the_ancestral_step_with_tilde_beta() -> None:
    d = GaussianDiffusion(make_beta_schedule("linear", T), variance="tilde_beta")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(T, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(T, 3, generator=g, dtype=torch.float64)
    t = torch.arange(T)
    torch.testing.assert_close(
        d.ddim_sample(eps, x, t, noise, eta=1.0), d.p_sample(eps, x, t, noise), rtol=1e-9, atol=1e-9
    )


def test_ddim_with_eta_0_is_deterministic_given_x_t() -> None:
    d = GaussianDiffusion(make_beta_schedule("cosine", T)).respace(10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g)
    eps = torch.randn(4, 3, generator=g)
    t = torch.tensor([0, 3, 5, 9])
    a = d.ddim_sample(eps, x, t, torch.randn(4, 3, generator=g), eta=0.0)
    b = d.ddim_sample(eps, x, t, torch.randn(4, 3, generator=g), eta=0.0)
    assert torch.equal(a, b)
    # The whole chain then depends only on x_T: two generators that agree on x_T alone agree.
    shape = (4, 2)
    first = torch.Generator().manual_seed(3)
    second = torch.Generator().manual_seed(3)
    run_a = d.ddim_sample_loop(noisy_model, shape, eta=0.0, generator=first)
    run_b = list(d.sample_steps(noisy_model, shape, generator=second, eta=0.0))[-1][1]
    assert torch.equal(run_a, run_b)


@pytest.mark.parametrize("sampler", ["respaced", "ddim0", "ddim1"])
def test_fast_samplers_recover_a_point_mass(sampler: str) -> None:
    d = GaussianDiffusion(make_beta_schedule("linear", 1000))
    c = torch.tensor([0.25, -0.5])

    def eps_star(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = d.alphas_cumprod[t].float()[:, None]
        return (x - a.sqrt() * c) / (1 - a).sqrt()

    r = d.respace(20)
    g = torch.Generator().manual_seed(0)
    if sampler == "respaced":
        out = r.sample_loop(eps_star, (6, 2), generator=g, clip_denoised=False)
    else:
        eta = float(sampler[-1])
        out = r.ddim_sample_loop(eps_star, (6, 2), eta=eta, generator=g, clip_denoised=False)
    torch.testing.assert_close(out, c.expand(6, 2), atol=1e-4, rtol=0)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize(
    ("schedule", "variance", "prediction", "eta", "steps"),
    [
        ("linear", "beta", "eps", None, None),
        ("cosine", "tilde_beta", "eps", None, 10),
        ("linear", "beta", "eps", 0.0, 10),
        ("cosine", "beta", "eps", 0.5, None),
        ("linear", "tilde_beta", "eps", 1.0, 10),
        ("linear", "tilde_beta", "x0", None, None),
        ("cosine", "beta", "x0", 0.0, 10),
        ("linear", "learned_range", "v", None, 10),
        ("cosine", "learned_range", "v", 0.5, None),
        ("linear", "learned", "mean", None, None),
        ("cosine", "learned_range", "mean", None, 10),
        ("linear", "learned", "mean", 0.0, 10),
    ],
)
def test_each_sampling_step_is_the_per_example_step_in_float64(
    schedule: str, variance: str, prediction: str, eta: float | None, steps: int | None, clip
) -> None:
    """sample_steps takes each step with Python-number coefficients; each of its steps must equal
    p_sample (eta None) or ddim_sample, evaluated per example in float64 on the same x_t, network
    output and noise (the generator's draws: x_T, then one per step), for every prediction and
    variance (a learned one from a second set of output channels)."""
    loss = "vlb" if variance.startswith("learned") else "simple"
    d = GaussianDiffusion(make_beta_schedule(schedule, T), variance, prediction, loss)
    chain = d.respace(steps) if steps else d
    shape = (6, 3)
    inputs: list[torch.Tensor] = []

    def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = noisy_model(x, t)
        if variance == "learned":  # log sigma^2 about that of beta_t
            return torch.cat([out, torch.log(0.01 + 0.02 * out.abs())], dim=1)
        return torch.cat([out, out.flip(1)], dim=1) if variance == "learned_range" else out

    def recording(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inputs.append(x)  # not a copy: each step's x must be a tensor of its own
        return network(x, t)

    out = list(
        chain.sample_steps(recording, shape, torch.Generator().manual_seed(4), clip, eta=eta)
    )
    draws = torch.Generator().manual_seed(4)
    assert torch.equal(inputs[0], torch.randn(shape, generator=draws))
    for (i, x_prev, pred_x0), x in zip(out, inputs, strict=True):
        x64, t = x.double(), torch.full((shape[0],), i)
        output = network(x64, chain.timestep_map[t])
        noise = torch.randn(shape, generator=draws).double()
        if eta is None:
            want = chain.p_sample(output, x64, t, noise, clip)
        else:
            want = chain.ddim_sample(output, x64, t, noise, eta, clip)
        want_x0 = chain.p_mean_variance(output, x64, t, clip)[3]
        # pred_x0 = a x - b out cancels in float32: a is ~1/sqrt(abar_T) (eps), or for a mean
        # output ~1/coef1, large at large t; the error scales with the unclipped x_0
        scale = 1 + chain.p_mean_variance(output, x64, t)[3].abs().max()
        torch.testing.assert_close(pred_x0.double(), want_x0, rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(x_prev.double(), want, rtol=1e-5, atol=1e-6 * scale)


def test_normal_draws_reuse_one_tensor_and_follow_the_generator() -> None:
    draws = normal_draws((4, 5), torch.Generator().manual_seed(2), torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    first = next(draws)
    assert torch.equal(first, torch.randn((4, 5), generator=g))
    second = next(draws)
    assert second.data_ptr() == first.data_ptr()  # the same buffer, drawn into again
    assert torch.equal(second, torch.randn((4, 5), generator=g))
