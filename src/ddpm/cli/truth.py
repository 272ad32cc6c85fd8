"""`ddpm-truth` (or `python -m ddpm.cli.truth`): measure against the true reverse process.

With `ckpt_path` (or `backbone=oracle`): per t, the KL from the true reverse step q(x_{t-1} | x_t)
to the model's Gaussian p_theta(x_{t-1} | x_t), the least KL any Gaussian step could reach (the
Gaussian gap), and the model's simple loss beside its floor; for continuous data the exact NLL of
held-out data beside the model's bound. Writes truth.json, truth_terms.csv and truth.png.

Without: for each T of `gaussianity.timesteps`, the Gaussian gap per t of the chosen data's true
reverse process. Writes gaussianity.json, gaussianity.csv and gaussianity.png.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ddpm.checkpoint import ORACLE_TARGET, is_oracle, load_trained_for, pick_device
from ddpm.checks import check_int
from ddpm.cli.common import plain, quiet_known_noise, user_errors, write_rows
from ddpm.conditioning import AtLabel, Guided
from ddpm.config import CONFIG_PATH
from ddpm.diffusion import GaussianDiffusion
from ddpm.figures import gaussianity_figure, truth_figure
from ddpm.loggers import log_results
from ddpm.metrics import bound_bpd
from ddpm.sampling import check_guidance
from ddpm.truth import distribution_of, timesteps_to_evaluate, truth_terms


def check_settings(cfg: DictConfig) -> None:
    """One-sentence errors for the Monte Carlo settings, before any work."""
    check_int("num_samples", cfg.num_samples, minimum=2)
    check_int("batch_size", cfg.batch_size)
    check_int("max_examples", cfg.max_examples)
    if cfg.t_points is not None:
        check_int("t_points", cfg.t_points)
    check_int("gaussianity.t_points", cfg.gaussianity.t_points)
    timesteps = cfg.gaussianity.timesteps
    if not OmegaConf.is_list(timesteps) or not timesteps:
        raise ValueError(
            f"gaussianity.timesteps={timesteps!r} is invalid: it must be a list of T, "
            "e.g. [2,5,10,50,1000]."
        )
    for value in timesteps:
        check_int("gaussianity.timesteps", value)


def steps_with_density(num_timesteps: int, distribution: Any) -> int:
    """The steps whose true reverse has a density: all, but the last (to x_0) when the data
    has point masses (an empirical distribution)."""
    return num_timesteps - int(not bool((distribution.variances > 0).all()))


def chain_total(rows: list[dict[str, Any]], key: str, num_timesteps: int) -> dict[str, float]:
    """`<key>_total`: `num_timesteps` times the mean of a per-t value over the measured steps
    (their sum when every step was measured; for a KL per step, the KL between the whole chains),
    with its standard error from the steps' Monte Carlo errors."""
    n = len(rows)
    mean = sum(row[key] for row in rows) / n
    stderr = math.sqrt(sum(row[f"{key}_stderr"] ** 2 for row in rows)) / n
    name = f"{key}_total" if num_timesteps > 1 else f"{key}_mean_over_t"
    return {name: num_timesteps * mean, f"{name}_stderr": num_timesteps * stderr}


def one_label(trained: Any, cfg: DictConfig) -> tuple[int | None, float]:
    """`labels` (one class at most: the truth is measured for one distribution) and
    `guidance_scale`, checked against the model (`ddpm.sampling.check_guidance`)."""
    labels = plain(cfg.get("labels"))
    classes, scale = check_guidance(trained, labels, cfg.get("guidance_scale", 1.0))
    if classes is not None and len(classes) != 1:
        raise ValueError(
            f"labels={labels} is invalid for ddpm-truth: it measures one class at a time "
            f"(labels=[{classes[0]}]), or the null label's mixture without labels=."
        )
    return (None if classes is None else classes[0]), scale


