"""Figures for people: sample grids, scatter plots, denoising trajectories and the schedule,
each as a uint8 [H, W, 3] array that can be saved as a PNG or sent to a logger."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

from ddpm.diffusion import GaussianDiffusion


def _pyplot():  # noqa: ANN202 - the pyplot module
    """matplotlib's pyplot on the Agg backend (no screen needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _to_array(fig) -> np.ndarray:
    """Render a matplotlib figure to a uint8 [H, W, 3] array and close it."""
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    _pyplot().close(fig)
    return image


def image_grid(samples: torch.Tensor, min_side: int = 32, nrow: int | None = None) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> a uint8 [H', W', 3] grid of `nrow` per row (default: square);
    small images are upscaled with nearest-neighbour so that each is at least `min_side` wide."""
    scale = max(1, math.ceil(min_side / samples.shape[-1]))
    x = F.interpolate((samples.float().clamp(-1, 1) + 1) / 2, scale_factor=scale, mode="nearest")
    nrow = nrow or math.ceil(math.sqrt(len(x)))
    grid = make_grid(x, nrow=nrow, padding=scale, pad_value=0.5)
    return (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()


def scatter_plot(samples: torch.Tensor, data: torch.Tensor, title: str = "") -> np.ndarray:
    """A uint8 [H, W, 3] scatter plot of 2-D samples over the data."""
    plt = _pyplot()
    samples, data = samples.float().cpu().numpy(), data.float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.scatter(data[:, 0], data[:, 1], s=3, c="0.75", label="data", linewidths=0)
    ax.scatter(samples[:, 0], samples[:, 1], s=3, c="tab:orange", label="samples", linewidths=0)
    low, high = data.min(0), data.max(0)
    pad = 0.1 * (high - low)
    ax.set(xlim=(low[0] - pad[0], high[0] + pad[0]), ylim=(low[1] - pad[1], high[1] + pad[1]))
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="upper right", markerscale=4)
    fig.tight_layout()
    return _to_array(fig)


def image_trajectory_figure(trajectory: list[tuple[int, torch.Tensor, torch.Tensor]]) -> np.ndarray:
    """The paper's progressive-generation picture: for each sample a row of x_t at the marked
    times (large t on the left), then the same rows for the predicted x_0."""
    rows = []
    for index in (1, 2):  # x_t, then predicted x_0
        frames = torch.stack([step[index] for step in trajectory], dim=1)  # [N, times, ...]
        rows.append(frames.flatten(0, 1))
    return image_grid(torch.cat(rows), nrow=len(trajectory))


def point_trajectory_figure(trajectory: list[tuple[int, torch.Tensor, torch.Tensor]]) -> np.ndarray:
    """Scatter plots of 2-D x_t (top) and predicted x_0 (bottom) at each marked time."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        2, len(trajectory), figsize=(1.6 * len(trajectory), 3.4), squeeze=False
    )
    for col, (t, x, x0) in enumerate(trajectory):
        for row, (points, label) in enumerate(((x, "x_t"), (x0, "predicted x_0"))):
            ax = axes[row, col]
            ax.scatter(points[:, 0], points[:, 1], s=2)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"t={t + 1}" if row == 0 else "", fontsize=8)
            if col == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.tight_layout()
    return _to_array(fig)


def bpd_terms_figure(terms_bpd: list[float]) -> np.ndarray:
    """The terms of the bound in bits/dim against the paper's t = 1..T (L_0 at t = 1)."""
    plt = _pyplot()
    t = np.arange(1, len(terms_bpd) + 1)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.semilogy(t, np.maximum(terms_bpd, 1e-12))
    ax.set(xlabel="t", ylabel="bits/dim", title="terms of the bound (L_0 at t = 1)")
    fig.tight_layout()
    return _to_array(fig)


