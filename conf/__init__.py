"""The Hydra configs, shipped inside the package as `ddpm.conf` (pyproject.toml maps it onto the
repository's conf/): the commands read them as `pkg://ddpm.conf`, from any folder."""
