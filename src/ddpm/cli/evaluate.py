"""`ddpm-eval ckpt_path=...` (or `python -m ddpm.cli.evaluate`): evaluate a trained checkpoint.

Writes metrics.json and prints a table: the likelihoods of `likelihood` in bits/dim (the bound,
with its per-t terms in bpd_terms.csv and bpd_terms.png; the probability-flow ODE's exact NLL,
per example in ode_terms.csv), and what the data module scores its samples by (`scores`): FID/KID
for images, energy and sliced Wasserstein distances for points.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ddpm.checkpoint import load_trained_for, pick_device
from ddpm.checks import check_choice
from ddpm.cli.common import quiet_known_noise, user_errors, write_rows
from ddpm.config import CONFIG_PATH
from ddpm.data.base import SPLITS
from ddpm.distributed import world
from ddpm.figures import bpd_terms_figure
from ddpm.likelihood import ODESettings, check_likelihoods, ode_bpd
from ddpm.loggers import flatten_numbers, log_results
from ddpm.metrics import (
    FEATURES,
    bound_bpd,
    class_accuracy,
    fid_kid,
    held_out_images,
    point_distances,
    score_features,
)
from ddpm.results import headline_metrics, write_run_results
from ddpm.sampling import check_guidance, check_sampling, generate, sampler_of
from ddpm.truth import mean_and_stderr


def check_split(split: str, key: str = "split") -> str:
    """A split name, or a one-sentence ValueError naming `key`."""
    check_choice(key, split, SPLITS)
    return split


def check_likelihood_keys(cfg: DictConfig, dim: int) -> tuple[list[str], ODESettings]:
    """`likelihood` and `ode.` checked (the old `bpd=` refused with its new spelling)."""
    if cfg.get("bpd") is not None:
        new = "likelihood=[bound]" if cfg.bpd else "likelihood=[]"
        raise ValueError(
            f"bpd={str(cfg.bpd).lower()} is now written {new}: the key likelihood lists the "
            "likelihoods measured (bound, ode)."
        )
    likelihoods = check_likelihoods(cfg.likelihood)
    keys = OmegaConf.to_container(cfg.ode, resolve=True)
    allowed = list(ODESettings.__dataclass_fields__)
    for name, value in keys.items():
        if name not in allowed:
            raise ValueError(
                f"ode.{name}={value!r} is not a key of ode: its keys are {', '.join(allowed)}."
            )
    settings = ODESettings(**keys)
    return likelihoods, settings.check(dim if "ode" in likelihoods else None)


def exact_bpd(
    datamodule: Any, data: torch.Tensor, labels: torch.Tensor | None = None
) -> dict[str, float]:
    """For continuous data whose distribution is known (gmm, toy2d 8gaussians): the exact NLL of
    the examples in bits/dim (`exact_bpd`, `exact_bpd_stderr`), beside the model's, given their
    `labels` when a conditional model's likelihoods are (-log p(x | y)); else {}."""
    known = datamodule.distribution()
    if datamodule.num_levels is not None or known is None:
        return {}
    x = data.double()
    if labels is None:
        log_p = known.log_prob(x)
    else:
        log_p = torch.empty(len(x), dtype=torch.float64)
        for label in labels.unique().tolist():
            rows = labels == label
            log_p[rows] = known.of_class(label).log_prob(x[rows]).cpu()
    bpd = -log_p / (known.dim * math.log(2))
    mean, stderr = mean_and_stderr(bpd)
    return {"exact_bpd": mean, "exact_bpd_stderr": stderr}


def sample_labels(trained: Any, n: int, seed: int) -> torch.Tensor | None:
    """The classes of n samples of a conditional model (None for an unconditional one): drawn
    i.i.d. from the training split's class frequencies by a generator of their own (`seed`), so
    that the samples are of p(x) = sum_y p(y) p(x | y), as an unconditional model's and the real
    held-out data are, and FID compares them alike (exactly class-balanced samples score an
    optimistic FID: balance alone halves it on the digits, docs/results.md)."""
    if trained.num_classes is None:
        return None
    train = trained.datamodule.labels("train")
    frequencies = torch.bincount(train, minlength=trained.num_classes).double()
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(frequencies, n, replacement=True, generator=generator)


