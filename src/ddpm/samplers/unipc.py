"""UniPC (Zhao et al. 2023): a multistep predictor (UniP) and corrector (UniC) for the
probability-flow ODE in data prediction, with B(h) = e^h - 1 (the paper's B_2, diffusers'
solver_type="bh2"). The corrector refines each new x with the network output computed at it,
so it costs no extra call; the last step lands on sigma = 0 (x is the predicted x_0)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ddpm.checks import check_choice
from ddpm.samplers.base import (
    Model,
    Sampler,
    check_order,
    check_steps,
    denoiser,
    lambda_grid,
    progress_range,
)
from ddpm.samplers.spacing import SPACINGS

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ddpm.diffusion import GaussianDiffusion


def unipc_step(
    x: torch.Tensor,
    x0s: list[torch.Tensor],
    lambdas: list[float],
    alpha_t: float,
    sigma_t: float,
    sigma_s: float,
    x0_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """UniP (x0_t None) or UniC (x0_t: the predicted x_0 at t) of order p = len(x0s) from x at s
    to t. `x0s` are the predicted x_0 at the last p steps (latest, at s, last), `lambdas` their
    lambda and then lambda_t. With r_k = (lambda_{s_k} - lambda_s) / h and D_k = (x0_{s_k} -
    x0_s) / r_k, x_t = sigma_t / sigma_s x + alpha_t (1 - e^-h) x0_s - alpha_t B(h) sum_k rho_k
    D_k, the rho solving the order conditions R rho = b (UniC also weighs x0_t - x0_s)."""
    p, lambda_t, lambda_s = len(x0s), lambdas[-1], lambdas[-2]
    h = lambda_t - lambda_s
    hh = -h  # data prediction integrates in -lambda
    h_phi = math.expm1(hh)  # h phi_1(h): e^-h - 1
    B = math.expm1(hh)  # B_2(h)
    m0 = x0s[-1]
    r = [(lambdas[-2 - k] - lambda_s) / h for k in range(1, p)]
    D = [(x0s[-1 - k] - m0) * (1.0 / rk) for k, rk in enumerate(r, start=1)]
    out = torch.add(x * (sigma_t / sigma_s), m0, alpha=-alpha_t * h_phi)
    corrector = x0_t is not None
    if not corrector and p == 1:
        return out
    # b_j = j! h phi_{j+1}(h) / B(h), phi from phi_1 by phi_{k+1} = (phi_k - 1/k!) / hh
    b, phi_k, factorial = [], h_phi / hh - 1.0, 1.0
    for j in range(1, p + 1):
        b.append(phi_k * factorial / B)
        factorial *= j + 1
        phi_k = phi_k / hh - 1.0 / factorial
    R = torch.tensor(
        [[rk ** (j - 1) for rk in [*r, 1.0]] for j in range(1, p + 1)], dtype=torch.float64
    )
    b = torch.tensor(b, dtype=torch.float64)
    if corrector:
        rho = [0.5] if p == 1 else torch.linalg.solve(R, b).tolist()
        D = [*D, x0_t - m0]
    else:
        rho = [0.5] if p == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
    for weight, d in zip(rho, D, strict=True):
        out = torch.add(out, d, alpha=-alpha_t * B * weight)
    return out


class UniPC(Sampler):
    """`sampler=unipc`: UniPC multistep (UniP-p with UniC-p, bh2) with `steps` network calls, the
    last landing on x_0, `order` 1 to 3, steps placed by `spacing`. A learned variance is not
    used."""

    option = "unipc"  # its conf/sampler/<option>.yaml

    def __init__(self, steps: int = 10, order: int = 2, spacing: str = "logsnr") -> None:
        check_choice("sampler.spacing", spacing, SPACINGS)
        self.steps, self.spacing = check_steps(steps, allow_none=False), spacing
        self.order = check_order(order)

    def iterate(
        self,
        model: Model,
        diffusion: GaussianDiffusion,
        x_T: torch.Tensor,
        generator: torch.Generator | None = None,
        clip_denoised: bool = False,
        progress: bool = False,
        **model_kwargs: Any,
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        grid = lambda_grid(diffusion, self.timesteps(diffusion))
        x0_of = denoiser(diffusion, model, clip_denoised, **model_kwargs)
        a, s, lam = grid.alphas, grid.sigmas, grid.lambdas
        x, x0s, K, previous, order = x_T, [], len(grid.timesteps), None, 0
        for i in progress_range(K, progress):
            t = grid.timesteps[i]
            x0 = x0_of(x, t)
            if previous is not None:  # UniC: x at t again, with the x_0 just computed there
                window = lam[i - order : i + 1]
                x = unipc_step(previous, x0s[-order:], window, a[i], s[i], s[i - 1], x0)
            x0s = [*x0s, x0][-self.order :]
            order = min(self.order, K - i, i + 1)  # lower at the start and, as diffusers, the end
            previous = x
            x = unipc_step(x, x0s[-order:], lam[i - order + 1 : i + 2], a[i + 1], s[i + 1], s[i])
            yield t, x, x0
