"""The parameterisation of the reverse process: the one place that turns a network output into
x_0, eps, the mean, v and the variance of p(x_{t-1} | x_t), for each prediction and variance.

Every formula here is linear in x and the output with per-step coefficients (`Coefficients`),
which are Python numbers when every example is at the same step (a sampler's step: no tensor
indexing, float64-exact) and tensors [B, 1, ..., 1] when each example has its own t (the loss,
the bound, `GaussianDiffusion.p_mean_variance`): one formula serves both.
"""

from __future__ import annotations

import math
from typing import NamedTuple, TypeAlias

import torch

from ddpm.checks import check_choice, check_positive

VARIANCES = ("beta", "tilde_beta", "learned", "learned_range")
LEARNED_VARIANCES = ("learned", "learned_range")
FIXED_VARIANCES = ("beta", "tilde_beta")
PREDICTIONS = ("eps", "x0", "mean", "v")
LOSSES = ("simple", "hybrid", "vlb")
WEIGHTINGS = ("none", "snr", "min_snr")

Number: TypeAlias = float | torch.Tensor  # a Python float, or a tensor [B, 1, ..., 1]


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


class Coefficients(NamedTuple):
    """One chain's numbers at one step (floats) or at each example's step (tensors)."""

    x0_x: Number  # pred_x0 = x0_x x + x0_out out, for the chain's prediction
    x0_out: Number
    alpha: Number  # sqrt(abar_t): x_t = alpha x_0 + sigma eps (eq. 4)
    sigma: Number  # sqrt(1 - abar_t)
    mean_x0: Number  # mu_tilde = mean_x0 x_0 + mean_x x_t (eq. 7)
    mean_x: Number
    log_variance: Number  # the fixed log sigma_t^2 (a learned variance: log beta_t, unused)
    variance: Number  # the fixed sigma_t^2 (tilde_beta: 0 at t = 0, as eq. 7 says)
    log_variance_low: Number  # learned_range: log beta_tilde_t (clipped) at v = -1 ...
    log_variance_high: Number  # ... and log beta_t at v = 1
    noise: Number  # 1 where a reverse step adds noise, 0 at the last step (t = 0)


def combine(a: Number, x: torch.Tensor, b: Number, y: torch.Tensor | None) -> torch.Tensor:
    """a x + b y (y None: a x); with Python numbers (a sampler's step) in as few operations as
    they allow: one fused multiply-add, none for a term whose number is 0 or 1."""
    ax = x if isinstance(a, float) and a == 1.0 else None
    if isinstance(b, torch.Tensor):
        return torch.addcmul(x * a if ax is None else ax, b, y)
    if y is None or b == 0.0:
        return x * a if ax is None else ax
    if isinstance(a, float) and a == 0.0:
        return y * b
    return torch.add(x * a if ax is None else ax, y, alpha=b)


def std(log_variance: Number) -> Number:
    """sigma = e^(log sigma^2 / 2), for a tensor or a Python number."""
    if isinstance(log_variance, torch.Tensor):
        return (0.5 * log_variance).exp_()
    return math.exp(0.5 * log_variance)


