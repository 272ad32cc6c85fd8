"""Beta schedules against their definitions, computed independently in float64."""

import math

import pytest
import torch

from ddpm.schedules import SCHEDULES, make_beta_schedule


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("timesteps", [50, 1000, 4000])
def test_shape_dtype_range(name: str, timesteps: int) -> None:
    betas = make_beta_schedule(name, timesteps)
    assert betas.shape == (timesteps,)
    assert betas.dtype == torch.float64
    assert bool(((betas > 0) & (betas < 1)).all())


@pytest.mark.parametrize("name", SCHEDULES)
def test_betas_increase_and_abar_decreases(name: str) -> None:
    betas = make_beta_schedule(name, 1000)
    assert bool((betas[1:] >= betas[:-1]).all())
    abar = torch.cumprod(1 - betas, 0)
    assert bool((abar[1:] < abar[:-1]).all())


@pytest.mark.parametrize("timesteps", [1000, 250, 100])
def test_linear_endpoints_scale_with_t(timesteps: int) -> None:
    betas = make_beta_schedule("linear", timesteps)
    scale = 1000 / timesteps
    assert betas[0].item() == pytest.approx(1e-4 * scale, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02 * scale, rel=1e-12)
    assert torch.allclose(betas.diff(), betas.diff()[0].expand(timesteps - 1), rtol=1e-9)


def test_quadratic_is_linear_in_sqrt_beta() -> None:
    root = make_beta_schedule("quadratic", 1000).sqrt()
    assert root[0].item() == pytest.approx(math.sqrt(1e-4))
    assert root[-1].item() == pytest.approx(math.sqrt(0.02))
    assert root.diff().diff().abs().max().item() < 1e-12


def test_sigmoid_is_symmetric_between_its_ends() -> None:
    betas = make_beta_schedule("sigmoid", 1000)
    mid = 1e-4 + 0.02
    assert torch.allclose(betas + betas.flip(0), torch.full_like(betas, mid), rtol=1e-12)
    expected_first = 1e-4 + (0.02 - 1e-4) / (1 + math.exp(6.0))
    assert betas[0].item() == pytest.approx(expected_first, rel=1e-12)


@pytest.mark.parametrize("timesteps", [50, 1000])
def test_cosine_alphas_cumprod_matches_closed_form(timesteps: int) -> None:
    s = 0.008
    betas = make_beta_schedule("cosine", timesteps)
    abar = torch.cumprod(1 - betas, 0)

    def f(t: float) -> float:
        return math.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2

    # Closed form abar_t = f(t) / f(0) holds up to the first step clipped at 0.999.
    unclipped = int((betas < 0.999).sum())
    assert unclipped >= timesteps - 1
    expected = torch.tensor([f(t + 1) / f(0) for t in range(unclipped)], dtype=torch.float64)
    assert torch.allclose(abar[:unclipped], expected, rtol=1e-10, atol=1e-14)
    assert betas.max().item() <= 0.999


@pytest.mark.parametrize("bad", [0, -3, 1.5, "abc", None, True])
def test_bad_timesteps(bad: object) -> None:
    with pytest.raises(ValueError, match=r"timesteps=.*integer >= 1"):
        make_beta_schedule("linear", bad)  # type: ignore[arg-type]


def test_beta_outside_unit_interval_is_refused() -> None:
    with pytest.raises(ValueError, match=r"schedule.beta_end=2.0.*outside \(0, 1\)"):
        make_beta_schedule("linear", 1000, beta_start=1e-4, beta_end=2.0)
    # The paper's linear ends scaled by 1000/T reach 1 at T = 20.
    with pytest.raises(ValueError, match=r"timesteps=20 gives 1 beta"):
        make_beta_schedule("linear", 20)


def test_unknown_schedule_name() -> None:
    with pytest.raises(ValueError, match=r"schedule.name='nope' is unknown: allowed are linear"):
        make_beta_schedule("nope", 100)
