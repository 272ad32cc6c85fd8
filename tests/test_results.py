"""A sweep ends in a results table, a rerun of the same sweep continues it, small images get a
sample score (FID/KID in a small classifier's features, with a floor), and the study presets
run and write their tables."""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, commands, run_in_one_interpreter
from omegaconf import OmegaConf
from scipy import linalg

import ddpm.metrics
from ddpm.classifier import classifier_for
from ddpm.data.digits import DigitsDataModule
from ddpm.metrics import fid_kid, held_out_images

HOOK = str(Path(__file__).parent / "sigkill_hook")
SECTION = "Sweeps, results tables and the paper's claims"
# The section's sweep command is run with these overrides, which shorten it (and put a job's
# checkpoints close together, so that one can be killed between them).
SHORT = [
    "experiment=smoke",
    "trainer.max_steps=10",
    "trainer.val_check_interval=5",
    "callbacks.periodic_checkpoint.every_n_train_steps=5",
    "eval.max_examples=8",
    "eval.fid.num_samples=40",
]


def job_folder(sweep: Path, number: int) -> Path:
    return next(p for p in sweep.iterdir() if p.name.startswith(f"{number}_"))


def last_logged(job: Path, key: str) -> float:
    rows = list(csv.DictReader((job / "csv" / "metrics.csv").open()))
    return float([r[key] for r in rows if r.get(key)][-1])


def test_the_section_lists_the_sweep_and_every_study() -> None:
    listed = commands(SECTION)
    assert listed[0].startswith("python train.py -m schedule=linear,cosine")
    assert listed[1:] == [f"python train.py -m experiment=study_{name}" for name in STUDIES]


