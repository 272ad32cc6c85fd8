"""What every sampler shares: noise draws, the loop over a chain's steps, `sample`."""

from __future__ import annotations

import collections
import inspect
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from ddpm.samplers.spacing import spaced_timesteps

if TYPE_CHECKING:
    from ddpm.diffusion import GaussianDiffusion

Model = Callable[..., torch.Tensor]
Step = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def normal_draws(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Iterator[torch.Tensor]:
    """Endless N(0, I) draws of `shape` from `generator` (the default CPU generator when None),
    on `device`, each in the same reused tensor (valid until the next draw).

    From a CPU generator to a GPU, two pinned host buffers take turns: the copy to the GPU does
    not block, so drawing the next step's noise overlaps the GPU's work on this one.
    """
    source = generator.device if generator is not None else torch.device("cpu")
    if source.type == device.type:
        out = torch.empty(shape, device=device)
        while True:
            yield torch.randn(shape, generator=generator, device=device, out=out)
    if source.type != "cpu" or device.type != "cuda":
        while True:
            yield torch.randn(shape, generator=generator, device=source).to(device)
    host = [torch.empty(shape, pin_memory=True) for _ in range(2)]
    copied: list[torch.cuda.Event | None] = [None, None]
    out = torch.empty(shape, device=device)
    for k in itertools.cycle((0, 1)):
        if copied[k] is not None:
            copied[k].synchronize()  # the copy from this buffer, two draws ago, is done
        torch.randn(shape, generator=generator, out=host[k])
        out.copy_(host[k], non_blocking=True)
        copied[k] = torch.cuda.Event()
        copied[k].record()
        yield out


def initial_noise(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """x_T ~ N(0, I): the generator's next draw, on its device (the CPU when None), moved to
    `device`, as `normal_draws`' first draw would be (so a seed gives x_T on any device)."""
    source = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=source).to(device)


def run_chain(
    chain: GaussianDiffusion,
    model: Model,
    x: torch.Tensor,
    step: Step,
    generator: torch.Generator | None = None,
    progress: bool = False,
    noisy: bool = True,
    **model_kwargs: Any,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Every step i = T-1, ..., 0 of `chain` from x = x_T: out = model(x, timestep_map[i]), a
    noise draw (`noisy`: at every step, the last too, so that a seed gives the same draws with
    any noisy sampler of this loop; else None), then x, predicted x_0 = step(i, out, x, noise);
    yields (i, x, x_0)."""
    draws = normal_draws(tuple(x.shape), generator, x.device) if noisy else None
    # the network's t for every step, made once: row i is timestep_map[i] for each example
    model_t = chain.timestep_map.to(x.device)[:, None].repeat(1, x.shape[0])
    T = chain.num_timesteps
    for j in progress_range(T, progress):
        i = T - 1 - j
        out = model(x, model_t[i], **model_kwargs)
        x, x0 = step(i, out, x, next(draws) if draws is not None else None)
        yield i, x, x0


class LambdaGrid(NamedTuple):
    """An ODE solver's grid: the trained chain's `timesteps` (descending) and, at each and at a
    final sigma = 0 point, alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma)
    (inf at the end), as Python floats."""

    timesteps: list[int]
    alphas: list[float]
    sigmas: list[float]
    lambdas: list[float]


def lambda_grid(diffusion: GaussianDiffusion, timesteps: torch.Tensor) -> LambdaGrid:
    abar = diffusion.alphas_cumprod.cpu()[timesteps].tolist()
    alphas = [math.sqrt(a) for a in abar] + [1.0]
    sigmas = [math.sqrt(1.0 - a) for a in abar] + [0.0]
    lambdas = [math.log(a / s) if s > 0 else math.inf for a, s in zip(alphas, sigmas, strict=True)]
    return LambdaGrid(timesteps.tolist(), alphas, sigmas, lambdas)


def denoiser(
    diffusion: GaussianDiffusion, model: Model, clip_denoised: bool, **model_kwargs: Any
) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """x_0(x, t): the network called at step t of the trained chain, its output read as the
    predicted x_0 by the parameterisation (clamped to [-1, 1] when `clip_denoised`)."""
    p, ks = diffusion.parameterisation, diffusion.step_coefficients()
    network_t = diffusion.timestep_map.tolist()  # once: no read-back from the device per call

    def x0(x: torch.Tensor, t: int) -> torch.Tensor:
        model_t = torch.full((x.shape[0],), network_t[t], device=x.device)
        return p.denoised(ks[t], model(x, model_t, **model_kwargs), x, clip_denoised)[0]

    return x0


def progress_range(n: int, progress: bool) -> Iterable[int]:
    """range(n), with a progress bar when `progress`."""
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc="sampling")


def last(steps: Iterator[tuple[int, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The final x of a chain of steps."""
    return collections.deque(steps, maxlen=1)[0][1]


class Sampler:
    """The two methods every sampler has (`timesteps`, `sample`), and `iterate`, which yields (t
    of the trained chain, x after the step, predicted x_0) as it goes (trajectories, progress)."""

    option: str  # its conf/sampler/<option>.yaml
    steps: int | None = None
    spacing: str = "linspace"
    noisy = True  # whether `steps_on`'s steps use noise (one draw a step)

    def timesteps(self, diffusion: GaussianDiffusion) -> torch.Tensor:
        """The trained chain's steps at which the network is called, int64 [K], descending."""
        if self.steps is None:
            return torch.arange(diffusion.num_timesteps - 1, -1, -1)
        return spaced_timesteps(self.spacing, self.steps, diffusion.alphas_cumprod)

    def settings(self) -> dict[str, Any]:
        """Its keys (those of its constructor, conf/sampler/<option>.yaml) and their values."""
        return {name: getattr(self, name) for name in inspect.signature(type(self)).parameters}

    def network_calls(self, diffusion: GaussianDiffusion) -> float | None:
        """Network calls per sample: one per step of `timesteps`."""
        return float(len(self.timesteps(diffusion)))

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
        chain = self.respaced(diffusion)
        step = self.steps_on(chain, clip_denoised)
        network_t = chain.timestep_map.tolist()  # once: no read-back from the device per step
        steps = run_chain(chain, model, x_T, step, generator, progress, self.noisy, **model_kwargs)
        for i, x, x0 in steps:
            yield network_t[i], x, x0

    def steps_on(self, chain: GaussianDiffusion, clip_denoised: bool) -> Step:
        """The step function of `run_chain` on the (respaced) chain."""
        raise NotImplementedError

    def sample(
        self,
        model: Model,
        diffusion: GaussianDiffusion,
        x_T: torch.Tensor,
        generator: torch.Generator | None = None,
        clip_denoised: bool = False,
        **model_kwargs: Any,
    ) -> torch.Tensor:
        """x_0 from x_T; model(x, t, **model_kwargs) with t the trained chain's steps."""
        return last(self.iterate(model, diffusion, x_T, generator, clip_denoised, **model_kwargs))

    def respaced(self, diffusion: GaussianDiffusion) -> GaussianDiffusion:
        """The chain over this sampler's timesteps (the trained one itself for all steps)."""
        if self.steps is None:
            return diffusion
        return diffusion.respace(self.timesteps(diffusion).flip(0).tolist())


def check_order(order: int) -> int:
    """`sampler.order` of a multistep solver: 1, 2 or 3."""
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"sampler.order={order!r} is invalid: allowed are 1, 2, 3.")
    return order


def check_steps(steps: int | None, allow_none: bool = True) -> int | None:
    """`sampler.steps`: an integer >= 1 (its upper bound, T, is checked against the chain)."""
    if steps is None and allow_none:
        return None
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        allowed = "an integer >= 1 (at most the chain's T)" + (
            ", or null: all T" if allow_none else ""
        )
        raise ValueError(f"sampler.steps={steps!r} is invalid: it must be {allowed}.")
    return steps