def write_terms(terms_bpd: list[float], output_dir: Path) -> None:
    """bpd_terms.csv (paper's t = 1..T, bits/dim) and bpd_terms.png (the rate against t)."""
    with (output_dir / "bpd_terms.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["t", "bpd"])
        writer.writerows([t + 1, value] for t, value in enumerate(terms_bpd))
    Image.fromarray(bpd_terms_figure(terms_bpd)).save(output_dir / "bpd_terms.png")


# What the likelihoods do not depend on: how samples are drawn and scored, which likelihoods are
# asked for, and where things go (the batches do matter: each is seeded on its own).
NOT_IN_THE_LIKELIHOODS = (
    "sampler", "fid", "steps", "eta", "device", "logger", "paths", "likelihood", "ode",
    "guidance_scale",
)  # fmt: skip


def evaluate(
    cfg: DictConfig, output_dir: Path, likelihoods: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Compute the configured metrics, write them to `output_dir` and the loggers, print them.
    `likelihoods` keeps the likelihoods already computed in this process by config (without the
    keys they do not depend on), so that evaluations differing only in their sampler
    (eval.variants) compute each once."""
    started = time.perf_counter()
    with user_errors():  # every check, before the long work
        trained = load_trained_for(cfg)
        clip = trained.clip_denoised(cfg.clip_denoised)
        datamodule = trained.datamodule
        data = datamodule.split(check_split(cfg.split))
        fid_wanted = "fid" in datamodule.scores and cfg.fid.enabled
        if fid_wanted:
            check_split(cfg.fid.reference_split, "fid.reference_split")
            check_choice("fid.features", cfg.fid.features, FEATURES)
        num_samples = (cfg.fid.num_samples or 1) if fid_wanted else len(data)
        sampler = check_sampling(trained.diffusion, num_samples, cfg.batch_size, sampler_of(cfg))
        wanted, ode_settings = check_likelihood_keys(cfg, data[0].numel())
        conditional = trained.num_classes is not None
        # a conditional model: samples of classes drawn as the data's, guided at guidance_scale
        _, scale = check_guidance(trained, "all" if conditional else None, cfg.guidance_scale)
        labels = datamodule.labels(cfg.split) if conditional else None
    device = pick_device(cfg.device)
    if cfg.max_examples is not None:
        data = data[: cfg.max_examples]
        labels = None if labels is None else labels[: cfg.max_examples]
    sampling = dict(sampler=sampler, clip_denoised=clip, guidance_scale=scale)
    metrics: dict[str, Any] = {
        "ckpt_path": str(cfg.ckpt_path),
        "split": cfg.split,
        "variance": trained.diffusion.variance,
        "prediction": trained.diffusion.prediction,
        "timesteps": trained.diffusion.num_timesteps,
        "clip_denoised": clip,
        "sampler": {"name": sampler.option, **sampler.settings()},
    }
    if conditional:
        metrics["guidance_scale"] = scale
    kept = [k for k in cfg if k not in NOT_IN_THE_LIKELIHOODS]
    key = json.dumps(OmegaConf.to_container(OmegaConf.masked_copy(cfg, kept), resolve=True),
                     sort_keys=True, default=str)  # fmt: skip
    likelihoods = {} if likelihoods is None else likelihoods
    sampled = False  # whether samples were drawn (FID, distances)
    if wanted:
        metrics.update(num_examples=len(data), num_levels=datamodule.num_levels)
        metrics.update(exact_bpd(datamodule, data, labels))
    if "bound" in wanted:
        bound_key = f"bound|{key}|clip={clip}"
        if bound_key not in likelihoods:
            likelihoods[bound_key] = bound_bpd(
                trained, data, datamodule.num_levels, cfg.batch_size, cfg.seed, device, clip,
                labels,
            )  # fmt: skip
        bound = dict(likelihoods[bound_key])
        terms_bpd = bound.pop("terms_bpd")
        if world()[0] == 0:
            output_dir.mkdir(parents=True, exist_ok=True)
            write_terms(terms_bpd, output_dir)
        metrics.update(bound)
    if "ode" in wanted:
        ode_key = f"ode|{key}|{ode_settings}"
        if ode_key not in likelihoods:
            likelihoods[ode_key] = ode_bpd(
                trained, data, datamodule.num_levels, ode_settings, cfg.batch_size, cfg.seed,
                device, labels,
            )  # fmt: skip
        ode = dict(likelihoods[ode_key])
        rows = ode.pop("rows")
        if world()[0] == 0:
            output_dir.mkdir(parents=True, exist_ok=True)
            write_rows(rows, output_dir / "ode_terms.csv")  # per example, by its index
        dequantized = datamodule.num_levels is not None
        metrics.update(ode)
        metrics["ode"] = {
            **vars(ode_settings),
            "dequantization": ode_settings.dequantization if dequantized else None,
        }
    if fid_wanted:
        metrics["fid"] = None
        features, kind = score_features(
            datamodule, cfg.fid.features, cfg.fid.weights_path, cfg.paths.data_dir,
            cfg.fid.classifier_seed,
        )  # fmt: skip
        if features is not None:  # else score_features said why, in one line
            held_out = held_out_images(datamodule, cfg.fid.reference_split)
            num_samples = cfg.fid.num_samples or len(held_out)
            asked = sample_labels(trained, num_samples, cfg.seed)
            samples, _ = generate(
                trained, num_samples, cfg.batch_size, **sampling, seed=cfg.seed, device=device,
                labels=asked,
            )  # fmt: skip
            sampled = True
            if asked is not None:
                metrics.update(class_accuracy(
                    datamodule, samples, asked, cfg.paths.data_dir, cfg.fid.classifier_seed
                ))  # fmt: skip
            if world()[0] == 0:  # rank 0 computes the statistics
                reference = datamodule.split(cfg.fid.reference_split)[: cfg.fid.num_reference]
                scores = fid_kid(
                    samples, reference, held_out, features.to(device), cfg.batch_size, device,
                    cfg.seed,
                )  # fmt: skip
                metrics["fid"] = {
                    **scores, "features": kind, "reference_split": cfg.fid.reference_split,
                }  # fmt: skip
    if "distances" in datamodule.scores:
        asked = sample_labels(trained, len(data), cfg.seed)
        samples, _ = generate(
            trained, len(data), cfg.batch_size, **sampling, seed=cfg.seed, device=device,
            labels=asked,
        )  # fmt: skip
        sampled = True
        if asked is not None:
            metrics.update(class_accuracy(datamodule, samples, asked, cfg.paths.data_dir))
        second = datamodule.second_draw(len(data))
        metrics["num_samples"], metrics["held_out_split"] = len(data), cfg.split
        metrics.update(point_distances(samples, data, second, datamodule.train_data, cfg.seed))
    if sampled:  # per sample; after sampling, as sampler=ode's are measured
        metrics["network_calls"] = sampler.network_calls(trained.diffusion)
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    if world()[0] != 0:
        return metrics  # rank 0 writes and logs
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    # a sweep's table (results.md, results.png) has a row for this job, as for train.py's
    write_run_results(
        output_dir,
        {"metrics": headline_metrics(metrics, "eval/"), "wall_seconds": metrics["seconds"]},
    )
    flat = flatten_numbers(metrics)
    log_results(cfg.get("logger"), metrics, prefix="eval")
    print("\n".join(f"{k:<45} {v:.4f}" for k, v in flat.items()))
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def main(cfg: DictConfig) -> None:
    quiet_known_noise()
    evaluate(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
