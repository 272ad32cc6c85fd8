"""Gaussian diffusion (Ho et al., 2020): the forward process, its posterior, the reverse step.

All DDPM math lives here, on tensors, with no Lightning. Time steps are 0-based: t = 0 is the
paper's t = 1 and t = T-1 its t = T. Schedule buffers are float64; every result is cast to the
dtype of the input x.

The reverse process p(x_{t-1} | x_t) = N(mu_theta, sigma_t^2) is parameterised three ways at
once: what the network predicts (`prediction`), its variance (`variance`) and the objective
(`loss`); see `GaussianDiffusion`.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn

from ddpm.checks import check_choice, check_positive

VARIANCES = ("beta", "tilde_beta", "learned", "learned_range")
LEARNED_VARIANCES = ("learned", "learned_range")
FIXED_VARIANCES = ("beta", "tilde_beta")
PREDICTIONS = ("eps", "x0", "mean", "v")
LOSSES = ("simple", "hybrid", "vlb")
WEIGHTINGS = ("none", "snr", "min_snr")

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def output_channels(channels: int, variance: str) -> int:
    """The channels of the network's output for data with `channels` channels: twice as many with
    a learned variance (the prediction, then the variance values)."""
    return 2 * channels if variance in LEARNED_VARIANCES else channels


def check_parameterisation(
    variance: str,
    prediction: str,
    loss: str,
    vlb_weight: float = 1e-3,
    weighting: str = "none",
    min_snr_gamma: float = 5.0,
) -> None:
    """One-sentence ValueErrors for unknown choices and for combinations that cannot train."""
    check_choice("variance", variance, VARIANCES)
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("loss", loss, LOSSES)
    check_choice("loss.weighting", weighting, WEIGHTINGS)
    check_positive("loss.vlb_weight", vlb_weight)
    check_positive("loss.min_snr_gamma", min_snr_gamma)
    learned = variance in LEARNED_VARIANCES
    if loss == "simple" and learned:
        raise ValueError(
            f"loss=simple with variance={variance}: L_simple does not depend on the variance, so "
            "nothing would train it; use loss=hybrid or loss=vlb, or a fixed variance "
            "(variance=beta or variance=tilde_beta)."
        )
    if loss == "hybrid" and not learned:
        raise ValueError(
            f"loss=hybrid with variance={variance}: the hybrid loss's L_vlb term trains only a "
            "learned variance, so with a fixed one it is loss=simple; use loss=simple, or "
            "variance=learned or variance=learned_range."
        )
    if loss == "vlb" and weighting != "none":
        raise ValueError(
            f"loss.weighting={weighting} with loss=vlb: the weighting applies to the simple "
            "loss's squared error, and loss=vlb is the bound itself; drop loss.weighting "
            "(allowed with loss=vlb: none)."
        )


class StepCoefficients(NamedTuple):
    """What one reverse step from x_i needs, as float64-exact Python numbers (see
    `GaussianDiffusion.step_coefficients`)."""

    a: float  # pred_x0 = a x - b out, out the network's prediction
    b: float
    c: float  # ancestral: mean = c pred_x0 + d x; DDIM: x_prev = c pred_x0 + d eps
    d: float
    s: float  # the fixed sigma (DDIM's from eta); 0 at the last step
    ae: float  # eps = (ae x - pred_x0) / be, the eps a predicted x_0 implies
    be: float
    lo: float  # learned_range: log sigma^2 from lo (v = -1) to hi (v = 1)
    hi: float


class GaussianDiffusion(nn.Module):
    """The DDPM forward and reverse processes for a fixed beta schedule, and their objective.

    `prediction` is what the network's output (its first C channels) stands for: "eps" (eq. 11),
    "x0", "mean" (mu_theta itself, the paper's x_{t-1} parameterisation) or "v" =
    sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho, 2022).
    `variance` is sigma_t^2: fixed "beta" (beta_t, except beta_tilde_1 at t = 0 as in the original
    code) or "tilde_beta" (beta_tilde_t), or learned per dimension from C more output channels:
    "learned" (log sigma^2 itself) or "learned_range" (v in [-1, 1] between log beta_tilde_t,
    clipped, and log beta_t; Improved DDPM eq. 15).
    `loss` is the objective `training_loss` computes: "simple" (the squared error against the
    prediction's target, eq. 14 for eps, weighted per t by `weighting`), "hybrid" (simple plus
    `vlb_weight` T L_t with the mean's gradient stopped, Improved DDPM) or "vlb" (T L_t, the true
    bound). `mean_coefficients` are the posterior-mean coefficients the network's "mean" output
    refers to, per step of this chain (`respace` passes the trained chain's); None: this chain's.
    The buffers are non-persistent (they follow from the schedule) and stay float64 when the module
    is cast to another dtype.
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
        self.learned_variance = variance in LEARNED_VARIANCES
        self.num_timesteps = int(betas.numel())

        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        # Eq. 7: beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t; it is 0 at t = 0.
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # log(0) at t = 0 is replaced by the log of beta_tilde at the next step (t = 1); with a
        # single step there is none, and beta_0 stands in.
        first = posterior_variance[1:2] if self.num_timesteps > 1 else betas[:1]
        posterior_log_variance_clipped = torch.log(torch.cat([first, posterior_variance[1:]]))
        # Eq. 7: mu_tilde_t = coef1 * x_0 + coef2 * x_t.
        coef1 = betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)
        coef2 = (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod)
        # a "mean" output is mu_tilde of the chain the network was trained on
        self.mean_is_output = mean_coefficients is None
        mean_coef1, mean_coef2 = (coef1, coef2) if mean_coefficients is None else mean_coefficients
        snr = alphas_cumprod / (1.0 - alphas_cumprod)

        # The network is always called with timestep_map[t]: the identity, or for a respaced
        # chain (see `respace`) the original step that respaced step t stands for.
        if timestep_map is None:
            timestep_map = torch.arange(self.num_timesteps)
        timestep_map = torch.as_tensor(timestep_map, dtype=torch.long)
        if timestep_map.shape != betas.shape:
            raise ValueError("timestep_map must have one entry per beta.")
        self.register_buffer("timestep_map", timestep_map, persistent=False)

        buffers = {
            "betas": betas,
            "log_betas": betas.log(),
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": alphas_cumprod.rsqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_log_variance_clipped,
            "posterior_mean_coef1": coef1,
            "posterior_mean_coef2": coef2,
            "mean_coef1": torch.as_tensor(mean_coef1, dtype=torch.float64),
            "mean_coef2": torch.as_tensor(mean_coef2, dtype=torch.float64),
            "snr": snr,
            "loss_weight": self._loss_weight(snr, torch.as_tensor(mean_coef1)),
        }
        if not self.learned_variance:
            if variance == "beta":
                buffers["model_log_variance"] = torch.log(torch.cat([first, betas[1:]]))
            else:
                buffers["model_log_variance"] = posterior_log_variance_clipped
            buffers["model_variance"] = buffers["model_log_variance"].exp()
            if variance == "tilde_beta":
                buffers["model_variance"] = posterior_variance  # 0 at t = 0, as eq. 7 says
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)

    def _loss_weight(self, snr: torch.Tensor, mean_coef1: torch.Tensor) -> torch.Tensor:
        """Per t, the factor on the simple loss's squared error that makes it `weighting` of the
        squared error of x_0: the error of eps is SNR times that of x_0, of v (SNR + 1) times,
        of the mean coef1^2 times. "snr" weights x_0's error by SNR (the eps loss in any
        units), "min_snr" by min(SNR, gamma) (Hang et al., 2023), "none" leaves it as it is."""
        if self.weighting == "none":
            return torch.ones_like(snr)
        units = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1.0, "mean": mean_coef1**2}
        wanted = snr if self.weighting == "snr" else snr.clamp(max=self.min_snr_gamma)
        return wanted / units[self.prediction]

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
        mean = (
            self._extract(self.posterior_mean_coef1, t, x_t) * x0
            + self._extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = self._extract(self.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    def predict_x0_from_eps(
        self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        """Eq. 4 solved for x_0: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_x0(
        self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor
    ) -> torch.Tensor:
        """Eq. 4 solved for eps: eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1 / abar_t - 1)."""
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / self._extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def predict_x0(
        self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """x_0 from the network's prediction (unclipped): eq. 4 for eps; itself for x0; the
        posterior mean inverted for mean; sqrt(abar_t) x_t - sqrt(1 - abar_t) v for v."""
        if self.prediction == "eps":
            return self.predict_x0_from_eps(x_t, t, prediction)
        if self.prediction == "x0":
            return prediction
        if self.prediction == "mean":
            return (prediction - self._extract(self.mean_coef2, t, x_t) * x_t) / self._extract(
                self.mean_coef1, t, x_t
            )
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_t) * x_t
            - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * prediction
        )

    def loss_target(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """What the network's prediction is trained towards: eps, x_0, mu_tilde(x_0, x_t) or
        v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        if self.prediction == "mean":
            return self.q_posterior_mean_variance(x0, x_t, t)[0]
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x0) * noise
            - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        )

    def split_output(self, model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prediction, variance values or None): a learned variance's network has 2C channels,
        the prediction first."""
        if not self.learned_variance:
            return model_output, None
        prediction, values = model_output.chunk(2, dim=1)
        return prediction, values

    def model_log_variance_from(
        self, values: torch.Tensor | None, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """log sigma_t^2 of p(x_{t-1} | x_t): the fixed choice, the network's value ("learned"),
        or frac log beta_t + (1 - frac) log beta_tilde_t (clipped), frac = (v + 1) / 2
        ("learned_range", Improved DDPM eq. 15)."""
        if self.variance == "learned":
            return values
        if self.variance == "learned_range":
            low = self._extract(self.posterior_log_variance_clipped, t, x_t)
            high = self._extract(self.log_betas, t, x_t)
            frac = (values + 1) / 2
            return frac * high + (1 - frac) * low
        return self._extract(self.model_log_variance, t, x_t).expand_as(x_t)

    def p_mean_variance(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance, log variance of p(x_{t-1} | x_t) and the predicted x_0 (clamped to
        [-1, 1] when `clip_denoised`).

        The mean is mu_tilde(pred_x0, x_t) (eq. 11 for eps when not clipped); a "mean" output is
        the mean itself, never clipped (on a respaced chain: mu_tilde of its unclipped x_0).
        """
        prediction, values = self.split_output(model_output)
        pred_x0 = self.predict_x0(prediction, x_t, t)
        if self.prediction == "mean":
            if self.mean_is_output:
                mean = prediction
            else:
                mean = self.q_posterior_mean_variance(pred_x0, x_t, t)[0]
            if clip_denoised:
                pred_x0 = pred_x0.clamp(-1.0, 1.0)
        else:
            if clip_denoised:
                pred_x0 = pred_x0.clamp(-1.0, 1.0)
            mean = self.q_posterior_mean_variance(pred_x0, x_t, t)[0]
        log_variance = self.model_log_variance_from(values, x_t, t)
        if self.variance == "tilde_beta":
            variance = self._extract(self.model_variance, t, x_t).expand_as(x_t)
        else:
            variance = log_variance.exp()
        return mean, variance, log_variance, pred_x0

    def p_sample(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        clip_denoised: bool = False,
    ) -> torch.Tensor:
        """Algorithm 2, line 4: x_{t-1} = mu_theta + sigma_t z, with no noise where t == 0."""
        mean, _, log_variance, _ = self.p_mean_variance(model_output, x_t, t, clip_denoised)
        return mean + _nonzero(t, x_t) * torch.exp(0.5 * log_variance) * noise

    def ddim_sample(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        eta: float = 0.0,
        clip_denoised: bool = False,
    ) -> torch.Tensor:
        """Song et al. (2021), eq. 12: one DDIM step from step t to the chain's previous step,
        from the predicted x_0 and the eps it implies (a learned variance is not used).

        sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev); eta = 1
        is the ancestral step with sigma_t^2 = beta_tilde_t, eta = 0 is deterministic.
        """
        prediction, _ = self.split_output(model_output)
        pred_x0 = self.predict_x0(prediction, x_t, t)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        if self.prediction == "eps" and not clip_denoised:
            eps = prediction
        else:  # the eps that the (clipped) x_0 implies
            eps = self.predict_eps_from_x0(x_t, t, pred_x0)
        abar = self._extract(self.alphas_cumprod, t, x_t)
        abar_prev = self._extract(self.alphas_cumprod_prev, t, x_t)
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
        mean = abar_prev.sqrt() * pred_x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
        return mean + _nonzero(t, x_t) * sigma * noise

    def step_coefficients(self, eta: float | None = None) -> list[StepCoefficients]:
        """Per step i of the chain, as float64-exact Python numbers, what one reverse step from
        x_i needs: pred_x0 = a x - b out for this chain's prediction; then for an ancestral step
        (eta None) x = c pred_x0 + d x + sigma z (eqs. 6-7), sigma = s for a fixed variance or
        from lo and hi for a learned one; for DDIM x = c pred_x0 + d eps + s z (Song et al.
        eq. 12) with eps = (ae x - pred_x0) / be. s is 0 at the last step (i = 0)."""
        ae, be = self.sqrt_recip_alphas_cumprod, self.sqrt_recipm1_alphas_cumprod
        a, b = {
            "eps": (ae, be),
            "x0": (torch.zeros_like(ae), -torch.ones_like(ae)),
            "mean": (-self.mean_coef2 / self.mean_coef1, -1.0 / self.mean_coef1),
            "v": (self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod),
        }[self.prediction]
        if eta is None:
            c, d = self.posterior_mean_coef1, self.posterior_mean_coef2
            s = (
                torch.zeros_like(ae)
                if self.learned_variance
                else (0.5 * self.model_log_variance).exp()
            )
        else:
            abar, abar_prev = self.alphas_cumprod, self.alphas_cumprod_prev
            s = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
            c, d = abar_prev.sqrt(), (1 - abar_prev - s**2).clamp(min=0).sqrt()
        s = torch.cat([s.new_zeros(1), s[1:]])
        lo, hi = self.posterior_log_variance_clipped, self.log_betas
        columns = torch.stack([a, b, c, d, s, ae, be, lo, hi], dim=1).tolist()
        return [StepCoefficients(*row) for row in columns]

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
        """Run the reverse chain from x_T ~ N(0, I), yielding (t, x_{t-1}, predicted x_0) per step.

        Ancestral sampling (Algorithm 2, the step `p_sample` takes) when `eta` is None, else DDIM
        with that eta (`ddim_sample`'s step). Every example of a batch is at the same step, so a
        step's coefficients are Python numbers (`step_coefficients`): predicting eps with a fixed
        variance, a step costs five tensor ops besides the network. Noise is drawn on the
        generator's device (the CPU when none is given) and moved to the device of the buffers,
        so a seeded generator gives the same chain on any device.
        """
        device = self.betas.device
        coefficients = self.step_coefficients(eta)
        draws = normal_draws(tuple(shape), generator, device)
        x = next(draws).clone()
        # the network's t for every step, made once: row i is timestep_map[i] for each example
        model_t = self.timestep_map[:, None].repeat(1, shape[0])
        steps = reversed(range(self.num_timesteps))
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, total=self.num_timesteps, desc="sampling")
        eps_prediction = self.prediction == "eps"
        for i in steps:
            k = coefficients[i]
            out, values = self.split_output(model(x, model_t[i]))
            if self.prediction == "x0":
                pred_x0 = out.clamp(-1.0, 1.0) if clip_denoised else out.clone()
            else:
                pred_x0 = torch.add(x * k.a, out, alpha=-k.b)
            if eta is None:
                if self.prediction == "mean":
                    if self.mean_is_output:
                        x_prev = out.clone()
                    else:  # mu_tilde of the unclipped x_0, on a respaced chain
                        x_prev = torch.add(pred_x0 * k.c, x, alpha=k.d)
                    if clip_denoised:
                        pred_x0.clamp_(-1.0, 1.0)
                else:
                    if clip_denoised:
                        pred_x0.clamp_(-1.0, 1.0)
                    x_prev = torch.add(pred_x0 * k.c, x, alpha=k.d)
            else:
                if clip_denoised:
                    pred_x0.clamp_(-1.0, 1.0)
                if eps_prediction and not clip_denoised:
                    eps = out
                else:  # the eps that the (clipped) x_0 implies
                    eps = torch.sub(x * k.ae, pred_x0).div_(k.be)
                x_prev = torch.add(pred_x0 * k.c, eps, alpha=k.d)
            noise = next(draws)  # drawn at every step, also the last, which adds none
            if eta is None and values is not None:
                if i > 0:  # sigma = exp(log sigma^2 / 2), log sigma^2 as model_log_variance_from
                    if self.variance == "learned":
                        sigma = values.mul(0.5).exp_()
                    else:
                        sigma = values.mul(0.25 * (k.hi - k.lo)).add_(0.25 * (k.hi + k.lo)).exp_()
                    x_prev.addcmul_(sigma, noise)
            elif k.s:
                x_prev.add_(noise, alpha=k.s)
            x = x_prev
            yield i, x, pred_x0

    def sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        clip_denoised: bool = True,
        progress: bool = False,
    ) -> torch.Tensor:
        """Algorithm 2: ancestral sampling from x_T ~ N(0, I) down to x_0."""
        return _last_x(self.sample_steps(model, shape, generator, clip_denoised, progress))

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
        return _last_x(self.sample_steps(model, shape, generator, clip_denoised, progress, eta=eta))

    def respace(self, steps: int) -> GaussianDiffusion:
        """A chain over `steps` evenly spaced steps of this one (improved-diffusion's respacing).

        The kept steps are round(i (T-1) / (steps-1)), so the first and last are kept; the betas
        are recomputed from abar on the kept steps, beta_i = 1 - abar_{s_i} / abar_{s_(i-1)}, so
        that q(x_t | x_0) is unchanged at every kept step. The network still sees the original t;
        a "learned_range" variance interpolates between the respaced chain's bounds, and a "mean"
        output is read with the original chain's posterior coefficients.
        """
        T = self.num_timesteps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
            raise ValueError(f"steps={steps!r} is invalid: it must be an integer in [1, {T}].")
        if steps == 1:
            kept = torch.tensor([T - 1])
        else:
            kept = torch.unique(torch.round(torch.arange(steps) * (T - 1) / (steps - 1)).long())
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
    ) -> dict[str, torch.Tensor]:
        """The objective per example, [B] each: `loss`, and its parts `mse` (the simple loss,
        weighted per t by `weighting`) and `vb` (T L_t in bits/dim, times `vlb_weight` for
        "hybrid", whose L_t sees the prediction detached so that only the variance learns from
        it) where the objective has them. `num_levels` bins L_0's decoder as in `vb_terms_bpd`
        (None: data on a continuum)."""
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        model_output = model(x_t, self.timestep_map[t])
        prediction, values = self.split_output(model_output)
        terms = {}
        if self.loss != "vlb":
            target = self.loss_target(x0, x_t, t, noise)
            terms["mse"] = (target - prediction).pow(2).flatten(1).mean(dim=1)
            if self.weighting != "none":
                terms["mse"] = terms["mse"] * self.loss_weight[t].to(terms["mse"].dtype)
        if self.loss != "simple":
            if self.loss == "hybrid":
                model_output = torch.cat([prediction.detach(), values], dim=1)
            # in float32 at least (autocast may give bf16 outputs); the bound in float64 is
            # for evaluation (`vb_terms_bpd`)
            dtype = torch.promote_types(x0.dtype, torch.float32)
            vb = self._vb_terms(
                model_output.to(dtype), x0.to(dtype), x_t.to(dtype), t, num_levels, False
            )
            scale = self.num_timesteps * (self.vlb_weight if self.loss == "hybrid" else 1.0)
            terms["vb"] = (vb * scale).to(x0.dtype)
        terms["loss"] = sum(terms.values())
        return terms

    def training_loss(
        self,
        model: Model,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        num_levels: int | None = 256,
    ) -> torch.Tensor:
        """The objective per example, [B] (`training_terms`' `loss`): for eps with loss=simple,
        eq. 14, L_simple, the mean over dimensions of (eps - eps_theta)^2."""
        return self.training_terms(model, x0, t, noise, num_levels)["loss"]

    # The variational bound (eq. 5) in bits per dimension.

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T: KL(q(x_T | x_0) || N(0, I)), mean over dimensions, in bits, [B]."""
        x = x0.double()
        t = torch.full((x.shape[0],), self.num_timesteps - 1, device=x.device, dtype=torch.long)
        mean = self._extract(self.sqrt_alphas_cumprod, t, x) * x
        log_variance = torch.log1p(-self._extract(self.alphas_cumprod, t, x)).expand_as(x)
        kl = normal_kl(mean, log_variance, torch.zeros_like(x), torch.zeros_like(x))
        return _mean_bits(kl).to(x0.dtype)

    def _vb_terms(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        num_levels: int | None,
        clip_denoised: bool,
    ) -> torch.Tensor:
        """`vb_terms_bpd` in the dtype of the inputs."""
        q_mean, _, q_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        p_mean, _, p_log_variance, _ = self.p_mean_variance(model_output, x_t, t, clip_denoised)
        kl = _mean_bits(normal_kl(q_mean, q_log_variance, p_mean, p_log_variance))
        if num_levels is None:
            log_likelihood = gaussian_log_likelihood(x0, p_mean, p_log_variance)
        else:
            log_likelihood = discretized_gaussian_log_likelihood(
                x0, p_mean, 0.5 * p_log_variance, num_levels
            )
        return torch.where(t == 0, -_mean_bits(log_likelihood), kl)

    def vb_terms_bpd(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        num_levels: int | None = 256,
        clip_denoised: bool = False,
    ) -> torch.Tensor:
        """L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the decoder's
        L_0 = -log p(x_0 | x_1) with `num_levels` bins over [-1, 1] (None: the Gaussian density,
        for data on a continuum) where t == 0; bits/dim, [B].

        Computed in float64; p is the model distribution of `p_mean_variance` (with the learned
        variance where there is one), with the predicted x_0 clamped to [-1, 1] when
        `clip_denoised` (the model the sampler runs by default).
        """
        dtype = x0.dtype
        terms = self._vb_terms(
            model_output.double(), x0.double(), x_t.double(), t, num_levels, clip_denoised
        )
        return terms.to(dtype)

    @torch.no_grad()
    def nll_bpd(
        self,
        model: Model,
        x0: torch.Tensor,
        num_levels: int | None = 256,
        generator: torch.Generator | None = None,
        clip_denoised: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The full variational bound L_T + sum_t L_{t-1} + L_0 in bits/dim, every term computed.

        For t = 0, 1, ..., T-1 in that order it draws eps (on the generator's device, as in
        `sample_steps`), forms x_t = q_sample(x0, t, eps) and evaluates `vb_terms_bpd` (with
        `clip_denoised`).
        Returns `total_bpd` [B], `prior_bpd` [B] and `terms_bpd` [B, T].
        """
        draws = normal_draws(tuple(x0.shape), generator, x0.device)
        terms = []
        for i in range(self.num_timesteps):
            t = torch.full((x0.shape[0],), i, device=x0.device, dtype=torch.long)
            noise = next(draws).to(x0.dtype)
            x_t = self.q_sample(x0, t, noise)
            out = model(x_t, self.timestep_map[t])
            terms.append(self.vb_terms_bpd(out, x0, x_t, t, num_levels, clip_denoised).double())
        terms_bpd = torch.stack(terms, dim=1)
        prior = self.prior_bpd(x0).double()
        total = terms_bpd.sum(dim=1) + prior
        return {"total_bpd": total, "prior_bpd": prior, "terms_bpd": terms_bpd}


