"""Time to quality on the digits: the default `python train.py` against a plain PyTorch loop around
diffusers' `UNet2DModel` given the same wall-clock time, on this machine, in one run.

1. ours     `python train.py` (the default config; extra overrides after `--`) as a subprocess,
            timed from launch to exit: the time a user waits (start-up, validations, sample grids
            and checkpoints included).
2. plain    in this process, diffusers' UNet2DModel (0.70M parameters: block_out_channels
            (32, 64), one layer per block, attention at 4x4), Adam lr 1e-3, batch 128, an EMA of
            decay 0.995, T = 1000 linear, L_simple, trained on the same training split for as
            many seconds as ours took in all (its own imports and set-up not counted); with
            `--plain-factors 1 1.43`, one plain loop for each multiple of ours' time
            (`--plain-seconds`: for each of these times).
3. scored   alike for both: `--samples` ancestral samples (ours: `ddpm.sampling.generate` from
            last.ckpt's EMA weights; plain: diffusers' DDPMScheduler loop, as DDPMPipeline runs it),
            FID and KID in the digit classifier's features (`ddpm.metrics.fid_kid`) against the
            training split, the FID's spread over resamplings of the samples (bootstrap), with
            their floor (the held-out real digits against it), and the test
            bits/dim of the full bound (`ddpm.metrics.bound_bpd`) with sigma_t^2 = beta_t and
            beta_tilde_t (the same network serves both).

    python benchmarks/time_to_quality.py --out ttq.json --grid docs/time_to_quality.png
    python benchmarks/time_to_quality.py -- model.optimizer.lr=1e-3   # overrides for train.py
    python benchmarks/time_to_quality.py --plain-factors 1 1.43  # plain also given ours / 0.7

Prints the scores, wall times, the floor and the ratios; writes the JSON and the sample grids
side by side. Needs diffusers (`pip install -e ".[bench]"`). About 15 minutes on 2 cores, and
5 more for each further plain loop.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ddpm.checkpoint import Trained, load_trained
from ddpm.classifier import classifier_for
from ddpm.diffusion import GaussianDiffusion
from ddpm.figures import _pyplot
from ddpm.metrics import bound_bpd, fid_kid, held_out_images
from ddpm.sampling import generate
from ddpm.schedules import make_beta_schedule

ROOT = Path(__file__).resolve().parents[1]
PLAIN = {"lr": 1e-3, "batch": 128, "ema_decay": 0.995, "timesteps": 1000}
VARIANCES = ("beta", "tilde_beta")  # fixed sigma_t^2: the same network serves both
BOOTSTRAP_DRAWS = 20


def run_ours(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """`python train.py` into `run_dir`; its wall time and the trained model."""
    command = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *overrides]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    trained = load_trained(run_dir / "checkpoints" / "last.ckpt", use_ema=True)
    results = json.loads((run_dir / "results.json").read_text())
    return {"seconds": seconds, "trained": trained, "steps": results["step"]}


class DiffusersEps(torch.nn.Module):
    """diffusers' UNet2DModel as a backbone of ours: model(x, t) -> predicted eps."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        self.net = UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t).sample