def model_study(cfg: DictConfig, output_dir: Path) -> tuple[dict[str, Any], list[dict]]:
    """A trained model (or the oracle) against the true reverse process of its data: the
    summary and the rows per t."""
    with user_errors():
        check_settings(cfg)
        trained = load_trained_for(cfg)
        datamodule = trained.datamodule
        distribution = distribution_of(datamodule, cfg.distribution)
        clip = trained.clip_denoised(cfg.clip_denoised)
        label, scale = one_label(trained, cfg)
    device = pick_device(cfg.device)
    diffusion = trained.diffusion
    steps = timesteps_to_evaluate(diffusion.num_timesteps, cfg.t_points)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = backbone = trained.backbone.to(device)
    if trained.num_classes is not None:  # the null label (the mixture), or the class asked for
        model = Guided(backbone, scale, trained.num_classes, distribution.shape[0])
        if label is not None:
            model, distribution = AtLabel(model, label), distribution.of_class(label)
    rows = truth_terms(
        diffusion, distribution, model, steps, cfg.num_samples, generator,
        cfg.batch_size, clip, device,
    )  # fmt: skip
    summary: dict[str, Any] = {
        "ckpt_path": None if cfg.ckpt_path is None else str(cfg.ckpt_path),
        "backbone": "oracle" if is_oracle(trained.run_config["backbone"]) else "trained",
        "distribution": cfg.distribution,
        "timesteps": diffusion.num_timesteps,
        "variance": diffusion.variance,
        "prediction": diffusion.prediction,
        "clip_denoised": clip,
        "num_samples_per_t": cfg.num_samples,
        "t_measured": len(rows),
    }
    if trained.num_classes is not None:
        summary.update(label=label, guidance_scale=scale)
    for name in ("kl", "gaussian_gap"):
        summary.update(
            chain_total(rows, name, steps_with_density(diffusion.num_timesteps, distribution))
        )
    summary.update(chain_total(rows, "excess_loss", 1))  # the mean over t, not a total
    if datamodule.num_levels is None and bool((distribution.variances > 0).all()):
        held_out, y = datamodule.test_data, None
        if label is not None:  # the class's examples, the bound given the label (s = 1)
            held_out = held_out[datamodule.labels("test") == label]
        held_out = held_out[: cfg.max_examples]
        if label is not None:
            y = torch.full((len(held_out),), label)
        nll = -distribution.log_prob(held_out.double()) / (distribution.dim * math.log(2))
        bound = bound_bpd(trained, held_out, None, cfg.batch_size, cfg.seed, device, clip, y)
        summary["nll_bpd_exact"] = nll.mean().item()
        summary["bound_bpd_model"] = bound["bpd"]
        summary["bound_bpd_model_stderr"] = bound["bpd_stderr"]
        summary["bound_gap_bpd"] = bound["bpd"] - nll.mean().item()
        summary["num_examples"] = len(held_out)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_rows(rows, output_dir / "truth_terms.csv")
    Image.fromarray(truth_figure(rows)).save(output_dir / "truth.png")
    return summary, rows


def gaussianity_study(cfg: DictConfig, output_dir: Path) -> tuple[dict[str, Any], list[dict]]:
    """For each T, the Gaussian gap of the true reverse step per t: the summary and the rows."""
    with user_errors():
        check_settings(cfg)
        if not cfg.get("data"):
            raise ValueError(
                "ddpm-truth needs ckpt_path=<a checkpoint> (a model against the truth), "
                "backbone=oracle data=<data>, or data=<data> for the gaussianity study, "
                "e.g. data=gmm."
            )
        datamodule = instantiate(cfg.data)
        distribution = distribution_of(datamodule, cfg.distribution)
        schedule = cfg.get("schedule")
        schedule = (
            OmegaConf.to_container(schedule, resolve=False)
            if schedule
            else {"_target_": "ddpm.schedules.make_beta_schedule", "name": "cosine"}
        )
        chains = {}
        for T in cfg.gaussianity.timesteps:
            schedule["timesteps"] = T
            chains[T] = GaussianDiffusion(instantiate(schedule))
    device = pick_device(cfg.device)
    generator = torch.Generator().manual_seed(cfg.seed)
    rows, per_chain = [], {}
    for T, diffusion in chains.items():
        steps = timesteps_to_evaluate(T, cfg.gaussianity.t_points)
        chain_rows = truth_terms(
            diffusion, distribution, None, steps, cfg.gaussianity.num_samples, generator,
            cfg.batch_size, device=device,
        )  # fmt: skip
        rows += [{"T": T, **row} for row in chain_rows]
        per_chain[str(T)] = {
            "max_beta": max(row["beta"] for row in chain_rows),
            "gaussian_gap_max": max(row["gaussian_gap"] for row in chain_rows),
            **chain_total(chain_rows, "gaussian_gap", steps_with_density(T, distribution)),
        }
    summary = {
        "distribution": cfg.distribution,
        "data": HydraConfig.get().runtime.choices.get("data")
        if HydraConfig.initialized()
        else None,
        "dim": distribution.dim,
        "num_samples_per_t": cfg.gaussianity.num_samples,
        "chains": per_chain,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    write_rows(rows, output_dir / "gaussianity.csv")
    Image.fromarray(gaussianity_figure(rows)).save(output_dir / "gaussianity.png")
    return summary, rows


def truth(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Run the study the config asks for, write its files and log them; return the summary."""
    started = time.perf_counter()
    if cfg.ckpt_path is not None or OmegaConf.select(cfg, "backbone._target_") == ORACLE_TARGET:
        summary, rows = model_study(cfg, output_dir)
        name = "truth"
    else:
        summary, rows = gaussianity_study(cfg, output_dir)
        name = "gaussianity"
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (output_dir / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    log_results(cfg.get("logger"), summary, rows, prefix=name)
    columns = [k for k in rows[0] if not k.endswith("_stderr")]
    print(" ".join(f"{k:>14}" for k in columns))
    for row in rows:
        print(" ".join(f"{row[k]:>14.6g}" for k in columns))
    print(json.dumps(summary, indent=2))
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="truth")
def main(cfg: DictConfig) -> None:
    quiet_known_noise()
    truth(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
