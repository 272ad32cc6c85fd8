"""What `ddpm-eval` measures: the variational bound in bits/dim over every t, FID and KID of
images, and distances between 2-D point clouds."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ddpm.checkpoint import Trained
from ddpm.checks import check_choice
from ddpm.conditioning import batch_labels
from ddpm.data.base import SPLITS
from ddpm.distributed import batch_seed, gather_in_order, my_share

log = logging.getLogger(__name__)

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # what torch-fidelity downloads


def bound_bpd(
    trained: Trained,
    data: torch.Tensor,
    num_levels: int,
    batch_size: int,
    seed: int = 0,
    device: str = "cpu",
    clip_denoised: bool = False,
    labels: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The full bound (every t) on `data`: mean and standard error of the total in bits/dim, the
    mean prior term, and the mean of each term L_0..L_{T-1} over the examples. With
    `clip_denoised` the model's mean uses the predicted x_0 clamped to [-1, 1], as sampling does
    (and as the DDPM and improved-diffusion codes report the bound). With `labels` (a conditional
    model) the bound of log p(x | y)."""
    backbone, diffusion = trained.backbone.to(device), trained.diffusion.to(device)
    done = []
    for index, batch in tqdm(my_share(data.split(batch_size)), desc="bits/dim"):
        generator = torch.Generator().manual_seed(batch_seed(seed, index))
        y = batch_labels(labels, index, batch_size, device)
        out = diffusion.nll_bpd(
            backbone, batch.to(device), num_levels, generator, clip_denoised=clip_denoised, **y
        )
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