class Parameterisation:
    """What a network output means. `prediction`: "eps" (eq. 11), "x0", "mean" (mu_theta itself)
    or "v" = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho, 2022). `variance`: fixed
    "beta" or "tilde_beta", or learned from C more output channels: "learned" (log sigma^2) or
    "learned_range" (v in [-1, 1] between log beta_tilde_t and log beta_t, Improved DDPM eq. 15).
    `mean_is_output`: a "mean" output is this chain's mean (False on a respaced chain, where it is
    the trained chain's and is read through its x_0)."""

    def __init__(self, prediction: str, variance: str, mean_is_output: bool = True) -> None:
        check_choice("prediction", prediction, PREDICTIONS)
        check_choice("variance", variance, VARIANCES)
        self.prediction, self.variance = prediction, variance
        self.learned_variance = variance in LEARNED_VARIANCES
        self.mean_is_output = mean_is_output

    def x0_coefficients(
        self,
        alpha: torch.Tensor,
        sigma: torch.Tensor,
        mean_coef1: torch.Tensor,
        mean_coef2: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_x, x0_out) per step, float64: eq. 4 solved for x_0 (eps); the output itself (x0);
        the mean's coefficients inverted (mean); sqrt(abar) x - sqrt(1 - abar) v (v)."""
        return {
            "eps": (1.0 / alpha, -sigma / alpha),
            "x0": (torch.zeros_like(alpha), torch.ones_like(alpha)),
            "mean": (-mean_coef2 / mean_coef1, 1.0 / mean_coef1),
            "v": (alpha, -sigma),
        }[self.prediction]

    def split(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prediction, variance values or None): a learned variance's network has 2C channels,
        the prediction first."""
        if not self.learned_variance:
            return output, None
        prediction, values = output.chunk(2, dim=1)
        return prediction, values

    @staticmethod
    def x0(k: Coefficients, prediction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The x_0 a prediction stands for (unclipped)."""
        return combine(k.x0_x, x, k.x0_out, prediction)

    @staticmethod
    def eps(k: Coefficients, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Eq. 4 solved for eps: the eps x_0 implies, (x_t - sqrt(abar) x_0) / sqrt(1 - abar)."""
        return combine(1.0 / k.sigma, x, -k.alpha / k.sigma, x0)

    @staticmethod
    def posterior_mean(k: Coefficients, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Eq. 7: mu_tilde(x_0, x_t)."""
        return combine(k.mean_x0, x0, k.mean_x, x)

    @staticmethod
    def v(k: Coefficients, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar) eps - sqrt(1 - abar) x_0."""
        return combine(k.alpha, eps, -k.sigma, x0)

    def target(
        self, k: Coefficients, x0: torch.Tensor, x: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        """What the prediction stands for at (x_0, x_t = alpha x_0 + sigma eps): the loss's target,
        and the Bayes-optimal output given E[x_0 | x_t] and the eps it implies."""
        if self.prediction == "eps":
            return eps
        if self.prediction == "x0":
            return x0
        if self.prediction == "mean":
            return self.posterior_mean(k, x0, x)
        return self.v(k, x0, eps)

    def log_variance(self, k: Coefficients, values: torch.Tensor | None) -> Number:
        """log sigma_t^2: the fixed choice, the network's value ("learned"), or frac log beta_t +
        (1 - frac) log beta_tilde_t, frac = (v + 1) / 2 ("learned_range", Improved DDPM eq. 15)."""
        if self.variance == "learned":
            return values
        if self.variance == "learned_range":  # as values * half + (half + low)
            half = 0.5 * (k.log_variance_high - k.log_variance_low)
            return (values * half).add_(half + k.log_variance_low)
        return k.log_variance

    def values(self, k: Coefficients, log_variance: torch.Tensor) -> torch.Tensor:
        """The output values that stand for log sigma_t^2 (`log_variance` inverted)."""
        if self.variance == "learned_range":
            low, high = k.log_variance_low, k.log_variance_high
            return 2 * (log_variance - low) / (high - low) - 1
        return log_variance

    def reverse(
        self, k: Coefficients, output: torch.Tensor, x: torch.Tensor, clip_denoised: bool
    ) -> tuple[torch.Tensor, Number, torch.Tensor]:
        """(mean, log variance, predicted x_0) of p(x_{t-1} | x_t): the mean is mu_tilde of the
        predicted x_0 (clamped to [-1, 1] first when `clip_denoised`; eq. 11 for eps unclipped);
        a "mean" output is the mean itself, never clipped."""
        prediction, values = self.split(output)
        x0 = self.x0(k, prediction, x)
        if self.prediction == "mean":
            mean = prediction if self.mean_is_output else self.posterior_mean(k, x0, x)
            x0 = x0.clamp(-1.0, 1.0) if clip_denoised else x0
        else:
            x0 = x0.clamp(-1.0, 1.0) if clip_denoised else x0
            mean = self.posterior_mean(k, x0, x)
        return mean, self.log_variance(k, values), x0

    def denoised(
        self, k: Coefficients, output: torch.Tensor, x: torch.Tensor, clip_denoised: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted x_0, the eps it implies) for the ODE samplers (a learned variance unused);
        an eps output is its own eps unless x_0 was clipped."""
        prediction, _ = self.split(output)
        x0 = self.x0(k, prediction, x)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        if self.prediction == "eps" and not clip_denoised:
            return x0, prediction
        return x0, self.eps(k, x0, x)
