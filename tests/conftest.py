"""Shared helpers: compose the Hydra config in-process, or run train.py as a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import ddpm.cli.common  # noqa: F401 - registers the resolvers the configs use

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
README = (ROOT / "README.md").read_text()

# Few steps and a short chain (conf/experiment/smoke.yaml): every piece in seconds.
FAST = ["experiment=smoke"]


@pytest.fixture
def compose_cfg(tmp_path: Path):
    """compose_cfg(overrides, config_name="train") -> the config, as inside a Hydra run in
    tmp_path (`keep_hydra=True` keeps the `hydra` node in it)."""

    def _compose(
        overrides: list[str], config_name: str = "train", keep_hydra: bool = False
    ) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path)
        HydraConfig.instance().set_config(cfg)
        if not keep_hydra:
            with open_dict(cfg):
                del cfg.hydra
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture
def fake_data(tmp_path_factory, monkeypatch) -> Path:
    """A folder with fake MNIST, Fashion-MNIST and CIFAR-10 files (torchvision's formats) and an
    image folder `images/`; CIFAR-10's md5 check is switched off for the test."""
    import torchvision
    from fake_data import write_cifar10, write_image_folder, write_mnist

    root = tmp_path_factory.mktemp("data")
    write_mnist(root, "MNIST"), write_mnist(root, "FashionMNIST"), write_cifar10(root)
    write_image_folder(root / "images")
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    return root


def run_train(
    args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None, script: str = ""
):
    """Run `python train.py ARGS` (or `python -m SCRIPT ARGS`) in `cwd`; return the
    CompletedProcess (text output)."""
    full_env = {**os.environ, "WANDB_MODE": "", "HYDRA_FULL_ERROR": "0", **(env or {})}
    full_env.pop("WANDB_API_KEY", None)
    return subprocess.run(
        [sys.executable, *(["-m", script] if script else [str(ROOT / "train.py")]), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def run_in_one_interpreter(lines: list[list[str]], cwd: Path) -> list[dict]:
    """Run command lines of train.py and the ddpm-* commands through their entry points, one
    after another in one interpreter (tests/run_commands.py): each one's exit status, output and
    seconds. Start-up (about 7 s, most of it importing Lightning) is paid once."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "run_commands.py"), json.dumps(lines)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "WANDB_MODE": "", "HYDRA_FULL_ERROR": "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def commands(title: str) -> list[str]:
    """The commands in a section's bash blocks, without their comments (`CK=...` is kept)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", section(title), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                found.append(re.sub(r"\s+", " ", line))
    return found
