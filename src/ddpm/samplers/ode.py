"""The probability-flow ODE (Song et al. 2021, section 4.3) of a trained chain, solved by an
adaptive integrator: the `ode` sampler, and the flow whose exact likelihood `ddpm.likelihood`
computes.

Time is continuous: a fractional step s in [-1, T-1] has log alpha (alpha = sqrt(abar)) linear in
s between the chain's steps (DPM-Solver's discrete-time wrapper), and 0 at s = -1, the data (see
`GaussianDiffusion.log_alpha_at`); the network is called at s (a float). The integration variable
is the half log-SNR lambda = log(alpha / sigma), in which the ODE is

    dx / dlambda = alpha (x0(x, s(lambda)) - alpha x),     alpha^2 = sigmoid(2 lambda),

x0 the network's prediction read as x_0 by the parameterisation (DPM-Solver++'s form; its
solvers are fixed-step approximations of this flow). The integrator is torchdiffeq's (adaptive
Runge-Kutta with error control, on any device): a maintained library, not our own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from ddpm.checks import check_choice, check_positive
from ddpm.samplers.base import Model, Sampler, denoiser

if TYPE_CHECKING:
    from ddpm.diffusion import GaussianDiffusion

# torchdiffeq's adaptive methods (with error control)
METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
# Where the flow stops before the data (abar = 1, lambda = inf): sigma = 1e-4, abar = 1 - 1e-8.
# What it leaves out moves x by O(sigma^2) and log p by O(sigma^2) times the data's curvature
# (about 1e-6 nats for data=gmm); the chain's first step has sigma = sqrt(beta_1), 0.01 for
# linear's.
SIGMA_AT_DATA = 1e-4


def check_tolerances(rtol: float, atol: float, method: str, key: str) -> None:
    """One-sentence errors for an integrator's settings under `key` (e.g. `ode`)."""
    check_positive(f"{key}.rtol", rtol)
    check_positive(f"{key}.atol", atol)
    check_choice(f"{key}.method", method, METHODS)


def lambda_at(diffusion: GaussianDiffusion, s: float) -> float:
    """lambda = log(alpha / sigma) at the continuous step s."""
    log_alpha = float(diffusion.log_alpha_at(torch.tensor([float(s)]))[0])
    return log_alpha - 0.5 * math.log(-math.expm1(2 * log_alpha))


def lambda_at_data(diffusion: GaussianDiffusion) -> float:
    """Where the flow meets the data: lambda at sigma = SIGMA_AT_DATA (or at the chain's first
    step, if its sigma is smaller)."""
    return max(math.log(math.sqrt(1 - SIGMA_AT_DATA**2) / SIGMA_AT_DATA), lambda_at(diffusion, 0))


def input_dtype(model: Model) -> torch.dtype:
    """The dtype a network takes: its parameters' (float64 for a function or the oracle)."""
    parameters = model.parameters() if isinstance(model, torch.nn.Module) else ()
    return next((p.dtype for p in parameters if p.is_floating_point()), torch.float64)


def flow_denoiser(
    diffusion: GaussianDiffusion, model: Model, clip_denoised: bool = False, **model_kwargs: Any
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """x0(x, lambda): the network called at the continuous step s(lambda) (x float64, lambda a
    0-d tensor), its output read as x_0 in float64 (clamped when `clip_denoised`)."""
    dtype = input_dtype(model)
    p = diffusion.parameterisation

    def x0(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        log_alpha = -0.5 * torch.nn.functional.softplus(-2 * lam.double())
        s = diffusion.step_at(log_alpha.reshape(1)).to(x.device).expand(x.shape[0])
        out = model(x.to(dtype), s, **model_kwargs).double()
        return p.denoised(diffusion.coefficients(s, x), out, x, clip_denoised)[0]

    return x0


def drift(x: torch.Tensor, x0: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """dx / dlambda = alpha (x0 - alpha x)."""
    alpha = torch.sigmoid(2 * lam.double()).sqrt()
    return alpha * (x0 - alpha * x)


def per_example_norm(errors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The error norm of a batch: the largest over examples (and over the state's tensors) of an
    example's RMS error, so that every example meets the tolerance, not only their average."""
    worst = [e.reshape(e.shape[0], -1).pow(2).mean(1).max() for e in errors]
    return torch.stack(worst).max().sqrt()


def odeint(
    f: Callable,
    state: tuple[torch.Tensor, ...],
    start: float,
    end: float,
    rtol: float,
    atol: float,
    method: str,
) -> tuple[torch.Tensor, ...]:
    """The state (a tuple of tensors [B, ...]) at lambda = `end` of d state / dlambda =
    f(lambda, state) from `start`, by torchdiffeq, each example within rtol and atol."""
    import torchdiffeq

    times = torch.tensor([start, end], dtype=torch.float64, device=state[0].device)
    solution = torchdiffeq.odeint(
        f, state, times, rtol=rtol, atol=atol, method=method, options={"norm": per_example_norm}
    )
    return tuple(s[-1] for s in solution)


class ODE(Sampler):
    """The probability-flow ODE from x_T (step T-1) to the chain's first step, integrated to
    tolerance by an adaptive method, then the predicted x_0 there: the solution the fixed-step
    ODE solvers (DDIM, DPM-Solver++, UniPC) converge to as their steps grow. The network calls
    are the integrator's choice (`network_calls`, measured); `iterate` reports x once, at the
    end."""

    option = "ode"
    noisy = False

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5, method: str = "dopri5") -> None:
        check_tolerances(rtol, atol, method, "sampler")
        self.rtol, self.atol, self.method = float(rtol), float(atol), method
        self._calls: list[int] = []  # per sample() so far: the network calls (each per example)

    def timesteps(self, diffusion: GaussianDiffusion) -> torch.Tensor:
        """[0]: the step where x is reported (the integrator picks the steps it calls at)."""
        return torch.zeros(1, dtype=torch.long)

    def network_calls(self, diffusion: GaussianDiffusion) -> float | None:
        """The mean network calls per sample of the batches sampled so far (None before)."""
        return sum(self._calls) / len(self._calls) if self._calls else None

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
        x0_at = flow_denoiser(diffusion, model, clip_denoised, **model_kwargs)
        calls = [0]

        def f(lam: torch.Tensor, state: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
            calls[0] += 1
            return (drift(state[0], x0_at(state[0], lam), lam),)

        x = x_T.double()
        T = diffusion.num_timesteps
        if T > 1:
            start, end = lambda_at(diffusion, T - 1), lambda_at(diffusion, 0)
            (x,) = odeint(f, (x,), start, end, self.rtol, self.atol, self.method)
        x0 = denoiser(diffusion, model, clip_denoised, **model_kwargs)(x.to(x_T.dtype), 0)
        self._calls.append(calls[0] + 1)
        yield 0, x0, x0
