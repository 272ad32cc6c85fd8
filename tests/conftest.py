"""Shared helpers: compose the Hydra config in-process, or run train.py as a subprocess."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from ddpm.config import CONFIG_MODULE

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
README = (ROOT / "README.md").read_text()

# Few steps and a short chain (conf/experiment/smoke.yaml): every piece in seconds.
FAST = ["experiment=smoke"]
# Appended to (or replacing the value of) a README command's own keys: minutes become seconds.
SHORT = ["timesteps=50", "trainer.max_steps=12", "callbacks.samples.num_samples=4"]
# A 4-step toy run (trained with model.clip_denoised=false, as experiment=toy2d sets).
TOY_SHORT = [
    "experiment=toy2d",
    "timesteps=50",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "data.num_val=300",
    "data.num_test=300",
    "callbacks.samples.num_samples=4",
]


def compose_in(
    output_dir: Path, overrides: list[str], config_name: str = "train", keep_hydra: bool = False
) -> DictConfig:
    """The config as inside a Hydra run whose folder is `output_dir` (`keep_hydra=True` keeps the
    `hydra` node in it), composed from the shipped configs (ddpm.conf)."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    if not keep_hydra:
        with open_dict(cfg):
            del cfg.hydra
    return cfg


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`-n 2`, pyproject.toml) two test processes share the 2 cores: one
    thread each, also in the commands they start, since two processes of torch's spinning
    threads each would oversubscribe the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture
def compose_cfg(tmp_path: Path):
    """compose_cfg(overrides, config_name="train", keep_hydra=False) -> the config, as inside a
    Hydra run in tmp_path."""
    yield lambda *args, **kwargs: compose_in(tmp_path, *args, **kwargs)
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def digits_ckpt(tmp_path_factory) -> Path:
    """The one trained digits checkpoint every test that needs one shares: the README's first
    command, `python train.py`, as a subprocess, shortened by SHORT (T = 50, 12 steps)."""
    run_dir = tmp_path_factory.mktemp("digits") / "outputs" / "ck"
    result = run_train([*SHORT, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def toy_ckpt(tmp_path_factory) -> Path:
    """The one trained 2-D checkpoint (TOY_SHORT, trained in this process)."""
    from ddpm.cli.train import build

    out = tmp_path_factory.mktemp("toy")
    run = build(compose_in(out, ["logger=none", *TOY_SHORT]))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    GlobalHydra.instance().clear()
    return out / "checkpoints" / "last.ckpt"


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


def run_in_one_interpreter(
    lines: list[list[str]], cwd: Path, env: dict | None = None
) -> list[dict]:
    """Run command lines of train.py and the ddpm-* commands through their entry points, one
    after another in one interpreter (tests/run_commands.py): each one's exit status, output and
    seconds. Start-up (about 7 s, most of it importing Lightning) is paid once."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "run_commands.py"), json.dumps(lines)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "WANDB_MODE": "", "HYDRA_FULL_ERROR": "0", **(env or {})},
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


def with_overrides(command: str, extra: list[str]) -> list[str]:
    """The command's words with `extra` key=values: a key the command sets gets the new value,
    other keys are appended."""
    words = shlex.split(command)
    for override in extra:
        key = override.split("=", 1)[0]
        same = [i for i, w in enumerate(words) if w.split("=", 1)[0] == key]
        if same:
            words[same[0]] = override
        else:
            words.append(override)
    return words
