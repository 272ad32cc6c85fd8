"""DPM-Solver++ (Lu et al. 2022b): a multistep solver of the probability-flow ODE in data
prediction, orders 1 to 3 (Algorithms 1 and 2; order 1 is DDIM with eta 0), and its SDE variant
SDE-DPM-Solver++ (section 5). Written in alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and
lambda_t = log(alpha_t / sigma_t); the last step lands on sigma = 0, where x is the predicted x_0.
"""

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
    normal_draws,
    progress_range,
)
from ddpm.samplers.spacing import SPACINGS

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ddpm.diffusion import GaussianDiffusion


def step_order(order: int, i: int, num_steps: int) -> int:
    """The order of step i of `num_steps`: lower while too few earlier x_0 are known, 1 at the
    last step (it lands on sigma = 0, where h is infinite) and at most 2 at the one before when
    there are fewer than 15 steps (diffusers' lower_order_final)."""
    if i == num_steps - 1:
        return 1
    if i == num_steps - 2 and num_steps < 15:
        return min(order, 2, i + 1)
    return min(order, i + 1)


def dpm_solver_step(
    x: torch.Tensor,
    x0s: list[torch.Tensor],
    lambdas: list[float],
    alpha_t: float,
    sigma_t: float,
    sigma_s: float,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One multistep update from s = t_{i} to t = t_{i+1}: `x0s` are the last 1, 2 or 3 predicted
    x_0 (latest last, the order of the step) at the steps whose lambda are `lambdas` (same order,
    then lambda_t). With `noise`, the SDE-DPM-Solver++ update; without, DPM-Solver++'s
    (DPM-Solver++(2M) is the midpoint rule, as diffusers' solver_type="midpoint").

    Order 3 weighs D2 = (second divided difference) h^2 / 2 by the integral of the kernel against
    (u/h)^2, which makes its local error O(h^4): diffusers' third-order updates (and DPM-Solver's
    code) weigh it by half of that (ODE) or about -1 (SDE), leaving O(h^3) and O(h^2), so they
    converge at order 2 and 1 (tests/test_solvers.py measures both).
    """
    order, lambda_t, lambda_s = len(x0s), lambdas[-1], lambdas[-2]
    h = lambda_t - lambda_s  # inf when sigma_t = 0
    D0 = x0s[-1]
    if order == 1:
        D = [D0]
    elif order == 2:
        r0 = (lambda_s - lambdas[-3]) / h
        D = [D0, (D0 - x0s[-2]) * (1.0 / r0)]
    else:
        r0, r1 = (lambda_s - lambdas[-3]) / h, (lambdas[-3] - lambdas[-4]) / h
        D1_0, D1_1 = (D0 - x0s[-2]) * (1.0 / r0), (x0s[-2] - x0s[-3]) * (1.0 / r1)
        D = [D0, D1_0 + (D1_0 - D1_1) * (r0 / (r0 + r1)), (D1_0 - D1_1) * (1.0 / (r0 + r1))]
    # The data term: alpha_t times the integral over lambda of the kernel, e^-(h-u) (ODE) or
    # 2 e^-2(h-u) (SDE), against x_0's Taylor polynomial D0 + D1 u/h + D2 (u/h)^2, in closed form.
    if noise is None:  # DPM-Solver++ (Lu et al. 2022b, eq. 9; Algorithm 2 for order 2)
        phi = -math.expm1(-h)
        out = x * (sigma_t / sigma_s)
        weights = [phi, 0.5 * phi, 0.0]  # order 2: the midpoint rule (diffusers' solver_type)
        if len(D) == 3:
            weights = [phi, 1.0 - phi / h, 1.0 - 2.0 * (h - phi) / h**2]
    else:  # SDE-DPM-Solver++: x scaled by sigma_t / sigma_s e^-h, plus sigma_t sqrt(1 - e^-2h) z
        phi = -math.expm1(-2.0 * h)
        out = torch.add(
            x * (sigma_t / sigma_s * math.exp(-h)), noise, alpha=sigma_t * math.sqrt(phi)
        )
        weights = [phi, 0.5 * phi, 0.0]
        if len(D) == 3:
            weights = [phi, 1.0 - phi / (2.0 * h), 1.0 + (phi - 2.0 * h) / (2.0 * h**2)]
    for weight, d in zip(weights[: len(D)], D, strict=True):
        out = torch.add(out, d, alpha=alpha_t * weight)
    return out


class DPMSolver(Sampler):
    """`sampler=dpm_solver`: DPM-Solver++ multistep with `steps` network calls (the last lands on
    x_0), `order` 1 to 3, steps placed by `spacing`; `stochastic`: SDE-DPM-Solver++ (orders 1-3,
    2: SDE-DPM-Solver++(2M)). A learned variance is not used."""

    option = "dpm_solver"  # its conf/sampler/<option>.yaml

    def __init__(
        self, steps: int = 20, order: int = 2, spacing: str = "logsnr", stochastic: bool = False
    ) -> None:
        check_choice("sampler.spacing", spacing, SPACINGS)
        if not isinstance(stochastic, bool):
            raise ValueError(
                f"sampler.stochastic={stochastic!r} is invalid: it must be true or false."
            )
        self.steps, self.order = check_steps(steps, allow_none=False), check_order(order)
        self.spacing, self.stochastic = spacing, stochastic

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
        draws = normal_draws(tuple(x_T.shape), generator, x_T.device) if self.stochastic else None
        x, x0s, K = x_T, [], len(grid.timesteps)
        for i in progress_range(K, progress):
            t = grid.timesteps[i]
            x0s = [*x0s, x0_of(x, t)][-self.order :]
            order = step_order(self.order, i, K)
            noise = next(draws) if draws is not None else None
            x = dpm_solver_step(
                x, x0s[-order:], grid.lambdas[i - order + 1 : i + 2], grid.alphas[i + 1],
                grid.sigmas[i + 1], grid.sigmas[i], noise,
            )  # fmt: skip
            yield t, x, x0s[-1]