def run_plain(train: torch.Tensor, seconds: float, seed: int) -> dict[str, Any]:
    """The plain loop for `seconds` of training; returns its EMA network and step count."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    model = DiffusersEps()
    ema = DiffusersEps()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=PLAIN["timesteps"], beta_schedule="linear")
    optimizer = torch.optim.Adam(model.parameters(), lr=PLAIN["lr"])
    params, ema_params = list(model.parameters()), list(ema.parameters())
    per_epoch = len(train) // PLAIN["batch"]
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        order = torch.randperm(len(train))
        for i in range(per_epoch):
            x0 = train[order[i * PLAIN["batch"] : (i + 1) * PLAIN["batch"]]]
            t = torch.randint(0, PLAIN["timesteps"], (len(x0),))
            noise = torch.randn_like(x0)
            loss = F.mse_loss(model(scheduler.add_noise(x0, noise, t), t), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - PLAIN["ema_decay"])
            steps += 1
            if time.perf_counter() - started >= seconds:
                break
    elapsed = time.perf_counter() - started
    print(f"plain loop: {steps} steps in {elapsed:.0f} s", flush=True)
    return {"seconds": elapsed, "net": ema.eval(), "steps": steps}


@torch.no_grad()
def sample_plain(net: DiffusersEps, num: int, batch: int, seed: int) -> torch.Tensor:
    """diffusers' ancestral loop (DDPMScheduler.step over all T steps, as DDPMPipeline)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=PLAIN["timesteps"], beta_schedule="linear")
    scheduler.set_timesteps(PLAIN["timesteps"])
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, num, batch):
        x = torch.randn((min(batch, num - start), 1, 8, 8), generator=generator)
        for t in scheduler.timesteps:
            x = scheduler.step(net(x, t), t, x, generator=generator).prev_sample
        out.append(x)
    return torch.cat(out)


def score(
    name: str,
    trained: Trained,
    samples: torch.Tensor,
    sample_seconds: float,
    datamodule: Any,
    classifier: torch.nn.Module,
) -> dict[str, Any]:
    """FID/KID of `samples` with their floor, and the test bound under both fixed variances."""
    reference = datamodule.split("train")
    held_out = held_out_images(datamodule, "train")
    row: dict[str, Any] = {"name": name, "sample_seconds": round(sample_seconds, 1)}
    row.update(fid_kid(samples, reference, held_out, classifier, batch_size=500, seed=0))
    row["fid_bootstrap_std"] = bootstrap_fid_std(samples, reference, classifier)
    test = datamodule.split("test")
    diffusion = trained.diffusion
    for variance in (diffusion.variance,) if diffusion.learned_variance else VARIANCES:
        chain = GaussianDiffusion(diffusion.betas, variance, diffusion.prediction)
        bound = bound_bpd(
            Trained(trained.backbone, chain, {}), test, datamodule.num_levels, 256, seed=0,
            clip_denoised=True,
        )  # fmt: skip
        row[f"bpd_{variance}"] = bound["bpd"]
        row[f"bpd_{variance}_stderr"] = bound["bpd_stderr"]
    row["bpd"] = row[f"bpd_{diffusion.variance}"]  # with the variance the sampler uses
    row["bpd_best"] = min(v for k, v in row.items() if k.startswith("bpd_") and "stderr" not in k)
    return row


