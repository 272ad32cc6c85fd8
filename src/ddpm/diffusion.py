"""Gaussian diffusion (Ho et al., 2020): the forward process, its posterior, the reverse step.

All DDPM math lives here, on tensors, with no Lightning. Time steps are 0-based: t = 0 is the
paper's t = 1 and t = T-1 its t = T. Schedule buffers are float64; every result is cast to the
dtype of the input x.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

VARIANCES = ("beta", "tilde_beta")

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GaussianDiffusion(nn.Module):
    """The DDPM forward and reverse processes for a fixed beta schedule.

    `variance` fixes sigma_t^2 of the reverse process p(x_{t-1} | x_t): "beta" (sigma_t^2 = beta_t,
    except beta_tilde_1 at t = 0 as in the original code) or "tilde_beta"
    (sigma_t^2 = beta_tilde_t).
    The buffers are non-persistent (they follow from the schedule) and stay float64 when the module
    is cast to another dtype.
    """

    def __init__(
        self,
        betas: torch.Tensor | Sequence[float],
        variance: str = "beta",
        timestep_map: torch.Tensor | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if variance not in VARIANCES:
            raise ValueError(
                f"variance={variance!r} is unknown: allowed are 'beta' and 'tilde_beta' "
                "(choose with variance=beta or variance=tilde_beta)."
            )
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a non-empty sequence of values strictly inside (0, 1).")
        self.variance = variance
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
        if variance == "beta":
            model_variance = torch.cat([first, betas[1:]])
            model_log_variance = torch.log(model_variance)
        else:
            model_variance = posterior_variance
            model_log_variance = posterior_log_variance_clipped

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
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": alphas_cumprod.rsqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_log_variance_clipped,
            # Eq. 7: mu_tilde_t = coef1 * x_0 + coef2 * x_t.
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev)
            * alphas.sqrt()
            / (1.0 - alphas_cumprod),
            "model_variance": model_variance,
            "model_log_variance": model_log_variance,
        }
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

    def p_mean_variance(
        self, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eq. 11: mean, variance, log variance of p(x_{t-1} | x_t) and the predicted x_0.

        The mean is mu_tilde(pred_x0, x_t), which equals eq. 11 when pred_x0 is not clipped.
        """
        pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        variance = self._extract(self.model_variance, t, x_t).expand_as(x_t)
        log_variance = self._extract(self.model_log_variance, t, x_t).expand_as(x_t)
        return mean, variance, log_variance, pred_x0

    def p_sample(
        self,
        eps: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        clip_denoised: bool = False,
    ) -> torch.Tensor:
        """Algorithm 2, line 4: x_{t-1} = mu_theta + sigma_t z, with no noise where t == 0."""
        mean, _, log_variance, _ = self.p_mean_variance(eps, x_t, t, clip_denoised)
        return mean + _nonzero(t, x_t) * torch.exp(0.5 * log_variance) * noise

    def ddim_sample(
        self,
        eps: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        eta: float = 0.0,
        clip_denoised: bool = False,
    ) -> torch.Tensor:
        """Song et al. (2021), eq. 12: one DDIM step from step t to the chain's previous step.

        sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev); eta = 1
        is the ancestral step with sigma_t^2 = beta_tilde_t, eta = 0 is deterministic.
        """
        pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
            # the eps that the clipped x_0 implies
            eps = (
                self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_x0
            ) / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)
        abar = self._extract(self.alphas_cumprod, t, x_t)
        abar_prev = self._extract(self.alphas_cumprod_prev, t, x_t)
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
        mean = abar_prev.sqrt() * pred_x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
        return mean + _nonzero(t, x_t) * sigma * noise

    def step_coefficients(self, eta: float | None = None) -> list[tuple[float, ...]]:
        """Per step i of the chain, as float64-exact Python numbers, what one reverse step from
        x_i needs: pred_x0 = a x - b eps; then for an ancestral step (eta None)
        x = c pred_x0 + d x + s z (eqs. 6-7 with sigma_t^2 the model variance); for DDIM
        x = c pred_x0 + d eps + s z (Song et al. eq. 12). s is 0 at the last step (i = 0)."""
        a, b = self.sqrt_recip_alphas_cumprod, self.sqrt_recipm1_alphas_cumprod
        if eta is None:
            c, d = self.posterior_mean_coef1, self.posterior_mean_coef2
            s = torch.exp(0.5 * self.model_log_variance)
        else:
            abar, abar_prev = self.alphas_cumprod, self.alphas_cumprod_prev
            s = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
            c, d = abar_prev.sqrt(), (1 - abar_prev - s**2).clamp(min=0).sqrt()
        s = torch.cat([s.new_zeros(1), s[1:]])
        return torch.stack([a, b, c, d, s], dim=1).tolist()

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
        step's coefficients are Python numbers (`step_coefficients`) and it costs five tensor
        ops besides the network. Noise is drawn on the generator's device (the CPU when none is
        given) and moved to the device of the buffers, so a seeded generator gives the same
        chain on any device.
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
        for i in steps:
            a, b, c, d, s = coefficients[i]
            eps = model(x, model_t[i])
            pred_x0 = torch.add(x * a, eps, alpha=-b)
            if clip_denoised:
                pred_x0.clamp_(-1.0, 1.0)
            if eta is None:
                x_prev = torch.add(pred_x0 * c, x, alpha=d)
            else:
                if clip_denoised:  # the eps that the clipped x_0 implies
                    eps = torch.sub(x * a, pred_x0).div_(b)
                x_prev = torch.add(pred_x0 * c, eps, alpha=d)
            noise = next(draws)  # drawn at every step, also the last, whose s is 0
            x = x_prev.add_(noise, alpha=s) if s else x_prev
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
        that q(x_t | x_0) is unchanged at every kept step. The network still sees the original t.
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
        return GaussianDiffusion(1 - abar / abar_prev, self.variance, self.timestep_map.cpu()[kept])

    def sample_timesteps(
        self, n: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """n steps t ~ Uniform{0, ..., T-1}, as L_simple draws them (Algorithm 1, line 3)."""
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)

    def training_loss(
        self,
        model: Model,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Eq. 14, L_simple per example: the mean over dimensions of (eps - eps_theta)^2, [B]."""
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        eps = model(self.q_sample(x0, t, noise), self.timestep_map[t])
        return (noise - eps).pow(2).flatten(1).mean(dim=1)

    # The variational bound (eq. 5) in bits per dimension.

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T: KL(q(x_T | x_0) || N(0, I)), mean over dimensions, in bits, [B]."""
        x = x0.double()
        t = torch.full((x.shape[0],), self.num_timesteps - 1, device=x.device, dtype=torch.long)
        mean = self._extract(self.sqrt_alphas_cumprod, t, x) * x
        log_variance = torch.log1p(-self._extract(self.alphas_cumprod, t, x)).expand_as(x)
        kl = normal_kl(mean, log_variance, torch.zeros_like(x), torch.zeros_like(x))
        return _mean_bits(kl).to(x0.dtype)

    def vb_terms_bpd(
        self,
        eps: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        num_levels: int = 256,
        clip_denoised: bool = False,
    ) -> torch.Tensor:
        """L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the decoder's
        L_0 = -log p(x_0 | x_1) with `num_levels` bins over [-1, 1] where t == 0; bits/dim, [B].

        Computed in float64; p is the model distribution of `p_mean_variance`, with the predicted
        x_0 clamped to [-1, 1] when `clip_denoised` (the model the sampler runs by default).
        """
        dtype = x0.dtype
        eps, x0, x_t = eps.double(), x0.double(), x_t.double()
        q_mean, _, q_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        p_mean, _, p_log_variance, _ = self.p_mean_variance(eps, x_t, t, clip_denoised)
        kl = _mean_bits(normal_kl(q_mean, q_log_variance, p_mean, p_log_variance))
        nll = -_mean_bits(
            discretized_gaussian_log_likelihood(x0, p_mean, 0.5 * p_log_variance, num_levels)
        )
        return torch.where(t == 0, nll, kl).to(dtype)

    @torch.no_grad()
    def nll_bpd(
        self,
        model: Model,
        x0: torch.Tensor,
        num_levels: int = 256,
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
            eps = model(x_t, self.timestep_map[t])
            terms.append(self.vb_terms_bpd(eps, x0, x_t, t, num_levels, clip_denoised).double())
        terms_bpd = torch.stack(terms, dim=1)
        prior = self.prior_bpd(x0).double()
        total = terms_bpd.sum(dim=1) + prior
        return {"total_bpd": total, "prior_bpd": prior, "terms_bpd": terms_bpd}


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
    middle = torch.log1p(-(torch.special.ndtr(lower) + torch.special.ndtr(-upper)))
    log_bin = torch.where((lower < 0) & (upper > 0), middle, tail)
    return torch.where(
        x < -1.0 + half_bin / 2,
        torch.special.log_ndtr(upper),
        torch.where(x > 1.0 - half_bin / 2, torch.special.log_ndtr(-lower), log_bin),
    )


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(d)) for d <= 0, accurate near 0 and far below it (Maechler, 2012)."""
    return torch.where(d > -math.log(2.0), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))
