"""DDIM (Song et al. 2021, eq. 12): from the predicted x_0 and the eps it implies, with a noise
level eta between the deterministic sampler (0) and the ancestral step with beta_tilde (1)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from ddpm.checks import check_choice
from ddpm.parameterisation import Coefficients, Number, Parameterisation, combine
from ddpm.samplers.base import Sampler, Step, check_steps
from ddpm.samplers.spacing import SPACINGS

if TYPE_CHECKING:
    from ddpm.diffusion import GaussianDiffusion


class DDIMCoefficients(NamedTuple):
    """x_prev = x0 pred_x0 + eps eps + noise z, per step (numbers, or tensors per example)."""

    x0: Number  # sqrt(abar_prev)
    eps: Number  # sqrt(1 - abar_prev - sigma^2)
    noise: Number  # sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)


def ddim_coefficients(chain: GaussianDiffusion, eta: float) -> DDIMCoefficients:
    """Eq. 12's numbers for every step of `chain`, float64 [T]; sigma is 0 at the last step."""
    abar, abar_prev = chain.alphas_cumprod, chain.alphas_cumprod_prev
    sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
    sigma[0] = 0.0
    return DDIMCoefficients(abar_prev.sqrt(), (1 - abar_prev - sigma**2).clamp(min=0).sqrt(), sigma)


def ddim_step(
    p: Parameterisation,
    k: Coefficients,
    d: DDIMCoefficients,
    output: torch.Tensor,
    x: torch.Tensor,
    noise: torch.Tensor | None,
    clip_denoised: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 12: x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z, with
    x_0 the (clipped) prediction and eps the one it implies (a learned variance is not used)."""
    x0, eps = p.denoised(k, output, x, clip_denoised)
    return combine(1.0, combine(d.x0, x0, d.eps, eps), d.noise, noise), x0


def ddim_steps(chain: GaussianDiffusion, eta: float, clip_denoised: bool = False) -> Step:
    """`chain`'s steps by `ddim_step`, each with its coefficients as Python numbers, for
    `run_chain` (with eta = 0 it needs no noise: the chain is deterministic given x_T)."""
    p, ks = chain.parameterisation, chain.step_coefficients()
    ds = [DDIMCoefficients(*row) for row in torch.stack(ddim_coefficients(chain, eta), 1).tolist()]

    def step(i: int, out: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None):  # noqa: ANN202
        return ddim_step(p, ks[i], ds[i], out, x, noise, clip_denoised)

    return step


class DDIM(Sampler):
    """`sampler=ddim`: DDIM over all T steps (`steps` None) or K of them placed by `spacing`."""

    option = "ddim"  # its conf/sampler/<option>.yaml

    def __init__(
        self, steps: int | None = None, eta: float = 0.0, spacing: str = "linspace"
    ) -> None:
        check_choice("sampler.spacing", spacing, SPACINGS)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise ValueError(
                f"sampler.eta={eta!r} is invalid: it must be a number in [0, 1] (0: deterministic "
                "DDIM, 1: the ancestral step with beta_tilde)."
            )
        self.steps, self.eta, self.spacing = check_steps(steps), float(eta), spacing

    @property
    def noisy(self) -> bool:
        return self.eta > 0

    def steps_on(self, chain: GaussianDiffusion, clip_denoised: bool) -> Step:
        return ddim_steps(chain, self.eta, clip_denoised)
