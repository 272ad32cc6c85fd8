"""Exact resume, the way a user meets it: `python train.py ... ckpt_path=auto` with the default
config and callbacks (sanity check, sample grids, progress bar, every validation batch, batch
128, so an epoch is 11 steps), shortened only by overrides. A run is killed with SIGKILL right
after a chosen checkpoint (tests/sigkill_hook: the process kills itself there, so the point is
chosen, not raced) and rerun; its per-step losses and final weights must be those of the
uninterrupted run, to the bit (CPU). Each kind of checkpoint is covered: the periodic one (at an
epoch's last batch), the end-of-training one of a finished run continued with a larger
`trainer.max_steps`, one written by validation (mid-epoch); and DDP on two CPU processes, where
train/loss is the mean over both ranks (so each rank's random state and share of the data must
come back; with conditioning=class, whose label dropout draws from it too). The same for
data=streaming (a set written by `ddpm-prepare source=digits`), whose loader's position (litdata's
StreamingDataLoader state) is in the checkpoint, on one process and on two.

Validation, sampling and checkpointing draw nothing from the training's random state, so one
uninterrupted run serves as the reference for every schedule of validations and checkpoints.
"""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, commands, with_overrides

STEPS = 40
COMMON = ["timesteps=50", f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=1", "seed=3"]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
ENV = {**os.environ, "HYDRA_FULL_ERROR": "1"}
HOOK = str(Path(__file__).parent / "sigkill_hook")


def train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "train.py"), *COMMON, f"hydra.run.dir={run_dir}", *extra]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(run_dir: Path) -> dict[int, str]:
    """train/loss per step as written (the last row wins where a step was logged twice)."""
    rows = csv.DictReader((run_dir / "csv" / "metrics.csv").open())
    return {int(r["step"]): r["train/loss"] for r in rows if r.get("train/loss")}


def killed_after_checkpoint(run_dir: Path, step: int, *extra: str) -> int:
    """Run `python train.py ... ckpt_path=auto`, SIGKILLed (with its DDP workers) by the hook right
    after it writes last.ckpt at `step`; the step of the checkpoint it left."""
    command = [sys.executable, str(ROOT / "train.py"), *COMMON, f"hydra.run.dir={run_dir}"]
    env = {**ENV, "PYTHONPATH": HOOK, "DDPM_TEST_SIGKILL_AFTER_STEP": str(step)}
    result = subprocess.run(  # its own process group: the kill reaches nothing else
        [*command, "ckpt_path=auto", *extra], env=env, capture_output=True, text=True,
        timeout=300, start_new_session=True,
    )  # fmt: skip
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


def assert_same_as(
    reference: Path, resumed: Path, from_step: int, logged=None, steps: int = STEPS
) -> None:
    """The resumed run's losses from `from_step` on (`logged`: as collected over its processes,
    since each rerun starts a new metrics.csv) and its final weights are the reference's."""
    expected, got = losses(reference), {**(logged or {}), **losses(resumed)}
    after = [s for s in sorted(expected) if s >= from_step]
    assert len(after) >= steps - from_step - 1
    print("step  uninterrupted  resumed")
    for step in after:
        print(f"{step:4d}  {expected[step]}  {got.get(step)}")
    assert [got.get(s) for s in after] == [expected[s] for s in after]
    # The EMA weights (state_dict) and the raw ones come back too, to the bit.
    final = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    uninterrupted = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == uninterrupted["global_step"] == steps
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