def bootstrap_fid_std(
    samples: torch.Tensor,
    reference: torch.Tensor,
    classifier: torch.nn.Module,
    draws: int = BOOTSTRAP_DRAWS,
) -> float:
    """The standard deviation of the FID (as `fid_kid` measures it) over `draws` resamplings of
    the samples with replacement: how much of a difference between two contenders the draw of
    the samples alone can make (a second sampling seed moved one model's FID from 0.29 to 0.44
    at 1000 samples)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=classifier, reset_real_features=False)
    generator = torch.Generator().manual_seed(0)
    values = []
    with torch.no_grad():
        fid.update(reference.clamp(-1, 1), real=True)
        for _ in range(draws):
            fid.update(samples[torch.randint(len(samples), (len(samples),), generator=generator)]
                       .clamp(-1, 1), real=False)  # fmt: skip
            values.append(fid.compute().item())
            fid.reset()  # the reference's features are kept
    return torch.tensor(values).std().item()


def side_by_side(datamodule: Any, panels: list[tuple[torch.Tensor, str]], path: Path) -> None:
    """The first 64 samples of each contender, titled, in one PNG."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5.4))
    for ax, (samples, title) in zip(axes, panels, strict=True):
        ax.imshow(datamodule.show(samples[:64]))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--plain-factors", type=float, nargs="+", default=[1.0],
        help="one plain loop for each, trained this many times ours' time (1 1.43: the same "
        "time, and ours in 0.7 of the plain loop's)",
    )  # fmt: skip
    parser.add_argument(
        "--plain-seconds", type=float, nargs="+", default=None,
        help="the plain loops' times in seconds instead",
    )  # fmt: skip
    parser.add_argument("--run-dir", type=Path, default=None, help="ours' run folder")
    parser.add_argument("--out", type=Path, default=None, help="JSON of the results")
    parser.add_argument("--grid", type=Path, default=None, help="PNG of both sample grids")
    parser.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    args = parser.parse_args()
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    run_dir = (args.run_dir or ROOT / "outputs" / "time_to_quality" / stamp).resolve()

    ours = run_ours(run_dir, args.overrides)
    trained = ours["trained"]
    datamodule = trained.datamodule
    classifier = classifier_for(datamodule, ROOT / "data", seed=0)
    train = datamodule.split("train")
    budgets = args.plain_seconds or [f * ours["seconds"] for f in args.plain_factors]
    plains = [run_plain(train, seconds, args.seed) for seconds in budgets]

    started = time.perf_counter()
    ours_samples, _ = generate(trained, args.samples, 500, seed=args.seed)
    ours_row = score(
        "ours", trained, ours_samples, time.perf_counter() - started, datamodule, classifier
    )
    ours_row.update(
        train_seconds=round(ours["seconds"], 1), steps=ours["steps"],
        params=sum(p.numel() for p in trained.backbone.parameters()),
        variance=trained.diffusion.variance,
    )  # fmt: skip
    # DDPMScheduler's default variance_type, fixed_small, is beta_tilde_t
    linear = GaussianDiffusion(make_beta_schedule("linear", PLAIN["timesteps"]), "tilde_beta")
    rows, panels = [ours_row], [ours_samples]
    for plain in plains:
        started = time.perf_counter()
        plain_samples = sample_plain(plain["net"], args.samples, 500, args.seed)
        row = score(
            "diffusers", Trained(plain["net"], linear, {}), plain_samples,
            time.perf_counter() - started, datamodule, classifier,
        )  # fmt: skip
        row.update(
            train_seconds=round(plain["seconds"], 1), steps=plain["steps"],
            params=sum(p.numel() for p in plain["net"].parameters()), variance=linear.variance,
            fid_ratio_ours_over_plain=ours_row["fid"] / row["fid"],
            time_ratio_ours_over_plain=ours_row["train_seconds"] / round(plain["seconds"], 1),
        )  # fmt: skip
        rows.append(row)
        panels.append(plain_samples)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}",
        "date": stamp,
        "train_overrides": args.overrides,
        "run_dir": str(run_dir),
        "rows": rows,
    }
    keys = [
        "train_seconds", "steps", "params", "fid", "fid_bootstrap_std", "fid_floor", "kid_mean",
        "kid_floor_mean", "bpd", "bpd_best", "sample_seconds",
    ]  # fmt: skip
    print(f"{'':10}" + "".join(f"{k:>18}" for k in keys))
    for row in rows:
        print(f"{row['name']:10}" + "".join(f"{_fmt(row[k]):>18}" for k in keys))
    for row in rows[1:]:
        print(
            f"against the plain loop given {row['train_seconds']:.0f} s: FID ours / plain "
            f"{row['fid_ratio_ours_over_plain']:.3f} (below 1: ours closer to the data), "
            f"bits/dim ours - plain {ours_row['bpd_best'] - row['bpd_best']:+.3f}, wall time "
            f"ours / plain {row['time_ratio_ours_over_plain']:.3f}"
        )
    print(
        f"floor FID {ours_row['fid_floor']:.3f} with {ours_row['num_floor']} real digits; KID is "
        "unbiased, so it can be negative near 0"
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.grid:
        side_by_side(
            datamodule,
            [
                (samples, f"{r['name']}: {r['train_seconds']:.0f} s, {r['steps']} steps, "
                 f"FID {r['fid']:.3f}, bpd {r['bpd']:.3f}")
                for samples, r in zip(panels, rows, strict=True)
            ],
            args.grid,
        )  # fmt: skip


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