def class_accuracy(
    datamodule: Any, samples: torch.Tensor, labels: torch.Tensor, cache_dir: str, seed: int = 0
) -> dict[str, float]:
    """How often samples are of the class asked for: `class_accuracy`, the share that the data's
    classifier assigns to their label -- for images the small classifier behind the small-image
    FID (`ddpm.classifier`), for points of a labelled mixture the class of the most responsible
    component -- and `class_accuracy_real`, the same classifier's accuracy on the real test
    split (its ceiling). {} when the data have no such classifier."""
    real, real_labels = datamodule.test_data, datamodule.labels("test")
    if datamodule.num_levels is None:
        known = datamodule.distribution()
        if known is None or known.labels is None:
            return {}

        def rate(x: torch.Tensor, y: torch.Tensor) -> float:
            return (known.classify(x.double()).cpu() == y.cpu()).double().mean().item()
    else:
        from ddpm.classifier import accuracy, classifier_for

        net = classifier_for(datamodule, cache_dir, seed)
        if net is None:
            return {}

        def rate(x: torch.Tensor, y: torch.Tensor) -> float:
            return accuracy(net, x.float().cpu(), y.cpu())

    return {
        "class_accuracy": rate(samples, labels),
        "class_accuracy_real": rate(real, real_labels),
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


def point_distances(
    samples: torch.Tensor,
    held_out: torch.Tensor,
    second_draw: torch.Tensor,
    train: torch.Tensor,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Model samples vs held-out points, beside a second independent draw of the data (the
    floor) and a Gaussian fitted to the training points (a baseline the model must beat)."""
    g = torch.Generator().manual_seed(seed)
    train = train.double()
    chol = torch.linalg.cholesky(torch.cov(train.T))
    noise = torch.randn(len(held_out), train.shape[1], generator=g, dtype=torch.float64)
    gaussian = (train.mean(0) + noise @ chol.T).float()
    result = {}
    for name, fn in (
        ("energy_distance", energy_distance),
        ("sliced_wasserstein", sliced_wasserstein),
    ):
        result[name] = {
            "model": fn(samples, held_out),
            "floor_two_held_out_draws": fn(second_draw, held_out),
            "gaussian_baseline": fn(gaussian, held_out),
        }
    return result


def inception_weights(weights_path: str | None, quiet: bool = False) -> Path | None:
    """The Inception weights file FID/KID need, or None (with one line saying why, at info level
    when `quiet`) when it or torch-fidelity is missing."""
    say = log.info if quiet else log.warning
    weights = Path(weights_path or Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE)
    try:
        import torch_fidelity  # noqa: F401 - torchmetrics' Inception network comes from it
    except ImportError:
        say(
            "Inception FID/KID skipped: install torch-fidelity (pip install -e '.[fid]') to "
            "enable them."
        )
        return None
    if not weights.is_file():
        say(
            f"Inception FID/KID skipped: no Inception weights at {weights}; put {INCEPTION_FILE} "
            "there (torch-fidelity's pt_inception-2015-12-05) or set fid.weights_path=<file>."
        )
        return None
    return weights


FEATURES = ("auto", "inception", "classifier")


def score_features(
    datamodule: Any, features: str, weights_path: str | None, cache_dir: str | Path, seed: int = 0
) -> tuple[torch.nn.Module | None, str]:
    """The network FID/KID are measured in and its name: `inception`, or the data's own small
    classifier (`ddpm.classifier`); `auto` takes Inception for images of 16 pixels and more when
    its weights are there, else the classifier. (None, reason) when neither can be had."""
    check_choice("fid.features", features, FEATURES)
    small = min(datamodule.data_shape[1:]) < 16
    if features == "inception" or (features == "auto" and not small):
        weights = inception_weights(weights_path, quiet=features == "auto")
        if weights is not None:
            return InceptionFeatures(weights), "inception"
        if features == "inception":
            return None, "no Inception weights"
    from ddpm.classifier import classifier_for

    net = classifier_for(datamodule, cache_dir, seed)
    return (net, "classifier") if net is not None else (None, "no labels for a classifier")


def held_out_images(datamodule: Any, reference_split: str) -> torch.Tensor:
    """The real images outside `reference_split` (each split once: with data.val_size=0 the
    validation split is the test split): what the floor of FID/KID is measured with."""
    others, seen = [], set()
    for name in SPLITS:
        raw = datamodule.splits[name]
        if name != reference_split and raw.data_ptr() not in seen:
            seen.add(raw.data_ptr())
            others.append(datamodule.split(name))
    return torch.cat(others)


class InceptionFeatures(torch.nn.Module):
    """torchmetrics' Inception network (pool features, 2048) on images in [-1, 1]: quantised to
    uint8 and grey made RGB, as the network expects."""

    num_features = 2048

    def __init__(self, weights: Path) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.inception = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=str(weights),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = ((images + 1) * 127.5).round().to(torch.uint8)
        return self.inception(images.expand(-1, 3, -1, -1))


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between two sets of features [N, D] (float64): |mu_a - mu_b|^2 + tr(S_a + S_b -
    2 (S_a S_b)^(1/2)), the trace of the root as the sum of the roots of S_a S_b's eigenvalues."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    roots = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * roots).item()


def fid_bootstrap_std(
    samples: torch.Tensor, reference: torch.Tensor, draws: int = 100, seed: int = 0
) -> float:
    """The spread of FID over the samples: the standard deviation of the Frechet distance of
    `draws` resamples (with replacement) of the samples' features against the reference's."""
    generator = torch.Generator().manual_seed(seed)
    n = len(samples)
    values = [
        frechet_distance(samples[torch.randint(n, (n,), generator=generator)], reference)
        for _ in range(draws)
    ]
    return float(torch.tensor(values).std())


def fid_kid(
    samples: torch.Tensor,
    reference: torch.Tensor,
    held_out: torch.Tensor,
    features: torch.nn.Module,
    batch_size: int,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, float]:
    """FID and KID (torchmetrics) in the space of `features` (a module with `num_features`, on
    images in [-1, 1]; samples are clamped there) of `samples` against `reference`, and their
    floor: the same statistics of
    as many `held_out` real images (disjoint from the reference) against it. KID draws its
    subsets from a generator seeded by `seed`; the global random state is left as it was."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n_floor = min(len(samples), len(held_out))
    subset = min(1000, n_floor, len(reference))
    fid = FrechetInceptionDistance(feature=features, reset_real_features=False).to(device)
    kid = KernelInceptionDistance(feature=features, subset_size=subset, reset_real_features=False)
    kid = kid.to(device)

    def add(images: torch.Tensor, real: bool) -> None:
        for batch in images.clamp(-1, 1).split(batch_size):
            fid.update(batch.to(device), real=real)
            kid.update(batch.to(device), real=real)

    def compute() -> tuple[float, float, float]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            kid_mean, kid_std = kid.compute()
        return fid.compute().item(), kid_mean.item(), kid_std.item()

    with torch.no_grad():
        add(reference, real=True)
        add(samples, real=False)
        model = compute()
        fid.reset(), kid.reset()  # the reference's features are kept
        add(held_out[:n_floor], real=False)
        floor = compute()
        embed = [
            torch.cat(
                [features(b.to(device)).double().cpu() for b in x.clamp(-1, 1).split(batch_size)]
            )
            for x in (samples, reference)
        ]
    return {
        "fid": model[0],
        "fid_bootstrap_std": fid_bootstrap_std(*embed, seed=seed),
        "fid_floor": floor[0],
        "kid_mean": model[1],
        "kid_std": model[2],
        "kid_floor_mean": floor[1],
        "kid_floor_std": floor[2],
        "num_samples": len(samples),
        "num_reference": len(reference),
        "num_floor": n_floor,
    }