@pytest.mark.slow
def test_a_sweep_ends_in_a_table_and_a_rerun_continues_it(tmp_path: Path) -> None:
    """The README's sweep (eval after fit, the sample score on), as a user runs it, shortened:
    killed (SIGKILL) while its second job trains, then run again with the same hydra.sweep.dir:
    the finished job is not trained again, the killed one resumes from its last.ckpt, the others
    run, and the table has one row per job with the job's choices and the values its own logs
    and evaluation hold."""
    sweep = tmp_path / "sweep"
    words = shlex.split(commands(SECTION)[0])[2:]
    words = [w for w in words if not w.startswith("hydra.sweep.dir=")]
    args = [*words, *SHORT, f"hydra.sweep.dir={sweep}", f"paths.data_dir={tmp_path / 'data'}"]
    env = {**os.environ, "WANDB_MODE": "", "HYDRA_FULL_ERROR": "0"}
    command = [sys.executable, str(ROOT / "train.py"), *args]
    # killed by tests/sigkill_hook right after job 1 writes its last.ckpt at step 5
    hook = {"PYTHONPATH": HOOK, "DDPM_TEST_SIGKILL_AFTER_STEP": "5", "DDPM_TEST_SIGKILL_RUN": "/1_"}
    first = subprocess.run(
        command, cwd=tmp_path, env={**env, **hook}, capture_output=True, text=True,
        start_new_session=True, timeout=600,
    )  # fmt: skip
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    killed = job_folder(sweep, 1) / "checkpoints" / "last.ckpt"
    assert torch.load(killed, weights_only=True)["global_step"] == 5
    finished = job_folder(sweep, 0)
    assert (finished / "results.json").is_file()
    assert not (job_folder(sweep, 1) / "results.json").exists()  # killed mid-run
    kept = (finished / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    so_far = list(csv.DictReader((sweep / "results.csv").open()))  # written after each job
    assert [r["status"] for r in so_far][:1] == ["finished"] and so_far[0]["run"] == finished.name

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (finished / "checkpoints" / "last.ckpt").stat().st_mtime_ns == kept
    output = second.stdout + second.stderr
    assert output.count("holds a finished run of this config: not trained again") == 1
    assert output.count("ckpt_path=auto: resuming from") == 1
    assert f"{job_folder(sweep, 1).name}/checkpoints/last.ckpt" in output

    rows = list(csv.DictReader((sweep / "results.csv").open()))
    chosen = [(r["schedule"], r["variance"]) for r in rows]
    assert chosen == [(s, v) for s in ("linear", "cosine") for v in ("beta", "tilde_beta")]
    for number, row in enumerate(rows):
        job = job_folder(sweep, number)
        assert row["status"] == "finished" and row["run"] == job.name and row["steps"] == "10"
        assert float(row["val/loss"]) == pytest.approx(last_logged(job, "val/loss"), rel=1e-3)
        assert float(row["val/fid"]) == pytest.approx(last_logged(job, "val/fid"), rel=1e-3)
        evaluation = json.loads((job / "eval" / "metrics.json").read_text())
        assert float(row["test/bpd"]) == pytest.approx(evaluation["bpd"], rel=1e-3)
        assert float(row["test/fid"]) == pytest.approx(evaluation["fid"]["fid"], rel=1e-3)
        assert evaluation["fid"]["features"] == "classifier"
        assert evaluation["fid"]["num_samples"] == evaluation["fid"]["num_floor"] == 40
        assert 0 < float(row["test/fid_floor"]) < float(row["test/fid"])
        assert float(row["wall_seconds"]) > 0
    table = (sweep / "results.md").read_text().splitlines()
    assert table[0].startswith("| schedule | variance | val/loss | val/fid |") and len(table) == 6
    assert table[2].startswith("| linear | beta |") and table[2].endswith("| finished | 0 |")
    assert (sweep / "results.png").stat().st_size > 10_000
    cached = list((tmp_path / "data").glob("classifier-digits-train*-seed0.pt"))
    assert len(cached) == 1  # trained once, read by every later job

    # a job's folder, pasted as it is into the commands that take a path
    job = job_folder(sweep, 3)
    assert "+schedule-cosine+" in job.name and not set("=,/ ") & set(job.name)
    overrides = list(OmegaConf.load(job / ".hydra" / "overrides.yaml"))
    lines = [
        ["ddpm-sample", f"ckpt_path={job}/checkpoints/last.ckpt", "num_samples=2",
         "sampler=ddim", "sampler.steps=5", f"hydra.run.dir={tmp_path / 'pasted'}"],
        ["train.py", *overrides, f"hydra.run.dir={job}", "ckpt_path=auto"],
    ]  # fmt: skip
    sampled, again = run_in_one_interpreter(lines, tmp_path)
    assert sampled["code"] == 0, sampled["stderr"][-3000:]
    assert (tmp_path / "pasted" / "samples.npz").is_file()
    assert again["code"] == 0, again["stderr"][-3000:]
    assert (
        "holds a finished run of this config: not trained again" in (job / "train.log").read_text()
    )


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[DigitsDataModule, torch.nn.Module]:
    data = DigitsDataModule()
    return data, classifier_for(data, tmp_path_factory.mktemp("cache"))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with scipy's matrix square root."""
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_fid_is_zero_for_a_set_and_itself_and_matches_scipy(digits) -> None:
    data, net = digits
    train, held_out = data.train_data, held_out_images(data, "train")
    assert len(held_out) == len(data.val_data) + len(data.test_data)
    same = fid_kid(train, train, held_out, net, 512)
    assert abs(same["fid"]) < 1e-6  # KID is checked against the unbiased MMD below
    blurred = torch.nn.functional.avg_pool2d(data.test_data, 3, 1, 1, count_include_pad=False)
    found = fid_kid(blurred, train, held_out, net, 512)
    with torch.no_grad():
        features = [net(x).double().numpy() for x in (train, blurred, held_out[: len(blurred)])]
    assert found["fid"] == pytest.approx(frechet_distance(features[1], features[0]), rel=1e-4)
    assert found["fid_floor"] == pytest.approx(frechet_distance(features[2], features[0]), rel=1e-4)
    # the bootstrap's distance is the same statistic (eigenvalues in place of scipy's sqrtm), and
    # its spread that of resampled sets: 180 digits against 1437 give a few percent of the FID
    ours = ddpm.metrics.frechet_distance(*(torch.from_numpy(f) for f in features[1::-1]))
    assert ours == pytest.approx(frechet_distance(features[1], features[0]), rel=1e-6)
    assert 0.01 * found["fid"] < found["fid_bootstrap_std"] < 0.5 * found["fid"], found


def test_kid_with_one_subset_of_everything_is_the_unbiased_mmd(digits) -> None:
    """With the subset size equal to both sets' sizes, every subset is all of them, so KID is the
    unbiased MMD^2 with the kernel (x.y / d + 1)^3."""
    data, net = digits
    real, fake = data.val_data, data.test_data
    found = fid_kid(fake, real, real, net, 512)  # 180 and 180 images: subset size 180
    with torch.no_grad():
        x, y = (net(v).double() for v in (real, fake))
    d, n = x.shape[1], len(x)

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.T / d + 1) ** 3

    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    within = (kxx.sum() - kxx.diag().sum() + kyy.sum() - kyy.diag().sum()) / (n * (n - 1))
    mmd = (within - 2 * kxy.mean()).item()
    assert found["kid_mean"] == pytest.approx(mmd, rel=1e-4, abs=1e-6)


