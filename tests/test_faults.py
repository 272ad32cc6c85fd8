"""A non-finite loss stops the run in one line (keeping the last good checkpoint) or, when asked,
skips the batch."""

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import FAST

from ddpm.backbones import UNet
from ddpm.cli.train import build, train
from ddpm.module import is_logged_step


@pytest.fixture
def nan_on_training_calls(monkeypatch):
    """nan_on_training_calls(calls): UNet returns NaN on those (1-based) training-mode calls."""
    original = UNet.forward

    def install(calls: set[int] | None) -> None:
        count = {"n": 0}

        def forward(self: UNet, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = original(self, x, t)
            if self.training:
                count["n"] += 1
                if calls is None or count["n"] in calls:
                    return out * float("nan")
            return out

        monkeypatch.setattr(UNet, "forward", forward)

    return install


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.log_every_n_steps=1"],  # caught at the next logged step
        ["trainer.log_every_n_steps=50"],  # caught when validation starts
        [
            "trainer.log_every_n_steps=50",
            "trainer.limit_val_batches=0",
        ],  # at a checkpoint or the end
    ],
)
def test_nan_stops_in_one_line_and_keeps_the_last_good_checkpoint(
    compose_cfg, capsys, tmp_path: Path, nan_on_training_calls, overrides: list[str]
) -> None:
    nan_on_training_calls(set(range(3, 100)))  # steps 0 and 1 are fine, step 2 is not
    with pytest.raises(SystemExit) as exit_info:
        train(compose_cfg([*FAST, "logger=none", *overrides]))
    assert exit_info.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Error:")]
    assert len(err) == 1, err
    assert "train/loss was nan at step 2 (t from " in err[0] and "of 50); stopped at" in err[0]
    last = tmp_path / "checkpoints" / "last.ckpt"
    if "trainer.limit_val_batches=0" in overrides and not last.exists():
        return  # no validation, so no checkpoint was due before the end
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


def test_skip_policy_skips_and_counts(compose_cfg, nan_on_training_calls) -> None:
    nan_on_training_calls({3})
    run = build(compose_cfg([*FAST, "logger=none", "callbacks.nan_guard.on_nan=skip"]))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    from ddpm.callbacks import NanGuard

    guard = next(c for c in run.trainer.callbacks if isinstance(c, NanGuard))
    assert guard.skipped == 1
    assert run.trainer.global_step == 4  # the skipped batch took no optimizer step
    assert all(torch.isfinite(p).all() for p in run.module.parameters())


def test_bad_nan_policy(compose_cfg, capsys) -> None:
    with pytest.raises(SystemExit):
        train(compose_cfg([*FAST, "callbacks.nan_guard.on_nan=ignore"]))
    message = "callbacks.nan_guard.on_nan='ignore' is unknown: allowed are 'stop' and 'skip'"
    assert message in capsys.readouterr().err


def test_a_failing_logger_is_reported_once_and_training_goes_on(compose_cfg, monkeypatch) -> None:
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    calls = []

    def full_disk(self, *args, **kwargs):
        calls.append(1)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ExperimentWriter, "log_metrics", full_disk)
    run = build(compose_cfg([*FAST, "logger=csv"]))
    with pytest.warns(
        UserWarning, match=r"logger ResumableCSVLogger failed in log_metrics .*No space left"
    ) as w:
        run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 4 and len(calls) > 1
    assert sum("logger ResumableCSVLogger failed" in str(m.message) for m in w) == 1


@pytest.mark.parametrize(
    "choice",
    [[], ["variance=learned_range", "loss=vlb", "loss.timesteps=importance", "prediction=v"]],
    ids=["default", "importance"],
)
def test_training_steps_read_nothing_back_from_the_device(
    compose_cfg, monkeypatch, choice: list[str]
) -> None:
    """Between logged steps, neither the step nor the callbacks around it call what would make a
    GPU wait for the host (`.item()`, `bool()`, `.tolist()`, ...): the NaN guard keeps its
    record on the device, importance sampling its history. Adam's step counters are host
    tensors by design and are exempt."""
    run = build(
        compose_cfg(
            [*FAST, "logger=none", "trainer.max_steps=6", "trainer.log_every_n_steps=50"]
            + ["trainer.limit_val_batches=0", *choice]
        )
    )
    reads: list[str] = []
    inside_steps = {"now": False}

    def recording(name: str):
        original = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if inside_steps["now"] and not caller.endswith(
                os.path.join("torch", "optim", "optimizer.py")
            ):
                reads.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)

        return read

    for name in ("item", "__bool__", "tolist", "__float__", "__int__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, recording(name))

    windows = 0

    class Window(pl.Callback):
        def __init__(self, now: bool) -> None:
            self.now = now

        def on_train_batch_start(self, trainer, *args) -> None:
            # the last step is a logged one (the run ends with a validation): reads allowed there
            logged = is_logged_step(trainer, trainer.global_step)
            inside_steps["now"] = (self.now and not logged) or inside_steps["now"]
            nonlocal windows
            windows += self.now and not logged

        def on_train_batch_end(self, *args) -> None:
            inside_steps["now"] = self.now and inside_steps["now"]

    # the first callback opens the window at each batch's start, the last closes it at its end
    run.trainer.callbacks.insert(0, Window(True))
    run.trainer.callbacks.append(Window(False))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 6
    assert reads == []
    assert windows == 5  # steps 0..4 were watched
