"""Scaling out: the SLURM launcher's settings reach the trainer and a job runs through its local
twin; matmul precision, torch.compile's refusal of a bad value, the optimised metric. (The README's
commands run bf16 with torch.compile, DDP on 2 CPU processes and an Optuna search; its
Troubleshooting rows refuse DDP inside a local sweep.)"""

from pathlib import Path

import pytest
import torch
from conftest import FAST, run_train

from ddpm.cli.train import build, train


def test_slurm_launcher_gives_one_task_per_gpu_and_sets_the_trainer(compose_cfg) -> None:
    cfg = compose_cfg(
        ["trainer=ddp", "hydra/launcher=slurm", "hydra.launcher.nodes=4"], keep_hydra=True
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (4, 8, 8)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.strategy) == (4, 8, "ddp")
    local = compose_cfg(["trainer=ddp"])
    assert (local.trainer.num_nodes, local.trainer.devices) == (1, -1)


@pytest.mark.slow
def test_a_job_runs_through_the_submitit_launcher(tmp_path: Path) -> None:
    """hydra/launcher=slurm is hydra-submitit-launcher's SLURM launcher; its local twin runs the
    same pickled job in a subprocess here, where no SLURM cluster is."""
    args = ["-m", *FAST, "hydra/launcher=submitit_local", "logger=none"]
    result = run_train([*args, f"paths.log_dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    job = only_one(list((tmp_path / "train" / "multirun").glob("*/0_*")))
    assert torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert list(job.parent.glob(".submitit/*/*_log.out"))


def only_one(items: list) -> object:
    assert len(items) == 1, items
    return items[0]


def test_matmul_precision_is_set_for_the_run(compose_cfg) -> None:
    before = torch.get_float32_matmul_precision()
    try:
        for value in ("highest", "high"):
            build(compose_cfg([*FAST, f"matmul_precision={value}", "logger=none"]))
            assert torch.get_float32_matmul_precision() == value
    finally:
        torch.set_float32_matmul_precision(before)


def test_compile_refuses_a_bad_value(compose_cfg, capsys) -> None:
    with pytest.raises(SystemExit):
        train(compose_cfg([*FAST, "compile=fast"]))
    assert "compile='fast' is invalid: allowed are true, false or a dict" in capsys.readouterr().err


def test_an_optimized_metric_the_run_never_logged_is_one_sentence(compose_cfg, capsys) -> None:
    """Only a sweeper that optimises needs the metric; there its absence is one sentence."""
    from ddpm.cli.train import optimized_value

    plain = compose_cfg([*FAST, "optimized_metric=val/fid"])
    assert optimized_value(plain, {"val/fid": 3.0, "val/loss": 1.0}) == 3.0
    assert optimized_value(plain, {"val/loss": 1.0}) is None  # a plain run ends normally
    optuna = ["hparams_search=optuna", "hydra.mode=MULTIRUN", "optimized_metric=val/fid"]
    cfg = compose_cfg([*FAST, *optuna], keep_hydra=True)
    with pytest.raises(SystemExit):
        optimized_value(cfg, {"val/loss": 1.0, "train/loss": 2.0})
    err = capsys.readouterr().err.strip()
    assert err == (
        "Error: optimized_metric='val/fid' was not logged by this run: allowed are "
        "train/loss, val/loss."
    )
