"""Where a sampler's K network calls fall on the trained chain of T steps (`sampler.spacing`)."""

from __future__ import annotations

import numpy as np
import torch

from ddpm.checks import check_choice

SPACINGS = ("linspace", "leading", "trailing", "quadratic", "logsnr")
# The least half log-SNR, log(alpha / sigma), that `logsnr` spaces from (diffusers'
# `lambda_min_clipped` for the cosine schedule): on a chain whose abar_T is about 0 (cosine) the
# steps would otherwise crowd where the data is invisible. The linear schedule's T = 1000 chain
# ends at -5.07, above it, and is not clipped.
LOGSNR_MIN = -5.1


def _place(spacing: str, steps: int, alphas_cumprod: np.ndarray) -> np.ndarray:
    """The kept steps, ascending (possibly repeated where the spacing cannot place `steps`)."""
    T, K = len(alphas_cumprod), steps
    if K == 1:
        return np.array([T - 1])  # one step: from x_T itself
    if spacing == "linspace":  # both ends (improved-diffusion's respacing, diffusers' linspace)
        return np.linspace(0, T - 1, K).round().astype(np.int64)
    if spacing == "leading":  # diffusers': multiples of T // K from 0
        return np.arange(K) * (T // K)
    if spacing == "trailing":  # diffusers': from T - 1 down in steps of T / K
        return np.sort(np.round(T - np.arange(K) * (T / K)).astype(np.int64) - 1)
    if spacing == "quadratic":  # DDIM's CIFAR-10 choice: t = i^2, up to 0.8 T
        return (np.linspace(0, np.sqrt(T * 0.8), K) ** 2).astype(np.int64)
    # logsnr: uniform in lambda = log(alpha / sigma) from max(lambda_{T-1}, LOGSNR_MIN) to lambda_0,
    # each at the nearest step (moved up to the next free step where they crowd near t = 0), the
    # first call at T - 1 (x_T itself)
    lam = 0.5 * (np.log(alphas_cumprod) - np.log1p(-alphas_cumprod))  # decreasing in t
    wanted = np.linspace(lam[0], max(lam[-1], LOGSNR_MIN), K)  # t ascending
    order = -lam  # increasing
    right = np.clip(np.searchsorted(order, -wanted), 1, T - 1)
    closer_left = np.abs(lam[right - 1] - wanted) <= np.abs(lam[right] - wanted)
    nearest = np.where(closer_left, right - 1, right)
    kept = nearest.copy()
    for j in range(1, K):
        kept[j] = max(kept[j], kept[j - 1] + 1)
    kept[-1] = max(kept[-1], T - 1)
    return kept


def _placed(kept: np.ndarray, steps: int, T: int) -> bool:
    """Whether `kept` is `steps` distinct steps of a chain of T."""
    inside = kept[0] >= 0 and kept[-1] < T
    return len(kept) == steps and bool((np.diff(kept) > 0).all()) and inside


def spaced_timesteps(spacing: str, steps: int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The `steps` trained-chain steps at which a sampler calls the network, int64, descending;
    one-sentence ValueErrors for an unknown spacing, a K outside [1, T] and a K the spacing
    cannot place on distinct steps."""
    check_choice("sampler.spacing", spacing, SPACINGS)
    abar = alphas_cumprod.detach().cpu().double().numpy()
    T = len(abar)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(
            f"sampler.steps={steps!r} is invalid: it must be an integer in [1, {T}] (the trained "
            f"chain's T = {T}), or null for every step where the sampler allows it."
        )
    kept = _place(spacing, steps, abar)
    if not _placed(kept, steps, T):
        most = next(k for k in range(steps - 1, 0, -1) if _placed(_place(spacing, k, abar), k, T))
        raise ValueError(
            f"sampler.steps={steps} with sampler.spacing={spacing}: the spacing cannot place "
            f"{steps} distinct steps on this chain of T = {T} (at most {most}); use "
            f"sampler.steps<={most} or sampler.spacing=linspace (any steps up to {T})."
        )
    return torch.from_numpy(kept[::-1].copy())
