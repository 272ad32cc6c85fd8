"""Beta schedules beta_1..beta_T (pure functions, float64).

`linear`, `quadratic` and `sigmoid` are given by their end points at the paper's T = 1000
(beta_start = 1e-4, beta_end = 0.02); for another T both ends are scaled by 1000 / T, as in
improved-diffusion, so that the total amount of noise stays comparable. `cosine` is
Nichol & Dhariwal (2021), eq. 17.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine", "quadratic", "sigmoid")


def _check_timesteps(timesteps: object) -> int:
    if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 1:
        raise ValueError(f"timesteps={timesteps!r} is invalid: it must be an integer >= 1.")
    return timesteps


def linear_schedule(
    timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """Ho et al. (2020), sec. 4: beta linear in t, ends scaled by 1000 / T."""
    scale = 1000.0 / timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, timesteps, dtype=torch.float64)


def quadratic_schedule(
    timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """sqrt(beta) linear in t (the original DDPM code's "quad"), ends scaled by 1000 / T."""
    scale = 1000.0 / timesteps
    root = torch.linspace(
        math.sqrt(scale * beta_start), math.sqrt(scale * beta_end), timesteps, dtype=torch.float64
    )
    return root**2


def sigmoid_schedule(
    timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02, width: float = 6.0
) -> torch.Tensor:
    """beta = beta_start + (beta_end - beta_start) * sigmoid(u), u linear in [-width, width]."""
    scale = 1000.0 / timesteps
    u = torch.linspace(-width, width, timesteps, dtype=torch.float64)
    return scale * (beta_start + (beta_end - beta_start) * torch.sigmoid(u))


def cosine_alphas_cumprod(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal (2021), eq. 17: abar(t) = f(t) / f(0), f(t) = cos^2(((t/T)+s)/(1+s) pi/2).

    `t` is the fraction t/T in [0, 1].
    """
    f = torch.cos((t.double() + s) / (1 + s) * math.pi / 2) ** 2
    return f / math.cos(s / (1 + s) * math.pi / 2) ** 2


def cosine_schedule(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """beta_t = 1 - abar(t/T) / abar((t-1)/T), clipped at `max_beta` (eq. 17 and below)."""
    abar = cosine_alphas_cumprod(torch.arange(timesteps + 1, dtype=torch.float64) / timesteps, s)
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


_FUNCTIONS = {
    "linear": linear_schedule,
    "cosine": cosine_schedule,
    "quadratic": quadratic_schedule,
    "sigmoid": sigmoid_schedule,
}


def make_beta_schedule(name: str, timesteps: int, **params: float) -> torch.Tensor:
    """Return the float64 betas [T] of schedule `name`; every beta is checked to lie in (0, 1)."""
    if name not in _FUNCTIONS:
        raise ValueError(f"schedule.name={name!r} is unknown: allowed are {', '.join(SCHEDULES)}.")
    timesteps = _check_timesteps(timesteps)
    try:
        betas = _FUNCTIONS[name](timesteps, **params)
    except TypeError as e:  # an unexpected keyword
        raise ValueError(f"schedule {name!r} got bad parameters {params}: {e}.") from None
    bad = ~((betas > 0) & (betas < 1))
    if bad.any():
        given = ", ".join(f"schedule.{k}={v!r}" for k, v in params.items())
        raise ValueError(
            f"schedule {name!r} with {given or 'its defaults'} and timesteps={timesteps} gives "
            f"{int(bad.sum())} beta(s) outside (0, 1) (min {betas.min().item():.4g}, max "
            f"{betas.max().item():.4g}); every beta must lie strictly between 0 and 1."
        )
    return betas
