"""Train a DDPM: `python train.py [group=option ...] [key=value ...]` (configs in conf/)."""

import hydra
from omegaconf import DictConfig

from ddpm.train import optimized_value, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the final `optimized_metric` (what a sweeper optimises)."""
    return optimized_value(cfg, train(cfg))


if __name__ == "__main__":
    main()
