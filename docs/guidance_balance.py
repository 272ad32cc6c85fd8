"""How much class balance alone lowers FID on the digits, in the classifier features the studies
use: FID against the training digits of 290 held-out real digits (validation and test), drawn
either exactly class-balanced (29 of each digit) or at random, 20 draws each; prints the mean and
standard deviation of each. (A conditional model's samples in ddpm-eval are exactly balanced.)

    python docs/guidance_balance.py
"""

from __future__ import annotations

import statistics

import torch

from ddpm.data import DigitsDataModule
from ddpm.metrics import frechet_distance, score_features


def main() -> None:
    data = DigitsDataModule()
    features, _ = score_features(data, "classifier", None, "data", 0)
    held = torch.cat([data.split("val"), data.split("test")])
    labels = torch.cat([data.labels("val"), data.labels("test")])
    with torch.no_grad():
        real, train = features(held).double(), features(data.train_data).double()
    generator = torch.Generator().manual_seed(0)
    balanced, random = [], []
    for _ in range(20):
        picks = [torch.nonzero(labels == c)[:, 0] for c in range(10)]
        each = [p[torch.randperm(len(p), generator=generator)[:29]] for p in picks]
        balanced.append(frechet_distance(real[torch.cat(each)], train))
        anyhow = torch.randperm(len(held), generator=generator)[:290]
        random.append(frechet_distance(real[anyhow], train))
    print(f"held-out class counts: {torch.bincount(labels).tolist()}")
    for name, values in (("balanced", balanced), ("random", random)):
        print(f"{name}: FID {statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}")


if __name__ == "__main__":
    main()
