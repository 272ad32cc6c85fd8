"""Gaussian diffusion (Ho et al., 2020): the forward process and its posterior, and the object that
joins them to the parameterisation (`ddpm.parameterisation`), the objectives (`ddpm.objectives`)
and the samplers (`ddpm.samplers`).

Time steps are 0-based: t = 0 is the paper's t = 1 and t = T-1 its t = T. Schedule buffers are
float64; every result is cast to the dtype of the input x.

Continuous time (the probability-flow ODE, `ddpm.samplers.ode`): a fractional step s in [-1, T-1]
has log alpha (alpha = sqrt(abar)) linear in s between the steps' values, as DPM-Solver's
discrete-time wrapper interpolates them, with the data (abar = 1) one step below the first, at
s = -1 (see `log_alpha_at`). Methods that take t accept such s as a floating-point tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ddpm import objectives
from ddpm.objectives import (  # noqa: F401 - the names other code imports from here
    ImportanceTimesteps,
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    normal_kl,
)
from ddpm.parameterisation import (  # noqa: F401 - the names other code imports from here
    FIXED_VARIANCES,
    LEARNED_VARIANCES,
    LOSSES,
    PREDICTIONS,
    VARIANCES,
    WEIGHTINGS,
    Coefficients,
    Parameterisation,
    check_parameterisation,
    output_channels,
)
from ddpm.samplers.ancestral import ancestral_step, ancestral_steps
from ddpm.samplers.base import Model, initial_noise, last, run_chain
from ddpm.samplers.ddim import DDIMCoefficients, ddim_coefficients, ddim_step, ddim_steps


class GaussianDiffusion(nn.Module):
    """The DDPM forward process for a fixed beta schedule, with the reverse process and objective
    chosen by `variance`, `prediction` (see `Parameterisation`) and `loss` (see
    `ddpm.objectives`): "simple" (the squared error against the prediction's target, eq. 14 for
    eps, weighted per t by `weighting`), "hybrid" (simple plus `vlb_weight` T L_t with the mean's
    gradient stopped, Improved DDPM) or "vlb" (T L_t, the true bound). `mean_coefficients` are the
    posterior-mean coefficients a "mean" output refers to, per step of this chain (`respace`
    passes the trained chain's); None: this chain's. The buffers are non-persistent (they follow
    from the schedule) and stay float64 when the module is cast to another dtype.
    """

    def __init__(
        self,
        betas: torch.Tensor | Sequence[float],
        variance: str = "beta",
        prediction: str = "eps",
        loss: str = "simple",
        timestep_map: torch.Tensor | Sequence[int] | None = None,
        vlb_weight: float = 1e-3,
        weighting: str = "none",
        min_snr_gamma: float = 5.0,
        mean_coefficients: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        check_parameterisation(variance, prediction, loss, vlb_weight, weighting, min_snr_gamma)
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a non-empty sequence of values strictly inside (0, 1).")
        self.variance, self.prediction, self.loss = variance, prediction, loss
        self.vlb_weight, self.weighting, self.min_snr_gamma = vlb_weight, weighting, min_snr_gamma
        self.num_timesteps = T = int(betas.numel())
        # a "mean" output is mu_tilde of the chain the network was trained on
        self.parameterisation = Parameterisation(prediction, variance, mean_coefficients is None)
        self.learned_variance = self.parameterisation.learned_variance

        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        # Eq. 7: beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t; it is 0 at t = 0.
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # log(0) at t = 0 is replaced by the log of beta_tilde at the next step (t = 1); with a
        # single step there is none, and beta_0 stands in.
        first = posterior_variance[1:2] if T > 1 else betas[:1]
        posterior_log_variance_clipped = torch.log(torch.cat([first, posterior_variance[1:]]))
        # Eq. 7: mu_tilde_t = coef1 * x_0 + coef2 * x_t.
        coef1 = betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)
        coef2 = (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod)
        mean_coef1, mean_coef2 = (coef1, coef2) if mean_coefficients is None else mean_coefficients
        mean_coef1 = torch.as_tensor(mean_coef1, dtype=torch.float64)
        mean_coef2 = torch.as_tensor(mean_coef2, dtype=torch.float64)
        snr = alphas_cumprod / (1.0 - alphas_cumprod)

        # The network is always called with timestep_map[t]: the identity, or for a respaced
        # chain (see `respace`) the original step that respaced step t stands for.
        if timestep_map is None:
            timestep_map = torch.arange(T)
        timestep_map = torch.as_tensor(timestep_map, dtype=torch.long)
        if timestep_map.shape != betas.shape:
            raise ValueError("timestep_map must have one entry per beta.")
        self.register_buffer("timestep_map", timestep_map, persistent=False)

        # the fixed sigma_t^2: beta_t (beta_tilde_1 at t = 0, as the original code) or beta_tilde_t
        if variance == "tilde_beta":
            model_log_variance, model_variance = posterior_log_variance_clipped, posterior_variance
        else:
            model_log_variance = torch.log(torch.cat([first, betas[1:]]))
            model_variance = model_log_variance.exp()
        alpha, sigma = alphas_cumprod.sqrt(), (1.0 - alphas_cumprod).sqrt()
        # log alpha at s = -1 (the data), 0, ..., T-1: the knots of the continuous time
        self.is_trained_chain = mean_coefficients is None and bool(
            (timestep_map == torch.arange(T)).all()
        )
        buffers = {
            "log_alpha_knots": 0.5 * torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod]).log(),
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alpha,
            "sqrt_one_minus_alphas_cumprod": sigma,
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_log_variance_clipped,
            "posterior_mean_coef1": coef1,
            "posterior_mean_coef2": coef2,
            "mean_coef1": mean_coef1,
            "mean_coef2": mean_coef2,
            "model_log_variance": model_log_variance,
            "snr": snr,
            "loss_weight": objectives.loss_weight(
                prediction, weighting, min_snr_gamma, snr, mean_coef1
            ),
        }
        x0_x, x0_out = self.parameterisation.x0_coefficients(alpha, sigma, mean_coef1, mean_coef2)
        columns = Coefficients(
            x0_x=x0_x,
            x0_out=x0_out,
            alpha=alpha,
            sigma=sigma,
            mean_x0=coef1,
            mean_x=coef2,
            log_variance=model_log_variance,
            variance=model_variance,
            log_variance_low=posterior_log_variance_clipped,
            log_variance_high=betas.log(),
            noise=(torch.arange(T) > 0).double(),
        )
        buffers["coefficient_table"] = torch.stack(columns, dim=1)  # [T, fields]
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - torch's signature
        """Follow the device of `.to()` / `.cuda()` but keep the schedule in float64."""
        float64 = {n: b for n, b in self.named_buffers(recurse=False) if b.is_floating_point()}
        super()._apply(fn, recurse)
        for name, old in float64.items():
            self._buffers[name] = old.to(self._buffers[name].device)
        return self

    @staticmethod
    def _extract(buffer: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """buffer[t] in x's dtype, shaped [B, 1, ..., 1] to broadcast against x."""
        return buffer[t].to(x.dtype).reshape(t.shape[0], *((1,) * (x.ndim - 1)))

    def coefficients(self, t: torch.Tensor, x: torch.Tensor) -> Coefficients:
        """Each example's step's `Coefficients`, tensors [B, 1, ..., 1] in x's dtype. At a
        fractional step s (a floating-point t) those of x_0, eps and the mean follow from the
        continuous schedule (abar at s, and at s - 1 for the mean's posterior); the variance's
        are the nearest step's (a variance belongs to a step of the chain)."""
        if t.is_floating_point():
            nearest = self.coefficient_table[self.nearest_step(t)]
            rows = torch.cat([self._continuous_columns(t), nearest[:, 6:]], dim=1).to(x.dtype)
        else:
            rows = self.coefficient_table[t].to(x.dtype)
        return Coefficients(*rows.T.reshape(-1, t.shape[0], *((1,) * (x.ndim - 1))))

    def _continuous_columns(self, s: torch.Tensor) -> torch.Tensor:
        """The first six `Coefficients` at fractional steps s, float64 [B, 6]: eq. 4 and the
        posterior of eq. 7 from s - 1 (abar = 1 below s = 0) to s."""
        if not self.is_trained_chain:
            raise ValueError(
                "a fractional step needs the trained chain (this one is respaced): use the "
                "chain the network was trained on."
            )
        log_alpha = self.log_alpha_at(s)
        log_alpha_prev = self.log_alpha_at(s - 1)
        one_minus_abar = -torch.expm1(2 * log_alpha)
        beta = -torch.expm1(2 * (log_alpha - log_alpha_prev))
        alpha, sigma = log_alpha.exp(), one_minus_abar.sqrt()
        coef1 = beta * log_alpha_prev.exp() / one_minus_abar
        coef2 = -torch.expm1(2 * log_alpha_prev) * (1 - beta).sqrt() / one_minus_abar
        x0_x, x0_out = self.parameterisation.x0_coefficients(alpha, sigma, coef1, coef2)
        return torch.stack([x0_x, x0_out, alpha, sigma, coef1, coef2], dim=1)

    def nearest_step(self, s: torch.Tensor) -> torch.Tensor:
        """The chain's step (int64) nearest each continuous step s: where a quantity that belongs
        to a step (the reverse variance) is read at a fractional one."""
        return s.round().clamp(0, self.num_timesteps - 1).long()

    def log_alpha_at(self, s: torch.Tensor) -> torch.Tensor:
        """log sqrt(abar) at continuous steps s (clamped to [-1, T-1]), float64: linear in s
        between log sqrt(abar_t) at the steps t = 0..T-1 and 0 at s = -1 (the data, abar = 1)."""
        knots = self.log_alpha_knots
        u = s.to(knots.device, torch.float64).clamp(-1, self.num_timesteps - 1) + 1
        i = u.floor().long().clamp(max=self.num_timesteps - 1)
        return knots[i] + (u - i) * (knots[i + 1] - knots[i])

    def step_at(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """The continuous step s in [-1, T-1] where log sqrt(abar) is `log_alpha` (`log_alpha_at`
        inverted), float64."""
        knots = self.log_alpha_knots  # decreasing from 0
        log_alpha = log_alpha.to(knots.device, torch.float64).clamp(knots[-1], 0)
        i = (torch.searchsorted(-knots, -log_alpha) - 1).clamp(0, self.num_timesteps - 1)
        return i - 1 + (knots[i] - log_alpha) / (knots[i] - knots[i + 1])

    def alphas_cumprod_at(self, t: torch.Tensor) -> torch.Tensor:
        """abar at each example's step, float64 [B] on t's device: an integer step's, or at a
        fractional step the continuous schedule's."""
        if t.is_floating_point():
            return (2 * self.log_alpha_at(t)).exp().to(t.device)
        return self.alphas_cumprod.to(t.device)[t]

    def step_coefficients(self) -> list[Coefficients]:
        """Per step i of the chain its `Coefficients` as float64-exact Python numbers: a sampler's
        step, where every example is at the same step, costs no tensor indexing."""
        return [Coefficients(*row) for row in self.coefficient_table.tolist()]

    # The forward process and its posterior.

    def q_sample(
        self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eqs. 6-7: mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = Parameterisation.posterior_mean(self.coefficients(t, x_t), x0, x_t)
        variance = self._extract(self.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    def respace(self, steps: int | Sequence[int]) -> GaussianDiffusion:
        """A chain over some steps of this one (improved-diffusion's respacing): `steps` evenly
        spaced ones (round(i (T-1) / (steps-1)), the first and last kept), or the given steps.

        The betas are recomputed from abar on the kept steps, beta_i = 1 - abar_{s_i} /
        abar_{s_(i-1)}, so that q(x_t | x_0) is unchanged at every kept step. The network still
        sees the original t; a "learned_range" variance interpolates between the respaced chain's
        bounds, and a "mean" output is read with the original chain's posterior coefficients.
        """
        T = self.num_timesteps
        if isinstance(steps, int) and not isinstance(steps, bool):
            if not 1 <= steps <= T:
                raise ValueError(f"steps={steps!r} is invalid: it must be an integer in [1, {T}].")
            kept = torch.tensor([T - 1])
            if steps > 1:
                kept = torch.unique(torch.round(torch.arange(steps) * (T - 1) / (steps - 1)).long())
        else:
            kept = torch.as_tensor(list(steps), dtype=torch.long)
            if (
                kept.numel() < 1
                or not bool((kept.diff() > 0).all())
                or not 0 <= kept[0] <= kept[-1] < T
            ):
                raise ValueError(f"steps={kept.tolist()} must be increasing steps in [0, {T - 1}].")
        abar = self.alphas_cumprod.cpu()[kept]
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        return GaussianDiffusion(
            1 - abar / abar_prev,
            variance=self.variance,
            prediction=self.prediction,
            loss=self.loss,
            timestep_map=self.timestep_map.cpu()[kept],
            vlb_weight=self.vlb_weight,
            weighting=self.weighting,
            min_snr_gamma=self.min_snr_gamma,
            mean_coefficients=(self.mean_coef1.cpu()[kept], self.mean_coef2.cpu()[kept]),
        )

    # The parameterisation, per example (`Parameterisation` with this chain's coefficients).

    def predict_x0_from_eps(
        self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        """Eq. 4 solved for x_0: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        k = self.coefficients(t, x_t)
        return (x_t - k.sigma * eps) / k.alpha

    def predict_eps_from_x0(
        self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor
    ) -> torch.Tensor:
        """Eq. 4 solved for eps: eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
        return Parameterisation.eps(self.coefficients(t, x_t), x0, x_t)

    def predict_x0(
        self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """x_0 from the network's prediction (unclipped)."""
        return Parameterisation.x0(self.coefficients(t, x_t), prediction, x_t)

    def loss_target(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """What the network's prediction is trained towards: eps, x_0, mu_tilde(x_0, x_t) or v."""
        return self.parameterisation.target(self.coefficients(t, x0), x0, x_t, noise)

    def split_output(self, model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prediction, variance values or None)."""
        return self.parameterisation.split(model_output)

    def model_log_variance_from(
        self, values: torch.Tensor | None, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """log sigma_t^2 of p(x_{t-1} | x_t), per dimension."""
        log_variance = self.parameterisation.log_variance(self.coefficients(t, x_t), values)
        return log_variance.expand_as(x_t)

    def p_mean_variance(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance, log variance of p(x_{t-1} | x_t) and the predicted x_0 (clamped to
        [-1, 1] when `clip_denoised`): `Parameterisation.reverse`."""
        k = self.coefficients(t, x_t)
        mean, log_variance, x0 = self.parameterisation.reverse(k, model_output, x_t, clip_denoised)
        log_variance = log_variance.expand_as(x_t)
        variance = (
            k.variance.expand_as(x_t) if self.variance == "tilde_beta" else log_variance.exp()
        )
        return mean, variance, log_variance, x0

    # The samplers' steps, per example, and the all-steps chains (`ddpm.samplers` for the rest).

    def p_sample(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        clip_denoised: bool = False,
    ) -> torch.Tensor:
        """Algorithm 2, line 4: x_{t-1} = mu_theta + sigma_t z, with no noise where t == 0."""
        k = self.coefficients(t, x_t)
        return ancestral_step(self.parameterisation, k, model_output, x_t, noise, clip_denoised)[0]

    def ddim_sample(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        eta: float = 0.0,
        clip_denoised: bool = False,
    ) -> torch.Tensor:
        """Song et al. (2021), eq. 12: one DDIM step from step t to the chain's previous step."""
        d = DDIMCoefficients(*(self._extract(c, t, x_t) for c in ddim_coefficients(self, eta)))
        k, p = self.coefficients(t, x_t), self.parameterisation
        return ddim_step(p, k, d, model_output, x_t, noise, clip_denoised)[0]

    @torch.no_grad()
    def sample_steps(
        self,
        model: Model,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        clip_denoised: bool = True,
        progress: bool = False,
        eta: float | None = None,
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """This chain from x_T ~ N(0, I) (the generator's first draw, on its device, moved to the
        buffers'), yielding (t, x_{t-1}, predicted x_0) per step: ancestral (eta None) or DDIM."""
        x = initial_noise(tuple(shape), generator, self.betas.device)
        if eta is None:
            step, noisy = ancestral_steps(self, clip_denoised), True
        else:
            step, noisy = ddim_steps(self, eta, clip_denoised), eta > 0
        return run_chain(self, model, x, step, generator, progress, noisy)

    def sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        clip_denoised: bool = True,
        progress: bool = False,
    ) -> torch.Tensor:
        """Algorithm 2: ancestral sampling from x_T ~ N(0, I) down to x_0."""
        return last(self.sample_steps(model, shape, generator, clip_denoised, progress))

    def ddim_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        clip_denoised: bool = True,
        progress: bool = False,
    ) -> torch.Tensor:
        """DDIM sampling over this chain's steps (respace first for fewer steps)."""
        return last(self.sample_steps(model, shape, generator, clip_denoised, progress, eta=eta))

    # The objectives (`ddpm.objectives`).

    def sample_timesteps(
        self, n: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """n steps t ~ Uniform{0, ..., T-1}, as L_simple draws them (Algorithm 1, line 3)."""
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)

    def training_terms(
        self,
        model: Model,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        num_levels: int | None = 256,
        **model_kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """`objectives.training_terms`: the loss per example and its parts, [B] each."""
        return objectives.training_terms(self, model, x0, t, noise, num_levels, **model_kwargs)

    def training_loss(
        self,
        model: Model,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        num_levels: int | None = 256,
        **model_kwargs: Any,
    ) -> torch.Tensor:
        """The objective per example, [B]: for eps with loss=simple, eq. 14, L_simple."""
        return self.training_terms(model, x0, t, noise, num_levels, **model_kwargs)["loss"]

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T in bits/dim, [B] (`objectives.prior_bpd`)."""
        return objectives.prior_bpd(self, x0)

    def vb_terms_bpd(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        num_levels: int | None = 256,
        clip_denoised: bool = False,
    ) -> torch.Tensor:
        """L_{t-1} (L_0 where t == 0) in bits/dim, [B], in float64 (`objectives.vb_terms`)."""
        terms = objectives.vb_terms(
            self, model_output.double(), x0.double(), x_t.double(), t, num_levels, clip_denoised
        )
        return terms.to(x0.dtype)

    def nll_bpd(
        self,
        model: Model,
        x0: torch.Tensor,
        num_levels: int | None = 256,
        generator: torch.Generator | None = None,
        clip_denoised: bool = False,
        **model_kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """The full variational bound in bits/dim (`objectives.nll_bpd`)."""
        return objectives.nll_bpd(
            self, model, x0, num_levels, generator, clip_denoised, **model_kwargs
        )
