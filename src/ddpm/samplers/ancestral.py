"""The DDPM reverse process (Ho et al. 2020, Algorithm 2), over all T steps or a respaced chain of
K of them (improved-diffusion's respacing)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ddpm.checks import check_choice
from ddpm.parameterisation import Coefficients, Parameterisation, combine, std
from ddpm.samplers.base import Sampler, Step, check_steps
from ddpm.samplers.spacing import SPACINGS

if TYPE_CHECKING:
    from ddpm.diffusion import GaussianDiffusion


def ancestral_step(
    p: Parameterisation,
    k: Coefficients,
    output: torch.Tensor,
    x: torch.Tensor,
    noise: torch.Tensor,
    clip_denoised: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 2, line 4: x_{t-1} = mu_theta(x_t, t) + sigma_t z (no noise at the last step);
    returns it and the predicted x_0. `k` holds numbers (one step for the batch) or tensors (a
    step per example)."""
    mean, log_variance, x0 = p.reverse(k, output, x, clip_denoised)
    if not isinstance(k.noise, torch.Tensor):  # one step for the batch: 1, or 0 at the last
        return combine(1.0, mean, std(log_variance) if k.noise else 0.0, noise), x0
    return combine(1.0, mean, k.noise * std(log_variance), noise), x0


def ancestral_steps(chain: GaussianDiffusion, clip_denoised: bool = False) -> Step:
    """`chain`'s steps by `ancestral_step`, each with its coefficients as Python numbers
    (`GaussianDiffusion.step_coefficients`), for `run_chain`."""
    p, ks = chain.parameterisation, chain.step_coefficients()

    def step(i: int, out: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None):  # noqa: ANN202
        return ancestral_step(p, ks[i], out, x, noise, clip_denoised)

    return step


class Ancestral(Sampler):
    """`sampler=ancestral`: the DDPM reverse process with the trained variance; `steps` None: all
    T steps (Algorithm 2); K: the chain over K of them placed by `spacing`, its betas recomputed
    from abar so that q(x_t | x_0) is unchanged at each kept step (improved-diffusion)."""

    option = "ancestral"  # its conf/sampler/<option>.yaml

    def __init__(self, steps: int | None = None, spacing: str = "linspace") -> None:
        check_choice("sampler.spacing", spacing, SPACINGS)
        self.steps, self.spacing = check_steps(steps), spacing

    def steps_on(self, chain: GaussianDiffusion, clip_denoised: bool) -> Step:
        return ancestral_steps(chain, clip_denoised)
