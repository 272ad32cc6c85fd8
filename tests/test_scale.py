"""Scaling out: the SLURM launcher's settings reach the trainer, DDP inside a local sweep is
refused, Optuna sweeps run and resume from their storage, bf16 autocast and torch.compile."""

import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FAST, run_train
from hydra.utils import instantiate

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


def test_ddp_inside_a_local_multirun_is_refused(tmp_path: Path) -> None:
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    result = run_train(["-m", *FAST, *ddp, f"paths.log_dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("Error: trainer=ddp with 2 processes cannot run inside a local")
    assert "hydra/launcher=slurm" in message and "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


def test_optuna_sweep_returns_the_metric_and_resumes_from_its_storage(tmp_path: Path) -> None:
    args = ["hparams_search=optuna", *FAST, "hydra.sweeper.n_trials=2", "logger=none"]
    args += [f"paths.log_dir={tmp_path}", "callbacks.samples=null"]
    for _ in range(2):  # the second command continues the study
        result = run_train(args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    import optuna

    study = optuna.load_study(study_name="ddpm", storage=f"sqlite:///{tmp_path}/optuna.db")
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 4
    assert {"model.optimizer.lr", "schedule", "variance"} == set(trials[0].params)
    assert all(1e-5 <= t.params["model.optimizer.lr"] <= 1e-3 for t in trials)
    assert all(math.isfinite(t.value) and 0 < t.value < 2 for t in trials)
    results = sorted(tmp_path.glob("train/multirun/*/optimization_results.yaml"))
    assert len(results) == 2
    best = yaml.safe_load(results[-1].read_text())
    assert best["best_value"] == pytest.approx(min(t.value for t in trials))


def test_bf16_mixed_precision_trains_on_the_cpu(compose_cfg) -> None:
    cfg = compose_cfg([*FAST, "trainer.precision=bf16-mixed", "logger=none"])
    run = build(cfg)
    seen = []
    run.module.backbone.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert torch.bfloat16 in seen  # the backbone ran under autocast
    assert math.isfinite(float(run.trainer.callback_metrics["train/loss"]))


def test_compile_keeps_checkpoints_the_same(compose_cfg, tmp_path: Path) -> None:
    """compile=... goes through torch.compile (Dynamo; the eager backend keeps the test short:
    Inductor's code generation takes minutes on 2 CPU cores) and leaves parameter names as
    they are, so compiled and plain runs share checkpoints."""
    cfg = compose_cfg([*FAST, "compile={backend: eager}", "logger=none"])
    run = build(cfg)
    assert run.module.backbone._compiled_call_impl is not None
    plain = instantiate(cfg.backbone)
    assert list(run.module.backbone.state_dict()) == list(plain.state_dict())
    metrics = train(cfg)
    assert math.isfinite(metrics["val/loss"])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    plain.load_state_dict(
        {
            k.removeprefix("backbone."): v
            for k, v in ckpt["state_dict"].items()
            if k.startswith("backbone.")
        }
    )


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
