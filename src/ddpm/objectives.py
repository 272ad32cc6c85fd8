"""The objectives: the simple, hybrid and vlb losses with their weighting and importance-sampled
t (Ho et al. 2020 eq. 14; Improved DDPM sections 3.2-3.3), and the variational bound (eq. 5) in
bits per dimension. Functions of a `GaussianDiffusion` (its schedule and parameterisation)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ddpm.samplers.base import Model, normal_draws

if TYPE_CHECKING:
    from ddpm.diffusion import GaussianDiffusion


def loss_weight(
    prediction: str,
    weighting: str,
    min_snr_gamma: float,
    snr: torch.Tensor,
    mean_coef1: torch.Tensor,
) -> torch.Tensor:
    """Per t, the factor on the simple loss's squared error that makes it `weighting` of the
    squared error of x_0: the error of eps is SNR times that of x_0, of v (SNR + 1) times,
    of the mean coef1^2 times. "snr" weights x_0's error by SNR (the eps loss in any
    units), "min_snr" by min(SNR, gamma) (Hang et al., 2023), "none" leaves it as it is."""
    if weighting == "none":
        return torch.ones_like(snr)
    units = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1.0, "mean": mean_coef1**2}
    wanted = snr if weighting == "snr" else snr.clamp(max=min_snr_gamma)
    return wanted / units[prediction]


def training_terms(
    diffusion: GaussianDiffusion,
    model: Model,
    x0: torch.Tensor,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    num_levels: int | None = 256,
    **model_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """The objective per example, [B] each: `loss`, and its parts `mse` (the simple loss,
    weighted per t by `weighting`) and `vb` (T L_t in bits/dim, times `vlb_weight` for
    "hybrid", whose L_t sees the prediction detached so that only the variance learns from
    it) where the objective has them. `num_levels` bins L_0's decoder as in `vb_terms_bpd`
    (None: data on a continuum). The network is model(x_t, t, **model_kwargs) (e.g. y=labels)."""
    d, p = diffusion, diffusion.parameterisation
    if t is None:
        t = d.sample_timesteps(x0.shape[0], x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    x_t = d.q_sample(x0, t, noise)
    model_output = model(x_t, d.timestep_map[t], **model_kwargs)
    prediction, values = p.split(model_output)
    terms = {}
    if d.loss != "vlb":
        target = p.target(d.coefficients(t, x0), x0, x_t, noise)
        terms["mse"] = (target - prediction).pow(2).flatten(1).mean(dim=1)
        if d.weighting != "none":
            terms["mse"] = terms["mse"] * d.loss_weight[t].to(terms["mse"].dtype)
    if d.loss != "simple":
        if d.loss == "hybrid":
            model_output = torch.cat([prediction.detach(), values], dim=1)
        # in float32 at least (autocast may give bf16 outputs); the bound in float64 is
        # for evaluation (`vb_terms_bpd`)
        dtype = torch.promote_types(x0.dtype, torch.float32)
        vb = vb_terms(d, model_output.to(dtype), x0.to(dtype), x_t.to(dtype), t, num_levels)
        scale = d.num_timesteps * (d.vlb_weight if d.loss == "hybrid" else 1.0)
        terms["vb"] = (vb * scale).to(x0.dtype)
    terms["loss"] = sum(terms.values())
    return terms


def prior_bpd(diffusion: GaussianDiffusion, x0: torch.Tensor) -> torch.Tensor:
    """L_T: KL(q(x_T | x_0) || N(0, I)), mean over dimensions, in bits, [B]."""
    x = x0.double()
    t = torch.full((x.shape[0],), diffusion.num_timesteps - 1, device=x.device, dtype=torch.long)
    mean = diffusion._extract(diffusion.sqrt_alphas_cumprod, t, x) * x
    log_variance = torch.log1p(-diffusion._extract(diffusion.alphas_cumprod, t, x)).expand_as(x)
    kl = normal_kl(mean, log_variance, torch.zeros_like(x), torch.zeros_like(x))
    return _mean_bits(kl).to(x0.dtype)


def vb_terms(
    diffusion: GaussianDiffusion,
    model_output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    num_levels: int | None = 256,
    clip_denoised: bool = False,
) -> torch.Tensor:
    """L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the decoder's
    L_0 = -log p(x_0 | x_1) with `num_levels` bins over [-1, 1] (None: the Gaussian density,
    for data on a continuum) where t == 0; bits/dim, [B], in the dtype of the inputs. p is
    `p_mean_variance`'s (the learned variance where there is one; the predicted x_0 clamped to
    [-1, 1] when `clip_denoised`, the model the sampler runs by default)."""
    q_mean, _, q_log_variance = diffusion.q_posterior_mean_variance(x0, x_t, t)
    p_mean, _, p_log_variance, _ = diffusion.p_mean_variance(model_output, x_t, t, clip_denoised)
    kl = _mean_bits(normal_kl(q_mean, q_log_variance, p_mean, p_log_variance))
    if num_levels is None:
        log_likelihood = gaussian_log_likelihood(x0, p_mean, p_log_variance)
    else:
        log_likelihood = discretized_gaussian_log_likelihood(
            x0, p_mean, 0.5 * p_log_variance, num_levels
        )
    return torch.where(t == 0, -_mean_bits(log_likelihood), kl)


@torch.no_grad()
def nll_bpd(
    diffusion: GaussianDiffusion,
    model: Model,
    x0: torch.Tensor,
    num_levels: int | None = 256,
    generator: torch.Generator | None = None,
    clip_denoised: bool = False,
    **model_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """The full variational bound L_T + sum_t L_{t-1} + L_0 in bits/dim, every term computed in
    float64. For t = 0, 1, ..., T-1 in that order it draws eps (on the generator's device, as a
    sampler does), forms x_t = q_sample(x0, t, eps) and evaluates `vb_terms`.
    Returns `total_bpd` [B], `prior_bpd` [B] and `terms_bpd` [B, T]."""
    draws = normal_draws(tuple(x0.shape), generator, x0.device)
    x64, terms = x0.double(), []
    for i in range(diffusion.num_timesteps):
        t = torch.full((x0.shape[0],), i, device=x0.device, dtype=torch.long)
        noise = next(draws).to(x0.dtype)
        x_t = diffusion.q_sample(x0, t, noise)
        out = model(x_t, diffusion.timestep_map[t], **model_kwargs)
        terms.append(
            vb_terms(diffusion, out.double(), x64, x_t.double(), t, num_levels, clip_denoised)
        )
    terms_bpd = torch.stack(terms, dim=1)
    prior = prior_bpd(diffusion, x0).double()
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