class ImportanceTimesteps:
    """Improved DDPM, section 3.3: draw t with p_t proportional to sqrt(E[L_t^2]), estimated from
    the last `history` losses of each t, and weight each example's loss by 1 / (T p_t) so that
    the mean stays an unbiased estimate of the uniform one. Until every t has `history` losses
    t is uniform; p keeps a `uniform_share` of uniform probability, as improved-diffusion does.

    Its state lives on the losses' device and is updated there (no host synchronisation).
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_share: float = 1e-3) -> None:
        self.num_timesteps, self.history, self.uniform_share = num_timesteps, history, uniform_share
        # one spare row takes the writes of losses beyond the last `history` of a t in a batch
        self.losses = torch.zeros(num_timesteps + 1, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)  # losses held, up to history
        self.next = torch.zeros(num_timesteps, dtype=torch.long)  # ring-buffer position per t

    def to(self, device: torch.device) -> ImportanceTimesteps:
        self.losses, self.counts, self.next = (
            x.to(device) for x in (self.losses, self.counts, self.next)
        )
        return self

    def probabilities(self) -> torch.Tensor:
        """p_t over the T steps, float64 [T]: uniform until warmed up."""
        T = self.num_timesteps
        w = self.losses[:T].pow(2).mean(dim=1).sqrt()
        p = w / w.sum().clamp(min=torch.finfo(w.dtype).tiny)
        p = p * (1 - self.uniform_share) + self.uniform_share / T
        p = p / p.sum()
        warm = (self.counts == self.history).all()
        return torch.where(warm, p, torch.full_like(p, 1.0 / T))

    def sample(
        self, n: int, device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """n steps t ~ p and their weights 1 / (T p_t), float32 [n]."""
        p = self.probabilities().to(device)
        t = torch.multinomial(p, n, replacement=True, generator=generator)
        return t, (1.0 / (self.num_timesteps * p[t])).float()

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Append each example's (unweighted) loss to its t's history, in order."""
        T, H = self.num_timesteps, self.history
        order = torch.argsort(t, stable=True)
        t, losses = t[order], losses[order].to(self.losses.dtype)
        # how many of each t (index_add_, not bincount: that reads max(t) back from a GPU)
        in_batch = torch.zeros(T, dtype=torch.long, device=t.device).index_add_(
            0, t, torch.ones_like(t)
        )
        first = torch.cumsum(in_batch, 0) - in_batch
        k = torch.arange(len(t), device=t.device) - first[t]  # its place among the batch's t
        kept = k >= in_batch[t] - H  # only a t's last H losses stay; the rest go to the spare row
        row = torch.where(kept, t, T)
        self.losses[row, (self.next[t] + k) % H] = losses
        self.next = (self.next + in_batch) % H
        self.counts = (self.counts + in_batch).clamp(max=H)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"losses": self.losses.cpu(), "counts": self.counts.cpu(), "next": self.next.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = self.losses.device
        self.losses, self.counts, self.next = (
            state[k].to(device) for k in ("losses", "counts", "next")
        )


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


