"""Samplers of a trained chain: each a class with `timesteps(diffusion)` and `sample(model,
diffusion, x_T, ...)`, the `_target_` of `conf/sampler/<name>.yaml`."""

from ddpm.samplers.ancestral import Ancestral
from ddpm.samplers.base import Sampler, normal_draws
from ddpm.samplers.ddim import DDIM
from ddpm.samplers.dpm_solver import DPMSolver
from ddpm.samplers.ode import ODE
from ddpm.samplers.spacing import SPACINGS, spaced_timesteps
from ddpm.samplers.unipc import UniPC

__all__ = [
    "DDIM",
    "SPACINGS",
    "Ancestral",
    "DPMSolver",
    "ODE",
    "Sampler",
    "UniPC",
    "normal_draws",
    "spaced_timesteps",
]
