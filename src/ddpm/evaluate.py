"""Evaluate a trained checkpoint: `ddpm-eval ckpt_path=...` (or `python -m ddpm.evaluate`).

Writes metrics.json, the per-t terms of the bound (bpd_terms.csv, bpd_terms.png) and prints a
table: the NLL bound in bits/dim on a data split; FID and KID for images when the Inception
weights are on disk; energy and sliced Wasserstein distances for 2-D data.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm.auto import tqdm

from ddpm.checkpoint import Trained, load_trained_for, pick_device
from ddpm.cli import CONF_DIR, user_errors
from ddpm.data.toy2d import make_toy2d
from ddpm.distributed import batch_seed, gather_in_order, my_share, world
from ddpm.loggers import finish_wandb, guard_logger
from ddpm.sample import check_sampling, generate

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # what torch-fidelity downloads


def split_data(datamodule: Any, split: str) -> torch.Tensor:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown: allowed are {', '.join(SPLITS)}.")
    return getattr(datamodule, f"{split}_data")


def bound_bpd(
    trained: Trained,
    data: torch.Tensor,
    num_levels: int,
    batch_size: int,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """The full bound (every t) on `data`: mean and standard error of the total in bits/dim, the
    mean prior term, and the mean of each term L_0..L_{T-1} over the examples."""
    backbone, diffusion = trained.backbone.to(device), trained.diffusion.to(device)
    done = []
    for index, batch in tqdm(my_share(data.split(batch_size)), desc="bits/dim"):
        generator = torch.Generator().manual_seed(batch_seed(seed, index))
        out = diffusion.nll_bpd(backbone, batch.to(device), num_levels, generator=generator)
        done.append((index, {k: out[k].cpu() for k in ("total_bpd", "prior_bpd", "terms_bpd")}))
    results = gather_in_order(done)
    totals, priors, terms = (
        [r[k] for r in results] for k in ("total_bpd", "prior_bpd", "terms_bpd")
    )
    total = torch.cat(totals)
    return {
        "bpd": total.mean().item(),
        "bpd_stderr": (total.std() / len(total) ** 0.5).item() if len(total) > 1 else 0.0,
        "prior_bpd": torch.cat(priors).mean().item(),
        "terms_bpd": torch.cat(terms).mean(dim=0).tolist(),
    }


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """2 E|X-Y| - E|X-X'| - E|Y-Y'| (Szekely & Rizzo), unbiased within-sample means."""
    x, y = x.double(), y.double()

    def within(z: torch.Tensor) -> torch.Tensor:
        return torch.cdist(z, z).sum() / (len(z) * (len(z) - 1))

    return (2 * torch.cdist(x, y).mean() - within(x) - within(y)).item()


def sliced_wasserstein(
    x: torch.Tensor, y: torch.Tensor, num_projections: int = 256, seed: int = 0
) -> float:
    """Sliced 2-Wasserstein distance: the root mean over random directions of the squared W2
    between the projected samples, compared quantile by quantile."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(x.shape[1], num_projections, generator=g, dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)
    levels = torch.linspace(0, 1, min(len(x), len(y)), dtype=torch.float64)
    qx = torch.quantile(x.double() @ directions, levels, dim=0)
    qy = torch.quantile(y.double() @ directions, levels, dim=0)
    return ((qx - qy) ** 2).mean().sqrt().item()


def toy_distances(
    trained: Trained, datamodule: Any, cfg: DictConfig, device: str
) -> dict[str, Any]:
    """Model samples vs held-out data, beside two held-out draws (the floor) and a Gaussian fitted
    to the training data (a baseline the model must beat)."""
    held_out = split_data(datamodule, cfg.split)
    n = len(held_out)
    samples, _ = generate(
        trained,
        n,
        cfg.batch_size,
        cfg.sampler,
        cfg.steps,
        cfg.eta,
        clip_denoised=False,
        seed=cfg.seed,
        device=device,
    )
    second = torch.from_numpy(make_toy2d(datamodule.name, n, datamodule.seed + 1000))
    train = datamodule.train_data.double()
    g = torch.Generator().manual_seed(cfg.seed)
    chol = torch.linalg.cholesky(torch.cov(train.T))
    gaussian = train.mean(0) + torch.randn(n, 2, generator=g, dtype=torch.float64) @ chol.T
    result: dict[str, Any] = {"num_samples": n, "held_out_split": cfg.split}
    for name, fn in (
        ("energy_distance", energy_distance),
        ("sliced_wasserstein", sliced_wasserstein),
    ):
        result[name] = {
            "model": fn(samples, held_out),
            "floor_two_held_out_draws": fn(second, held_out),
            "gaussian_baseline": fn(gaussian.float(), held_out),
        }
    return result


