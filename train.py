"""Train a DDPM: `python train.py [group=option ...] [key=value ...]` (configs in conf/).

The same as the `ddpm-train` command; the work is in `ddpm.cli.train`.
"""

from ddpm.cli.train import main

if __name__ == "__main__":
    main()
