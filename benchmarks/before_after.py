"""Our diffusion code now against an earlier revision's, side by side in one process: ancestral
sampling (a network that costs nothing, then the digits U-Net) and a training step (loss and
backward through the digits U-Net), for eps/beta/simple and v/learned_range/hybrid. The earlier
`src/ddpm/diffusion.py` is read from git and imported on its own (it must need only torch and
ddpm.checks, as the revisions up to the split into ddpm.parameterisation/objectives/samplers do).

    python benchmarks/before_after.py --before 9c203fe      # about 2 minutes on 2 cores

Each ratio is the median of per-pair ratios (ABBA order), earlier seconds over ours: above 1,
ours is faster.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from run import SIZES, our_unet, paired, ratio_of_pairs

from ddpm.diffusion import GaussianDiffusion
from ddpm.schedules import make_beta_schedule

PARAMETERISATIONS = {"eps/beta/simple": ("beta", "eps", "simple"),
                     "v/learned_range/hybrid": ("learned_range", "v", "hybrid")}  # fmt: skip


def earlier_module(revision: str):  # noqa: ANN201 - a module
    """src/ddpm/diffusion.py at `revision`, imported as the module `diffusion_before`."""
    source = subprocess.run(
        ["git", "show", f"{revision}:src/ddpm/diffusion.py"], capture_output=True, text=True,
        check=True, cwd=Path(__file__).parent,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "diffusion_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("diffusion_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["diffusion_before"] = module
    spec.loader.exec_module(module)
    return module


def report(what: str, times: dict[str, list[float]]) -> None:
    r = ratio_of_pairs(times["before"], times["ours"])
    print(f"{what:<62} {r['ratio']:6.3f} {r['q1']:5.3f}-{r['q3']:.3f}")


def sampling(chains: dict, net, shape: tuple[int, ...], steps: int, repeats: int) -> dict:  # noqa: ANN001
    """Seconds of each chain's sample_loop over `steps` respaced steps, side by side."""
    respaced = {name: chain.respace(steps) for name, chain in chains.items()}
    with torch.no_grad():
        runs = {name: functools.partial(c.sample_loop, net, shape) for name, c in respaced.items()}
        return paired(runs, 1, repeats, "cpu")


def training(chains: dict, unet: torch.nn.Module, batch: torch.Tensor, repeats: int) -> dict:
    """Seconds of a training step (loss and backward through `unet`) with each chain."""

    def step(chain: GaussianDiffusion) -> None:
        unet.zero_grad()
        chain.training_loss(unet, batch).mean().backward()

    runs = {name: functools.partial(step, chain) for name, chain in chains.items()}
    return paired(runs, 3, repeats, "cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="a git revision")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    before = earlier_module(args.before)
    size = SIZES["cpu"]["digits"]
    shape = (size.sample_batch, size.channels, size.image_size, size.image_size)
    betas = make_beta_schedule("linear", 1000)
    print(f"{'comparison':<62} {'ratio':>6} {'quartiles':>12}")
    for name, (variance, prediction, loss) in PARAMETERISATIONS.items():
        learned = variance == "learned_range"
        chains = {
            "before": before.GaussianDiffusion(betas, variance, prediction, loss),
            "ours": GaussianDiffusion(betas, variance, prediction, loss),
        }
        unet = our_unet(size, learned_variance=learned)

        def free(x: torch.Tensor, t: torch.Tensor, learned: bool = learned) -> torch.Tensor:
            return torch.cat([0.5 * x, 0.1 * x], 1) if learned else 0.5 * x

        times = sampling(chains, free, shape, 1000, args.repeats)
        report(f"{name}: sampler alone, 1000 steps", times)
        times = sampling(chains, unet, shape, 50, args.repeats)
        report(f"{name}: sampling with the digits U-Net, 50 steps", times)
        times = training(chains, unet, torch.randn(shape), 4 * args.repeats)
        report(f"{name}: training step (loss + backward), digits U-Net", times)


if __name__ == "__main__":
    main()