def fid_kid(
    trained: Trained, datamodule: Any, cfg: DictConfig, device: str
) -> dict[str, Any] | None:
    """FID and KID (torchmetrics) of generated images against a reference split, or None, with
    one line saying why, when torch-fidelity or the Inception weights are missing."""
    weights = Path(
        cfg.fid.weights_path or Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    )
    try:
        import torch_fidelity  # noqa: F401 - torchmetrics' Inception network comes from it
    except ImportError:
        log.warning(
            "FID/KID skipped: install torch-fidelity (pip install -e '.[fid]') to enable them."
        )
        return None
    if not weights.is_file():
        log.warning(
            f"FID/KID skipped: no Inception weights at {weights}; put {INCEPTION_FILE} there "
            "(torch-fidelity's pt_inception-2015-12-05) or set fid.weights_path=<file>."
        )
        return None
    from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
    from torchmetrics.image.kid import KernelInceptionDistance

    inception = NoTrainInceptionV3(
        name="inception-v3-compat",
        features_list=["2048"],
        feature_extractor_weights_path=str(weights),
    )
    # One network for both; with it given as a module, the metrics take uint8 images.
    fid = FrechetInceptionDistance(feature=inception).to(device)
    kid = KernelInceptionDistance(feature=inception, subset_size=min(1000, cfg.fid.num_samples)).to(
        device
    )

    def add(images: torch.Tensor, real: bool) -> None:
        images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        images = images.expand(-1, 3, -1, -1)  # grey -> RGB
        for batch in images.split(cfg.batch_size):
            fid.update(batch.to(device), real=real)
            kid.update(batch.to(device), real=real)

    samples, _ = generate(
        trained,
        cfg.fid.num_samples,
        cfg.batch_size,
        cfg.sampler,
        cfg.steps,
        cfg.eta,
        seed=cfg.seed,
        device=device,
    )
    if world()[0] != 0:
        return None  # rank 0 computes the statistics
    reference = split_data(datamodule, cfg.fid.reference_split)[: cfg.fid.num_reference]
    add(reference, real=True)
    add(samples, real=False)
    kid_mean, kid_std = kid.compute()
    return {
        "fid": fid.compute().item(),
        "kid_mean": kid_mean.item(),
        "kid_std": kid_std.item(),
        "reference_split": cfg.fid.reference_split,
        "num_samples": cfg.fid.num_samples,
        "num_reference": len(reference),
    }


def write_terms(terms_bpd: list[float], output_dir: Path) -> None:
    """bpd_terms.csv (paper's t = 1..T, bits/dim) and bpd_terms.png (the rate against t)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (output_dir / "bpd_terms.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["t", "bpd"])
        writer.writerows([t + 1, value] for t, value in enumerate(terms_bpd))
    t = np.arange(1, len(terms_bpd) + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(t, np.maximum(terms_bpd, 1e-12))
    ax.set(xlabel="t", ylabel="bits/dim", title="terms of the bound (L_0 at t = 1)")
    fig.tight_layout()
    fig.savefig(output_dir / "bpd_terms.png", dpi=100)
    plt.close(fig)


def evaluate(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Compute the configured metrics, write them to `output_dir` and the loggers, print them."""
    started = time.perf_counter()
    with user_errors():  # every check, before the long work
        trained = load_trained_for(cfg)
        datamodule = trained.datamodule()
        data = split_data(datamodule, cfg.split)
        if cfg.fid.enabled:
            split_data(datamodule, cfg.fid.reference_split)
        num_samples = cfg.fid.num_samples if len(datamodule.data_shape) == 3 else len(data)
        check_sampling(
            trained.diffusion, num_samples, cfg.batch_size, cfg.sampler, cfg.steps, cfg.eta
        )
    device = pick_device(cfg.device)
    if cfg.max_examples is not None:
        data = data[: cfg.max_examples]
    metrics: dict[str, Any] = {
        "ckpt_path": str(cfg.ckpt_path),
        "split": cfg.split,
        "variance": trained.diffusion.variance,
        "timesteps": trained.diffusion.num_timesteps,
    }
    if datamodule.num_levels is not None and cfg.bpd:
        bound = bound_bpd(trained, data, datamodule.num_levels, cfg.batch_size, cfg.seed, device)
        terms_bpd = bound.pop("terms_bpd")
        if world()[0] == 0:
            output_dir.mkdir(parents=True, exist_ok=True)
            write_terms(terms_bpd, output_dir)
        metrics.update(bound, num_examples=len(data), num_levels=datamodule.num_levels)
    if len(datamodule.data_shape) == 3 and cfg.fid.enabled:
        metrics["fid"] = fid_kid(trained, datamodule, cfg, device)
    if len(datamodule.data_shape) == 1:
        metrics.update(toy_distances(trained, datamodule, cfg, device))
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    if world()[0] != 0:
        return metrics  # rank 0 writes and logs
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    flat = _flatten(metrics)
    loggers = [guard_logger(instantiate(v)) for v in (cfg.get("logger") or {}).values() if v]
    for logger in loggers:
        logger.log_metrics({f"eval/{k}": v for k, v in flat.items()})
        logger.save()
    finish_wandb(loggers)
    print("\n".join(f"{k:<45} {v:.4f}" for k, v in flat.items()))
    return metrics


def _flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested dict, with '/'-joined keys."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
