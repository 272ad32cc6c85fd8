"""Installed without -e, as a user of a shared environment or a Docker image installs it: the
wheel built from this tree holds every module and every config, and in a fresh virtual
environment the commands run from an empty folder outside the repository, the README's own-config
example included; Hydra's compose API resolves the configs without importing the commands."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import CONF, ROOT, commands


def run(words: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(words, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (words, result.stderr[-3000:])
    return result


@pytest.mark.slow
def test_the_wheel_installs_configs_and_commands_that_run_anywhere(tmp_path: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "", "HYDRA_FULL_ERROR": "0"}
    env.pop("PYTHONPATH", None)
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), str(ROOT)]
    try:  # the setuptools of this environment when it has one, else pip fetches it
        import setuptools  # noqa: F401

        build.append("--no-build-isolation")
    except ImportError:
        pass
    run(build, tmp_path, env)
    wheel = next(wheels.glob("ddpm-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    package = ROOT / "src" / "ddpm"
    modules = {f"ddpm/{p.relative_to(package).as_posix()}" for p in package.rglob("*.py")}
    configs = {f"ddpm/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*.yaml")}
    assert modules - names == set() and configs - names == set()

    # A fresh environment with the wheel, its dependencies taken from this one's site-packages
    # (a path in a .pth file: this one's editable install is not seen there).
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
               tmp_path, env).stdout.strip()  # fmt: skip
    Path(site, "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
    run([*install, "--no-deps", "--no-index", str(wheel)], tmp_path, env)  # this pip, into it
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([str(python), "-c", "import ddpm; print(ddpm.__file__)"], elsewhere, env).stdout
    assert where.startswith(site), where  # the installed copy, not the repository's
    run(["ddpm-train", "experiment=smoke", "logger=none", "hydra.run.dir=run"], elsewhere, env)
    ckpt = elsewhere / "run" / "checkpoints" / "last.ckpt"
    run(["ddpm-sample", f"ckpt_path={ckpt}", "num_samples=4", "sampler=ddim", "sampler.steps=5",
         "hydra.run.dir=sampled"], elsewhere, env)  # fmt: skip
    assert (elsewhere / "sampled" / "samples.npz").is_file()

    # the compose API on the shipped configs: the resolvers come with `ddpm`
    compose = (
        "from hydra import compose, initialize_config_module\n"
        "with initialize_config_module(config_module='ddpm.conf', version_base='1.3'):\n"
        "    cfg = compose('train', overrides=['variance=learned_range', 'loss=hybrid'])\n"
        "print(cfg.backbone.out_channels)\n"
    )
    assert run([str(python), "-c", compose], elsewhere, env).stdout.split() == ["2"]

    # the README's own-config example, as typed (shortened), in a folder of its own
    mine = tmp_path / "mine"
    mine.mkdir()
    for line in commands("Your own configs"):
        if line.startswith("ddpm-train"):
            line += " experiment=smoke logger=none hydra.run.dir=wide"
        run(["bash", "-c", line], mine, env)
    stored = (mine / "wide" / ".hydra" / "config.yaml").read_text()
    assert "base_channels: 32" in stored and "ddpm.backbones.UNet" in stored
    assert (mine / "wide" / "checkpoints" / "last.ckpt").is_file()