def _with_band(ax, x: np.ndarray, rows: list[dict], key: str, **style) -> None:  # noqa: ANN001
    """Plot rows[key] against x with a band of +- 2 standard errors (rows[key + "_stderr"])."""
    mean = np.array([row[key] for row in rows])
    err = 2 * np.array([row[f"{key}_stderr"] for row in rows])
    ax.plot(x, mean, **style)
    ax.fill_between(x, mean - err, mean + err, alpha=0.25)


def truth_figure(rows: list[dict]) -> np.ndarray:
    """`ddpm-truth` with a model, against the paper's t: the KL from the true reverse step to the
    model's, beside the least KL a Gaussian step can reach (left); the model's simple loss minus
    its floor (right); shaded +- 2 standard errors."""
    plt = _pyplot()
    t = np.array([row["t"] for row in rows])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), dpi=100)
    panels = (
        (
            axes[0],
            (("kl", "KL(q || p_theta), the model"), ("gaussian_gap", "KL(q || best Gaussian)")),
        ),
        (axes[1], (("excess_loss", "loss - floor"),)),
    )
    for ax, curves in panels:
        for key, label in curves:
            _with_band(ax, t, rows, key, label=label)
        ax.legend()
    axes[0].set_yscale("symlog", linthresh=1e-4)
    axes[0].set(xlabel="t", ylabel="nats", title="E KL(q(x_{t-1} | x_t) || .) over x_t ~ q")
    axes[1].axhline(0, color="0.5", lw=0.8)
    axes[1].set(xlabel="t", ylabel="per dimension", title="simple loss above its floor")
    fig.tight_layout()
    return _to_array(fig)


