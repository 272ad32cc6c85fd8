"""Kill a training run with SIGKILL after a checkpoint, rerun it with ckpt_path=auto, and get the
per-step losses of the uninterrupted run, to the bit (CPU): in one process, and with DDP on two
CPU processes, where train/loss is the mean over both ranks (so each rank's random state and
share of the data must come back)."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

COMMON = [
    "timesteps=50",
    "trainer.max_steps=30",
    "trainer.val_check_interval=5",
    "trainer.log_every_n_steps=1",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "+trainer.enable_progress_bar=false",
    "callbacks.samples=null",
    "callbacks.progress_bar=null",
    "data.batch_size=64",
]


def command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *COMMON, f"hydra.run.dir={run_dir}", *extra]


def losses(run_dir: Path) -> dict[int, str]:
    """train/loss per step as written (the last row wins where a step was logged twice)."""
    rows = csv.DictReader((run_dir / "csv" / "metrics.csv").open())
    return {int(r["step"]): r["train/loss"] for r in rows if r.get("train/loss")}


DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


@pytest.mark.parametrize("processes", [[], DDP], ids=["one-process", "ddp-2-cpu"])
def test_sigkill_then_auto_resume_reproduces_the_losses(tmp_path: Path, processes) -> None:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    full = tmp_path / "full"
    subprocess.run(command(full, *processes), check=True, capture_output=True, env=env, timeout=300)

    killed = tmp_path / "killed"
    last = killed / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(  # its own process group: SIGKILL reaches the DDP workers too
        command(killed, "ckpt_path=auto", *processes),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if last.is_file() and torch.load(last, weights_only=True)["global_step"] >= 10:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resumed_from = torch.load(last, weights_only=True)["global_step"]
    assert 10 <= resumed_from < 30

    result = subprocess.run(
        command(killed, "ckpt_path=auto", *processes),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ckpt_path=auto: resuming from" in result.stdout + result.stderr
    expected, got = losses(full), losses(killed)
    after = [s for s in sorted(expected) if s >= resumed_from]
    assert after and len(after) >= 30 - resumed_from - 1
    print("step  uninterrupted  killed+resumed")
    for step in after:
        print(f"{step:4d}  {expected[step]}  {got.get(step)}")
    assert [got.get(s) for s in after] == [expected[s] for s in after]
    final = torch.load(last, weights_only=True)
    assert final["global_step"] == 30
    # The EMA weights (state_dict) and the raw ones come back too, to the bit.
    uninterrupted = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    for key in ("state_dict", "current_model_state"):
        assert final[key].keys() == uninterrupted[key].keys()
        for name, value in final[key].items():
            assert torch.equal(value, uninterrupted[key][name]), (key, name)


def test_each_rank_draws_its_own_t_and_noise(compose_cfg) -> None:
    """DDP ranks start from one seed (equal weights) and then draw different t and noise."""
    from types import SimpleNamespace

    from ddpm.cli.train import build

    module = build(compose_cfg(["experiment=smoke"])).module
    draws = []
    for rank in (0, 1):
        torch.manual_seed(42)
        module._trainer = SimpleNamespace(world_size=2, global_rank=rank, datamodule=None)
        module.on_fit_start()
        draws.append(module.diffusion.sample_timesteps(64, torch.device("cpu")))
    assert not torch.equal(draws[0], draws[1])
