"""`python train.py` as a user runs it: a 2x2 multirun with wandb offline (its offline record
read back), errors from the command line. tests/test_readme.py runs the README's commands."""

from pathlib import Path

from conftest import FAST, run_train


def only(paths: list[Path]) -> Path:
    assert len(paths) == 1, paths
    return paths[0]


def test_multirun_2x2_with_wandb_offline(tmp_path: Path) -> None:
    args = ["-m", "schedule=linear,cosine", "variance=beta,tilde_beta", "logger=wandb"]
    result = run_train(
        [*args, *FAST, f"paths.log_dir={tmp_path}"],
        cwd=tmp_path,
        env={"WANDB_MODE": "", "NETRC": str(tmp_path / "no-netrc")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = only(list((tmp_path / "train" / "multirun").iterdir()))
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    choices = [("linear", "beta"), ("linear", "tilde_beta"), ("cosine", "beta")]
    choices.append(("cosine", "tilde_beta"))
    assert jobs == [
        f"{n}_experiment=smoke,logger=wandb,schedule={s},variance={v}"
        for n, (s, v) in enumerate(choices)
    ]
    for job in jobs:
        folder = sweep / job
        assert (folder / "checkpoints" / "last.ckpt").is_file()
        assert len(list((folder / "samples").glob("step_*.png"))) == 2
        offline_run = only(list((folder / "wandb").glob("offline-run-*")))
        images = offline_run / "files" / "media" / "images"
        assert len(list(images.glob("samples_*.png"))) == 2
        assert len(list(images.glob("schedule_*.png"))) == 1
        assert len(list(images.glob("trajectory_*.png"))) == 1
        # The offline record (what `wandb sync` uploads) holds the run's name, its sweep group,
        # the metrics and the resolved config; its strings are stored as plain bytes.
        record = only(list(offline_run.glob("run-*.wandb"))).read_bytes()
        schedule = job.split("schedule=")[1].split(",")[0]
        variance = job.split("variance=")[1]
        expected = [
            f"{schedule}-{variance}-unet",
            f"train-multirun-{sweep.name}",
            "train/loss",
            "val/loss",
            "lr-Adam",
            "train/loss_q0",
            "train/loss_q3",
            "train/grad_norm",
            "train/images_per_sec",
            "run_config",
            f"schedule={schedule}",
        ]
        for text in expected:
            assert text.encode() in record, text
    assert (
        result.stdout.count("wandb: logging offline to")
        + result.stderr.count("wandb: logging offline to")
        == 4
    )
    assert "wandb sync" in result.stdout + result.stderr


def test_an_unknown_group_option_gets_hydras_list(tmp_path: Path) -> None:
    """(A bad value of a key is one line: the README's Troubleshooting rows, in test_readme.)"""
    unknown = run_train(["schedule=nope", f"paths.log_dir={tmp_path}"], cwd=tmp_path)
    assert unknown.returncode != 0
    assert "Could not find 'schedule/nope'" in unknown.stderr
    assert "Available options in 'schedule'" in unknown.stderr


def test_long_override_lists_make_short_sweep_folder_names() -> None:
    from ddpm.cli.common import short_dirname

    assert short_dirname("schedule=cosine,variance=beta") == "schedule=cosine,variance=beta"
    assert short_dirname("data.root=/a/b") == "data.root=_a_b"
    long = ",".join(f"trainer.key{i}={i}" for i in range(40))
    short = short_dirname(long)
    assert len(short) == 200 and short.startswith(long[:150])
    assert short != short_dirname(long + ",x=1")
