"""A non-finite loss stops the run in one line (keeping the last good checkpoint) or, when asked,
skips the batch."""

from pathlib import Path

import pytest
import torch
from conftest import FAST

from ddpm.backbones import UNet
from ddpm.train import build, train


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


def test_nan_stops_in_one_line_and_keeps_the_last_good_checkpoint(
    compose_cfg, capsys, tmp_path: Path, nan_on_training_calls
) -> None:
    nan_on_training_calls(set(range(3, 100)))  # steps 0 and 1 are fine, step 2 is not
    with pytest.raises(SystemExit) as exit_info:
        train(compose_cfg([*FAST, "logger=none"]))
    assert exit_info.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Error:")]
    assert len(err) == 1
    assert "train/loss is nan at step 2 (t from " in err[0] and "of 50)" in err[0]
    last = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


def test_skip_policy_skips_and_counts(compose_cfg, nan_on_training_calls) -> None:
    nan_on_training_calls({3})
    run = build(compose_cfg([*FAST, "logger=none", "model.on_nan=skip"]))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.module.skipped_batches == 1
    assert run.trainer.global_step == 4  # the skipped batch took no optimizer step
    assert all(torch.isfinite(p).all() for p in run.module.parameters())


def test_bad_nan_policy(compose_cfg, capsys) -> None:
    with pytest.raises(SystemExit):
        train(compose_cfg([*FAST, "model.on_nan=ignore"]))
    assert (
        "model.on_nan='ignore' is unknown: allowed are 'stop' and 'skip'" in capsys.readouterr().err
    )


def test_a_failing_logger_is_reported_once_and_training_goes_on(compose_cfg, monkeypatch) -> None:
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    calls = []

    def full_disk(self, *args, **kwargs):
        calls.append(1)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ExperimentWriter, "log_metrics", full_disk)
    run = build(compose_cfg([*FAST, "logger=csv"]))
    with pytest.warns(
        UserWarning, match=r"logger CSVLogger failed in log_metrics .*No space left"
    ) as w:
        run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 4 and len(calls) > 1
    assert sum("logger CSVLogger failed" in str(m.message) for m in w) == 1
