"""Gaussian diffusion (Ho et al., 2020): the forward process, its posterior, the reverse step.

All DDPM math lives here, on tensors, with no Lightning. Time steps are 0-based: t = 0 is the
paper's t = 1 and t = T-1 its t = T. Schedule buffers are float64; every result is cast to the
dtype of the input x.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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

    def __init__(self, betas: torch.Tensor | Sequence[float], variance: str = "beta") -> None:
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
        float64 = {name: buf for name, buf in self.named_buffers(recurse=False)}
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
        nonzero = (t != 0).to(x_t.dtype).reshape(t.shape[0], *((1,) * (x_t.ndim - 1)))
        return mean + nonzero * torch.exp(0.5 * log_variance) * noise

    @torch.no_grad()
    def sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        clip_denoised: bool = True,
        progress: bool = False,
    ) -> torch.Tensor:
        """Algorithm 2: run the reverse chain from x_T ~ N(0, I) down to x_0.

        Noise is drawn on the generator's device (the CPU when none is given) and moved to the
        device of the schedule buffers, so a seeded generator gives the same chain on any device.
        """
        device = self.betas.device
        noise_device = generator.device if generator is not None else torch.device("cpu")

        def randn() -> torch.Tensor:
            return torch.randn(tuple(shape), generator=generator, device=noise_device).to(device)

        x = randn()
        steps = reversed(range(self.num_timesteps))
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, total=self.num_timesteps, desc="sampling")
        for i in steps:
            t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
            x = self.p_sample(model(x, t), x, t, randn(), clip_denoised)
        return x

    def training_loss(
        self,
        model: Model,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Eq. 14, L_simple per example: the mean over dimensions of (eps - eps_theta)^2, [B]."""
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        eps = model(self.q_sample(x0, t, noise), t)
        return (noise - eps).pow(2).flatten(1).mean(dim=1)
