"""The cost of classifier-free guidance per sampling step: the guided network call (conditional
and null labels in one batch of 2B) against the unguided one (batch B), the same network and
sampler, timed alternately in one run; prints seconds per step of each and their ratio.

    python benchmarks/guidance.py                                        # CPU: small U-Net, 8x8
    python benchmarks/guidance.py --device cuda --backbone unet_ddpm_cifar10 \\
        --image-size 32 --channels 3 --batch 256                         # the issue's GPU check

The network has random weights and 10 classes (the cost, not the samples, is measured). On a
device the network saturates (the CPU), a guided step costs about twice an unguided one: it is
the same work on twice the batch.
"""

from __future__ import annotations

import argparse
import time

import torch
from network import add_network_arguments, random_network

from ddpm.conditioning import Guided
from ddpm.diffusion import GaussianDiffusion
from ddpm.samplers import Ancestral
from ddpm.schedules import make_beta_schedule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_network_arguments(parser)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="sampling steps per timing")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    backbone = random_network(args, num_classes=10)
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 1000)).to(args.device)
    sampler = Ancestral(steps=args.steps)
    shape = (args.batch, args.channels, args.image_size, args.image_size)
    y = (torch.arange(args.batch) % 10).to(args.device)

    def seconds_per_step(scale: float) -> float:
        model = Guided(backbone, scale, 10, args.channels)
        x_T = torch.randn(shape, device=args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            sampler.sample(model, diffusion, x_T, y=y)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps

    seconds_per_step(1.0), seconds_per_step(2.0)  # warm-up
    plain, guided = [], []
    for _ in range(args.repeats):  # alternately, so that drifts in the machine's speed cancel
        plain.append(seconds_per_step(1.0))
        guided.append(seconds_per_step(2.0))
    p, g = min(plain), min(guided)
    print(
        f"{args.backbone} on {args.device}, batch {args.batch}, {args.steps} steps, best of "
        f"{args.repeats}: unguided {p * 1e3:.1f} ms/step, guided (s=2) {g * 1e3:.1f} ms/step, "
        f"ratio {g / p:.2f}"
    )


if __name__ == "__main__":
    main()
