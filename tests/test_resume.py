"""Exact resume, the way a user meets it: `python train.py ... ckpt_path=auto` with the default
config and callbacks (sanity check, sample grids, progress bar, every validation batch, batch
128, so an epoch is 11 steps), shortened only by overrides. A run is killed with SIGKILL after a
checkpoint and rerun; its per-step losses and final weights must be those of the uninterrupted
run, to the bit (CPU). Each kind of checkpoint is covered: the periodic one (at an epoch's last
batch), one written by validation (mid-epoch), and the end-of-training one of a finished run
continued with a larger `trainer.max_steps`; and DDP on two CPU processes, where train/loss is
the mean over both ranks (so each rank's random state and share of the data must come back).

Validation, sampling and checkpointing draw nothing from the training's random state, so one
uninterrupted run serves as the reference for every schedule of validations and checkpoints.
"""

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

STEPS = 40
COMMON = ["timesteps=50", f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=1", "seed=3"]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
ENV = {**os.environ, "HYDRA_FULL_ERROR": "1"}


def train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "train.py"), *COMMON, f"hydra.run.dir={run_dir}", *extra]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(run_dir: Path) -> dict[int, str]:
    """train/loss per step as written (the last row wins where a step was logged twice)."""
    rows = csv.DictReader((run_dir / "csv" / "metrics.csv").open())
    return {int(r["step"]): r["train/loss"] for r in rows if r.get("train/loss")}


def kill_after_checkpoint(run_dir: Path, at_least: int, *extra: str) -> int:
    """Start the run, SIGKILL it (and its DDP workers) once last.ckpt has reached step
    `at_least`, and return the step of the checkpoint it left."""
    last = run_dir / "checkpoints" / "last.ckpt"
    command = [sys.executable, str(ROOT / "train.py"), *COMMON, f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(  # its own process group: SIGKILL reaches the DDP workers too
        [*command, "ckpt_path=auto", *extra],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if last.is_file() and torch.load(last, weights_only=True)["global_step"] >= at_least:
                break
        except (RuntimeError, EOFError, KeyError):  # caught while the file was being moved in
            pass
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return torch.load(last, weights_only=True)["global_step"]


def assert_same_as(reference: Path, resumed: Path, from_step: int) -> None:
    expected, got = losses(reference), losses(resumed)
    after = [s for s in sorted(expected) if s >= from_step]
    assert len(after) >= STEPS - from_step - 1
    print("step  uninterrupted  resumed")
    for step in after:
        print(f"{step:4d}  {expected[step]}  {got.get(step)}")
    assert [got.get(s) for s in after] == [expected[s] for s in after]
    # The EMA weights (state_dict) and the raw ones come back too, to the bit.
    final = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    uninterrupted = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == uninterrupted["global_step"] == STEPS
    for key in ("state_dict", "current_model_state"):
        assert final[key].keys() == uninterrupted[key].keys()
        for name, value in final[key].items():
            assert torch.equal(value, uninterrupted[key][name]), (key, name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The default config for 40 steps: validated (and checkpointed) only at its end."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(run_dir)
    return run_dir


@pytest.mark.parametrize(
    ("kind", "overrides", "kill_at", "expected"),
    [
        # last.ckpt every 11 steps: step 22 is an epoch's last batch (1437 images, batch 128)
        ("periodic", ["callbacks.periodic_checkpoint.every_n_train_steps=11"], 22, {22, 33}),
        # validation at steps 15 and 30, in the middle of epochs 1 and 2
        ("validation", ["trainer.val_check_interval=15"], 15, {15, 30}),
    ],
)
def test_sigkill_then_auto_resume_reproduces_the_run(
    tmp_path: Path, uninterrupted: Path, kind, overrides, kill_at, expected
) -> None:
    killed = tmp_path / kind
    resumed_from = kill_after_checkpoint(killed, kill_at, *overrides)
    assert resumed_from in expected, resumed_from
    result = train(killed, "ckpt_path=auto", *overrides)
    assert "ckpt_path=auto: resuming from" in result.stdout + result.stderr
    assert_same_as(uninterrupted, killed, resumed_from)


def test_a_finished_run_continued_equals_the_longer_run(tmp_path: Path, uninterrupted) -> None:
    run_dir = tmp_path / "continued"
    train(run_dir, "trainer.max_steps=20")  # ends with its own validation and checkpoint
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 20
    train(run_dir, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    assert_same_as(uninterrupted, run_dir, 20)


def test_ddp_sigkill_then_auto_resume_reproduces_the_run(tmp_path: Path) -> None:
    reference = tmp_path / "uninterrupted"
    train(reference, *DDP)
    killed = tmp_path / "killed"
    overrides = [*DDP, "callbacks.periodic_checkpoint.every_n_train_steps=15"]
    resumed_from = kill_after_checkpoint(killed, 15, *overrides)
    assert resumed_from in {15, 30}
    train(killed, "ckpt_path=auto", *overrides)
    assert_same_as(reference, killed, resumed_from)


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