@pytest.mark.slow
def test_killed_and_continued_runs_reproduce_the_uninterrupted_one(tmp_path, uninterrupted):
    """One run folder through every kind of checkpoint: killed after the periodic last.ckpt at
    step 11 (an epoch's last batch), resumed to a finished run of 20 steps (validation at 15),
    continued with trainer.max_steps=40, killed after validation's checkpoint at step 30
    (mid-epoch), and resumed to the end."""
    run_dir = tmp_path / "run"
    keys = ["callbacks.periodic_checkpoint.every_n_train_steps=11", "trainer.val_check_interval=15"]
    assert killed_after_checkpoint(run_dir, 11, *keys, "trainer.max_steps=20") == 11
    resumed = train(run_dir, "ckpt_path=auto", *keys, "trainer.max_steps=20")
    assert "ckpt_path=auto: resuming from" in resumed.stdout + resumed.stderr
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 20  # the finished run's end-of-training checkpoint
    logged = losses(run_dir)
    assert killed_after_checkpoint(run_dir, 30, *keys) == 30  # continued past 20, killed at 30
    logged.update(losses(run_dir))
    train(run_dir, "ckpt_path=auto", *keys)
    assert_same_as(uninterrupted, run_dir, 11, logged)
    # metrics.csv kept the rows of every process (the last row of a step is the latest run's)
    assert losses(run_dir) == {**logged, **losses(run_dir)} and min(losses(run_dir)) == 0


PREPARE, STREAM = commands("Data")  # the README's `ddpm-prepare ...` and `python train.py ...`


@pytest.fixture(scope="module")
def prepared_digits(tmp_path_factory) -> Path:
    """The README's `ddpm-prepare source=digits out=prepared/digits`, into a temporary folder."""
    out = tmp_path_factory.mktemp("prepared") / "digits"
    command = with_overrides(PREPARE, [f"out={out}"])
    assert command[:2] == ["ddpm-prepare", "source=digits"], command
    command[0] = str(Path(sys.executable).parent / "ddpm-prepare")
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def streaming(prepared: Path) -> list[str]:
    """The README's `python train.py data=streaming data.input_dir=...` keys, on `prepared`."""
    words = with_overrides(STREAM, [f"data.input_dir={prepared}"])
    assert words[:3] == ["python", "train.py", "data=streaming"], words
    return words[2:]


@pytest.mark.slow
def test_streaming_sigkill_then_auto_resume_reproduces_the_run(tmp_path, prepared_digits):
    """`python train.py data=streaming data.input_dir=... data.hflip=true` for 25 steps (an epoch
    is 11): killed after the periodic checkpoint at step 11 (the epoch's last batch), resumed,
    killed after validation's checkpoint at step 16 (mid-epoch, the second epoch), resumed to
    the end (across the next epoch's start)."""
    stream = [*streaming(prepared_digits), "data.hflip=true", "trainer.max_steps=25"]
    reference = tmp_path / "uninterrupted"
    train(reference, *stream)
    run_dir = tmp_path / "run"
    keys = [*stream, "trainer.val_check_interval=8"]
    keys += ["callbacks.periodic_checkpoint.every_n_train_steps=11"]
    assert killed_after_checkpoint(run_dir, 11, *keys) == 11
    logged = losses(run_dir)
    assert killed_after_checkpoint(run_dir, 16, *keys) == 16
    logged.update(losses(run_dir))
    train(run_dir, "ckpt_path=auto", *keys)
    assert_same_as(reference, run_dir, 11, logged, steps=25)


@pytest.mark.slow
@pytest.mark.parametrize("streamed", [False, True], ids=["in_memory", "streaming"])
def test_ddp_sigkill_then_auto_resume_reproduces_the_run(tmp_path, request, streamed) -> None:
    """The reference is the README's `python train.py trainer=ddp trainer.accelerator=cpu
    trainer.devices=2`, shortened, with conditioning=class: each rank's label dropout draws from
    its own random state, which must come back with the rest. Streamed: the README's
    data=streaming command on top, flips on; each process streams its share."""
    ddp = [*DDP, "trainer.max_steps=20", "conditioning=class"]  # 2 processes on 2 cores
    if streamed:
        ddp += [*streaming(request.getfixturevalue("prepared_digits")), "data.hflip=true"]
    reference = tmp_path / "uninterrupted"
    result = train(reference, *ddp)
    assert "MEMBER: 2/2" in result.stdout + result.stderr
    killed = tmp_path / "killed"
    overrides = [*ddp, "callbacks.periodic_checkpoint.every_n_train_steps=8"]
    assert killed_after_checkpoint(killed, 8, *overrides) == 8
    train(killed, "ckpt_path=auto", *overrides)
    assert_same_as(reference, killed, 8, steps=20)


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
