"""The cost of the probability-flow ODE's exact NLL (`ddpm-eval likelihood=[ode]`) beside the
bound's (`likelihood=[bound]`), on the same network and examples, in one run: network calls and
seconds per example of each, and their ratio.

    python benchmarks/ode_likelihood.py                                  # CPU: small U-Net, 8x8
    python benchmarks/ode_likelihood.py --device cuda --backbone unet_ddpm_cifar10 \\
        --image-size 32 --channels 3 --examples 100                      # the paper's CIFAR-10 net

The network has random weights (the cost, not the value, is measured); examples are random 8-bit
images. The ODE uses one Hutchinson probe (as on CIFAR-10 by default) unless --divergence exact.
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch
from network import add_network_arguments, random_network

from ddpm.diffusion import GaussianDiffusion
from ddpm.likelihood import ODESettings, ode_bpd
from ddpm.schedules import make_beta_schedule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_network_arguments(parser)
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--timesteps", type=int, default=1000)
    parser.add_argument("--divergence", default="hutchinson")
    args = parser.parse_args()

    backbone = random_network(args)
    diffusion = GaussianDiffusion(make_beta_schedule("linear", args.timesteps)).to(args.device)
    shape = (args.examples, args.channels, args.image_size, args.image_size)
    x = torch.randint(0, 256, shape).float() * (2 / 255) - 1
    trained = SimpleNamespace(backbone=backbone, diffusion=diffusion)
    settings = ODESettings(divergence=args.divergence).check(x[0].numel())

    def seconds(fn) -> float:  # noqa: ANN001
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    result: dict = {}
    ode_time = seconds(
        lambda: result.update(ode_bpd(trained, x, 256, settings, args.examples, 0, args.device))
    )

    @torch.no_grad()
    def bound() -> None:
        diffusion.nll_bpd(backbone, x.to(args.device), 256, torch.Generator().manual_seed(0))

    bound_time = seconds(bound)
    report = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "backbone": args.backbone,
        "parameters": sum(p.numel() for p in backbone.parameters()),
        "examples": args.examples,
        "shape": list(shape[1:]),
        "divergence": settings.divergence,
        "ode_network_calls_per_example": result["ode_nfe"],
        "ode_seconds_per_example": ode_time / args.examples,
        "bound_network_calls_per_example": args.timesteps,
        "bound_seconds_per_example": bound_time / args.examples,
        "ode_over_bound_seconds": ode_time / bound_time,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