def gaussianity_figure(rows: list[dict]) -> np.ndarray:
    """`ddpm-truth` without a model: per chain (T), E KL(q(x_{t-1} | x_t) || best Gaussian)
    against t / T, shaded +- 2 standard errors (log scale)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    for T in sorted({row["T"] for row in rows}):
        chain = [row for row in rows if row["T"] == T]
        x = np.array([row["t"] / T for row in chain])
        marker = "o" if len(chain) < 20 else None
        _with_band(ax, x, chain, "gaussian_gap", label=f"T = {T}", marker=marker, ms=3)
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.set(
        xlabel="t / T",
        ylabel="nats",
        title="how far the true reverse step is from a Gaussian",
    )
    ax.legend()
    fig.tight_layout()
    return _to_array(fig)


def calls_figure(rows: list[dict], swept: list[str], metrics: list[str]) -> np.ndarray:
    """A sweep over samplers (ddpm-eval -m sampler=... sampler.steps=...): each metric against
    the network calls per sample (log axes), one line per choice of the other swept keys, with
    its bootstrap spread (`<metric>_bootstrap_std`) as a band and its floor dashed."""
    plt = _pyplot()
    others = [k for k in swept if k != "sampler.steps"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.0), dpi=100,
                             squeeze=False)  # fmt: skip
    for ax, metric in zip(axes[0], metrics, strict=True):
        groups = list(dict.fromkeys(tuple(str(r.get(k, "")) for k in others) for r in rows))
        for group in groups:
            mine = [r for r in rows if tuple(str(r.get(k, "")) for k in others) == group]
            mine = sorted(
                (r for r in mine if r.get(metric) is not None and r.get("eval/network_calls")),
                key=lambda r: r["eval/network_calls"],
            )
            if not mine:
                continue
            x = np.array([r["eval/network_calls"] for r in mine], dtype=float)
            y = np.array([r[metric] for r in mine], dtype=float)
            label = ", ".join(f"{k}={v}" for k, v in zip(others, group, strict=True) if v)
            (line,) = ax.plot(x, y, "o-", ms=4, label=label or metric)
            spread = [r.get(f"{metric}_bootstrap_std") for r in mine]
            if all(v is not None for v in spread):
                band = np.array(spread, dtype=float)
                ax.fill_between(x, y - band, y + band, color=line.get_color(), alpha=0.15)
        floors = [r.get(f"{metric}_floor") for r in rows if r.get(f"{metric}_floor") is not None]
        if floors:
            ax.axhline(float(np.mean(floors)), ls="--", color="gray", label="floor")
        ax.set_xscale("log")
        if all(r[metric] > 0 for r in rows if r.get(metric) is not None):
            ax.set_yscale("log")
        ax.set(xlabel="network calls per sample", ylabel=metric.rsplit("/", 1)[-1])
        ax.legend(fontsize=6)
    fig.tight_layout()
    return _to_array(fig)


def results_figure(rows: list[dict], swept: list[str], metrics: list[str]) -> np.ndarray:
    """A sweep's results: one panel per kind of metric (loss, bpd, fid, ...: rows) and swept key
    (columns). In a panel each metric of that kind (e.g. test/beta/fid and test/tilde_beta/fid)
    and each choice of the other swept keys is a line over the key's values, its floor
    (`<metric>_floor`, when the jobs report one) dashed in the same colour."""
    plt = _pyplot()
    metrics, keys = metrics or ["steps"], swept or ["run"]
    kinds = list(dict.fromkeys(m.rsplit("/", 1)[-1] for m in metrics))
    fig, axes = plt.subplots(
        len(kinds), len(keys), figsize=(4.2 * len(keys), 3.0 * len(kinds)), dpi=100,
        squeeze=False,
    )  # fmt: skip
    for i, kind in enumerate(kinds):
        for j, key in enumerate(keys):
            ax = axes[i, j]
            values = list(dict.fromkeys(str(row[key]) for row in rows))
            others = [k for k in keys if k != key]
            groups = list(dict.fromkeys(tuple(str(row[k]) for k in others) for row in rows))
            for metric in [m for m in metrics if m.rsplit("/", 1)[-1] == kind]:
                for group in groups:
                    mine = [r for r in rows if tuple(str(r[k]) for k in others) == group]
                    chosen = (f"{k}={v}" for k, v in zip(others, group, strict=True))
                    label = ", ".join([metric, *chosen])
                    line = None
                    for name, style in ((metric, "o-"), (f"{metric}_floor", "--")):
                        points = [
                            (values.index(str(r[key])), r[name])
                            for r in mine
                            if r.get(name) is not None
                        ]
                        if points:
                            x, y = zip(*points, strict=True)
                            color = line[0].get_color() if line else None
                            drawn = ax.plot(x, y, style, ms=4, color=color,
                                            label=label if line is None else "floor")  # fmt: skip
                            line = line or drawn
            ax.set_xticks(range(len(values)), values, rotation=20, fontsize=8)
            ax.set(xlabel=key, ylabel=kind)
            ax.legend(fontsize=6)
    fig.tight_layout()
    return _to_array(fig)


def schedule_figure(diffusion: GaussianDiffusion, title: str = "") -> np.ndarray:
    """abar_t, log-SNR = log(abar_t / (1 - abar_t)) and the reverse variance sigma_t^2 of both
    choices (beta_t and tilde-beta_t, the run's own drawn bold) against t = 1..T."""
    plt = _pyplot()
    T = diffusion.num_timesteps
    t = np.arange(1, T + 1)
    abar = diffusion.alphas_cumprod.double().cpu().numpy()
    betas = diffusion.betas.double().cpu().numpy()
    tilde = diffusion.posterior_variance.double().cpu().numpy()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=100)
    axes[0].plot(t, abar)
    axes[0].set(xlabel="t", ylabel="abar_t", title="signal kept, abar_t")
    axes[1].plot(t, np.log(abar) - np.log1p(-abar))
    axes[1].set(xlabel="t", ylabel="log SNR", title="log-SNR = log abar_t / (1 - abar_t)")
    for name, values in (("beta", betas), ("tilde_beta", tilde)):
        chosen = name == diffusion.variance
        axes[2].semilogy(
            t[1:], values[1:], lw=2.5 if chosen else 1, label=f"{name}{' (this run)' * chosen}"
        )
    axes[2].set(xlabel="t", ylabel="sigma_t^2", title="reverse variance (t >= 2)")
    axes[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    return _to_array(fig)