def test_the_score_orders_real_blurred_and_noise(digits) -> None:
    data, net = digits
    train, held_out = data.train_data, held_out_images(data, "train")
    test = data.test_data
    blurred = torch.nn.functional.avg_pool2d(test, 3, 1, 1, count_include_pad=False)
    noise = torch.rand(test.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scores = [fid_kid(x, train, held_out, net, 512) for x in (test, blurred, noise)]
    fids = [s["fid"] for s in scores]
    kids = [s["kid_mean"] for s in scores]
    assert fids[0] < fids[1] < fids[2] and kids[0] < kids[1] < kids[2]
    assert fids[0] < 2 * scores[0]["fid_floor"]  # real test digits sit at the floor


def test_the_classifier_is_cached_by_data_and_seed(digits, tmp_path: Path, monkeypatch) -> None:
    """One file per training split and seed, read back as it was saved (trained for a few
    steps here: what is tested is the cache)."""
    import ddpm.classifier

    fast = ddpm.classifier.train_classifier
    monkeypatch.setattr(
        ddpm.classifier, "train_classifier", lambda *a, **k: fast(*a, **k, steps=10)
    )
    data, _ = digits
    first = classifier_for(data, tmp_path, seed=0)
    files = list(tmp_path.glob("classifier-digits-train*-seed0.pt"))
    assert len(files) == 1
    again = classifier_for(data, tmp_path, seed=0)
    x = data.test_data[:16]
    assert torch.equal(first(x), again(x))
    classifier_for(data, tmp_path, seed=1)
    assert len(list(tmp_path.glob("classifier-digits-*.pt"))) == 2
    other_split = DigitsDataModule(split_seed=1)
    classifier_for(other_split, tmp_path, seed=0)
    assert len(list(tmp_path.glob("classifier-digits-*-seed0.pt"))) == 2


# Each study preset: (overrides that shorten it, the swept key and its values, a column the
# table must fill for every job).
# Each study preset, one job of its sweep (the table's machinery runs in the test above; each
# preset's own keys and variants are what this runs): (overrides that shorten it, the swept key
# and its values, a column the table must fill for every job).
STUDIES = {
    "variance": (
        ["timesteps=50", "hydra.sweeper.params.variance=tilde_beta"],
        "variance",
        ["tilde_beta"],
        "test/beta/fid",
    ),
    "objective": (
        ["timesteps=50", "hydra.sweeper.params.objective=mean_vlb_learned"],
        "objective",
        ["mean_vlb_learned"],
        "test/bpd",
    ),
    "schedule": (
        ["hydra.sweeper.params.timesteps=25", "hydra.sweeper.params.schedule=cosine"],
        "schedule",
        ["cosine"],
        "test/fid",
    ),
    "steps": (["hydra.sweeper.params.timesteps=2"], "timesteps", ["2"], "test/energy_distance"),
    "sampling": (
        ["timesteps=100", "hydra.sweeper.params.objective=learned_range_hybrid"],
        "objective",
        ["learned_range_hybrid"],
        "test/ddim10/fid",
    ),
    "guidance": (
        ["timesteps=50", "hydra.sweeper.params.conditioning=class"],
        "conditioning",
        ["class"],
        "test/s5/class_accuracy",
    ),
}


@pytest.mark.slow
def test_every_study_preset_runs_and_writes_its_table(tmp_path: Path) -> None:
    """`python train.py -m experiment=study_<name>` for each study, shortened by overrides (a
    few steps, few samples, and a short chain where T is not what the study varies): the sweep
    composes, every job finishes, and the table has a row per job with the study's columns."""
    short = [
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "callbacks.samples.num_samples=2",
        "eval.max_examples=2",
        "eval.fid.num_samples=8",
        f"paths.log_dir={tmp_path}",
        f"paths.data_dir={tmp_path / 'data'}",
    ]
    lines = {
        name: ["train.py", "-m", f"experiment=study_{name}", *extra, *short]
        for name, (extra, *_) in STUDIES.items()
    }
    # The tuning sweep as it runs, with its timer stopping training (no max_steps), one lr;
    # then its second stage, a sweep over other keys into the same folder and table.
    tune = ["callbacks.timer.duration=00:00:00:01", "timesteps=50", *short[2:]]
    lines["tune_digits"] = [
        "train.py", "-m", "experiment=tune_digits", "model.optimizer.lr=1e-3", *tune
    ]  # fmt: skip
    lines["tune_digits stage 2"] = [
        "train.py", "-m", "experiment=tune_digits", "model.optimizer.lr=1e-3",
        "backbone.base_channels=16", "loss.weighting=min_snr", "schedule=cosine", *tune,
    ]  # fmt: skip
    outcomes = run_in_one_interpreter(list(lines.values()), tmp_path)
    results = dict(zip(lines, outcomes, strict=True))
    print({name: result["seconds"] for name, result in results.items()})
    for name, result in results.items():
        assert result["code"] == 0, (name, result["stderr"][-3000:])
    for name, (_, key, values, column) in STUDIES.items():
        rows = list(csv.DictReader((tmp_path / "studies" / name / "results.csv").open()))
        assert [row[key] for row in rows] == values, name
        assert all(row["status"] == "finished" and row[column] for row in rows), (name, rows)
        assert (tmp_path / "studies" / name / "results.png").is_file()
    tuned = list(csv.DictReader((tmp_path / "studies" / "tune_digits" / "results.csv").open()))
    # The first stage's jobs did not override the second's keys: they show what they ran with
    # (the schedule group's choice, and loss.weighting from the config).
    keys = ("backbone.base_channels", "schedule", "loss.weighting")
    assert sorted(tuple(row[k] for k in keys) for row in tuned) == [
        ("16", "cosine", "min_snr"), ("16", "linear", "none"), ("32", "linear", "none")
    ], tuned  # fmt: skip
    assert all(row["status"] == "finished" and row["test/fid"] for row in tuned), tuned
    assert all(int(row["steps"]) > 0 for row in tuned), tuned  # the timer, not max_steps
    for row in tuned:  # each job ran without a step limit, so its timer is what stopped it
        job = tmp_path / "studies" / "tune_digits" / row["run"]
        config = OmegaConf.load(job / ".hydra" / "config.yaml")
        assert config.trainer.max_steps == -1 and config.trainer.max_epochs == -1, row["run"]