def _nonzero(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """1 where t > 0 and 0 where t == 0 (the last step adds no noise), shaped to broadcast."""
    return (t != 0).to(x.dtype).reshape(t.shape[0], *((1,) * (x.ndim - 1)))


def _last_x(steps: Iterator[tuple[int, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The final x of a `sample_steps` chain."""
    return collections.deque(steps, maxlen=1)[0][1]


def _mean_bits(nats: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension, converted from nats to bits."""
    return nats.flatten(1).mean(dim=1) / math.log(2.0)


def normal_kl(
    mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor, log_var2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))), elementwise, in nats."""
    return 0.5 * (
        -1.0
        + log_var2
        - log_var1
        + torch.exp(log_var1 - log_var2)
        + (mean1 - mean2) ** 2 * torch.exp(-log_var2)
    )


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, num_levels: int
) -> torch.Tensor:
    """log P(x) for data on `num_levels` evenly spaced values in [-1, 1] under N(mean, scale^2)
    integrated over each value's bin (the outer bins reach -inf and +inf), elementwise, in nats.

    The bin's mass is computed in log space, from the tail it lies in, so that it stays exact
    however many standard deviations the bin is from the mean (a difference of two `ndtr`
    values would round to 0 past about 8 sigma)."""
    if num_levels < 2:
        raise ValueError(f"num_levels={num_levels!r} is invalid: it must be an integer >= 2.")
    half_bin = 1.0 / (num_levels - 1)
    inv_scale = torch.exp(-log_scale)
    upper = inv_scale * (x - mean + half_bin)
    lower = inv_scale * (x - mean - half_bin)
    # log(Phi(b) - Phi(a)) for a < b <= 0 is log Phi(b) + log(1 - Phi(a) / Phi(b)); a bin above
    # the mean is mirrored to below it. A bin that holds the mean is far from any tail.
    mirror = lower > 0
    a = torch.where(mirror, -upper, lower)
    b = torch.where(mirror, -lower, upper)
    log_b = torch.special.log_ndtr(b)
    d = torch.special.log_ndtr(a) - log_b  # <= 0
    tail = log_b + _log1mexp(d)
    # Each branch of a torch.where is fed values where it is finite, so that the branch not
    # taken cannot make the gradient nan (0 * inf).
    holds_mean = (lower < 0) & (upper > 0)
    lower_m, upper_m = torch.where(holds_mean, lower, -1.0), torch.where(holds_mean, upper, 1.0)
    middle = torch.log1p(-(torch.special.ndtr(lower_m) + torch.special.ndtr(-upper_m)))
    log_bin = torch.where(holds_mean, middle, tail)
    return torch.where(
        x < -1.0 + half_bin / 2,
        torch.special.log_ndtr(upper),
        torch.where(x > 1.0 - half_bin / 2, torch.special.log_ndtr(-lower), log_bin),
    )


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(d)) for d <= 0, accurate near 0 and far below it (Maechler, 2012); each
    branch sees only values where it is finite (d = 0 is taken as the smallest d < 0)."""
    near = d > -math.log(2.0)
    d_near = torch.where(near, d, -1.0).clamp(max=-torch.finfo(d.dtype).tiny)
    d_far = torch.where(near, -1.0, d)
    return torch.where(near, torch.log(-torch.expm1(d_near)), torch.log1p(-torch.exp(d_far)))


def gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_variance: torch.Tensor
) -> torch.Tensor:
    """log N(x; mean, exp(log_variance)), elementwise, in nats (L_0 for data on a continuum)."""
    return -0.5 * (
        math.log(2 * math.pi) + log_variance + (x - mean) ** 2 * torch.exp(-log_variance)
    )
