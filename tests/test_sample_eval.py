"""Sampling and evaluation of a short-trained checkpoint: the CLIs, checkpoint loading and its
errors, and the 2-D distances against closed forms."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import commands, run_in_one_interpreter, run_train, with_overrides

from ddpm.checkpoint import load_trained, load_trained_for
from ddpm.cli.evaluate import evaluate
from ddpm.cli.sample import sample
from ddpm.metrics import energy_distance, sliced_wasserstein


def test_sample_cli_writes_grid_npz_and_trajectory(digits_ckpt: Path, tmp_path: Path) -> None:
    args = [
        f"ckpt_path={digits_ckpt}",
        "sampler=ddim",
        "sampler.steps=10",
        "trajectory=true",
        "variance=tilde_beta",
        "num_samples=6",
        "batch_size=4",
        f"paths.log_dir={tmp_path}",
    ]
    result = run_train(args, cwd=tmp_path, script="ddpm.cli.sample")
    assert result.returncode == 0, result.stderr[-3000:]
    out = next((tmp_path / "sample" / "ddim").iterdir())
    assert (out / "samples.png").is_file() and (out / "trajectory.png").is_file()
    npz = np.load(out / "samples.npz")
    assert npz["samples"].dtype == np.uint8 and npz["samples"].shape == (6, 8, 8, 1)
    assert npz["samples"].max() <= 16 and int(npz["num_levels"]) == 17
    assert "sampling" in result.stderr  # the progress bar
    assert "variance: tilde_beta" in (out / ".hydra" / "config.yaml").read_text()


def test_eval_cli_writes_the_bound_and_skips_fid_in_one_line(digits_ckpt, tmp_path) -> None:
    args = [
        f"ckpt_path={digits_ckpt}",
        "max_examples=20",
        "batch_size=10",
        "fid.features=inception",  # whose weights are absent here
        f"paths.log_dir={tmp_path}",
    ]
    result = run_train(args, cwd=tmp_path, script="ddpm.cli.evaluate")
    assert result.returncode == 0, result.stderr[-3000:]
    out = next((tmp_path / "eval" / "test").iterdir())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_examples"] == 20 and metrics["num_levels"] == 17
    assert 0 < metrics["bpd"] < 20 and metrics["fid"] is None
    assert metrics["clip_denoised"] is True  # as trained (model.clip_denoised), as sampled
    rows = list(csv.DictReader((out / "bpd_terms.csv").open()))
    assert [int(r["t"]) for r in rows] == list(range(1, 51))
    total = sum(float(r["bpd"]) for r in rows) + metrics["prior_bpd"]
    assert total == pytest.approx(metrics["bpd"], rel=1e-9)
    assert (out / "bpd_terms.png").is_file() and (out / "csv" / "metrics.csv").is_file()
    output = result.stdout + result.stderr
    assert output.count("FID/KID skipped") == 1
    assert "bpd" in result.stdout


def test_checkpoint_keeps_its_chain_unless_a_change_is_allowed(digits_ckpt: Path) -> None:
    trained = load_trained(digits_ckpt)
    assert trained.diffusion.num_timesteps == 50 and trained.diffusion.variance == "beta"
    assert load_trained(digits_ckpt, variance="tilde_beta").diffusion.variance == "tilde_beta"
    with pytest.raises(
        ValueError, match=r"timesteps=100 differs from the checkpoint's timesteps=50"
    ):
        load_trained(digits_ckpt, timesteps=100)
    with pytest.raises(ValueError, match=r"schedule='cosine' differs from the checkpoint's"):
        load_trained(digits_ckpt, schedule="cosine")
    changed = load_trained(
        digits_ckpt, schedule="cosine", timesteps=100, allow_schedule_change=True
    )
    assert changed.diffusion.num_timesteps == 100
    ema, raw = load_trained(digits_ckpt), load_trained(digits_ckpt, use_ema=False)
    assert not torch.equal(ema.backbone.conv_in.weight, raw.backbone.conv_in.weight)


def test_unreadable_checkpoints_get_one_sentence(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(b"PK\x03\x04 not really a zip")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    cases = [
        (None, r"ckpt_path is required"),
        (tmp_path, r"is a folder; pass a checkpoint file, e.g. ckpt_path=.*last.ckpt"),
        (tmp_path / "missing.ckpt", r"missing.ckpt does not exist"),
        (truncated, r"truncated.ckpt is not a readable checkpoint"),
        (foreign, r"foreign.ckpt holds no ddpm run"),
    ]
    for path, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            load_trained(path)


def test_sample_cli_refuses_a_missing_checkpoint(tmp_path: Path) -> None:
    result = run_train(
        ["ckpt_path=nope.ckpt", f"paths.log_dir={tmp_path}"], cwd=tmp_path, script="ddpm.cli.sample"
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: ckpt_path=nope.ckpt does not exist: pass the path of a .ckpt file."
    )


def test_toy2d_eval_reports_distances_beside_floor_and_baseline(compose_cfg, toy_ckpt) -> None:
    cfg = compose_cfg([f"ckpt_path={toy_ckpt}", "logger=none"], config_name="eval")
    metrics = evaluate(cfg, Path(cfg.paths.output_dir))
    for name in ("energy_distance", "sliced_wasserstein"):
        values = metrics[name]
        assert set(values) == {"model", "floor_two_held_out_draws", "gaussian_baseline"}
        # A 4-step model is poor, but the floor must be below the Gaussian baseline.
        assert 0 <= values["floor_two_held_out_draws"] < values["gaussian_baseline"]
    assert metrics["num_samples"] == 300
    # the bound of continuous data (bits/dim of the density); swissroll's density is not known
    assert math.isfinite(metrics["bpd"]) and "exact_bpd" not in metrics


def test_sample_seed_clip_denoised_and_compile_follow_the_config(
    compose_cfg, toy_ckpt: Path, tmp_path: Path, capsys
) -> None:
    ckpt = toy_ckpt

    def points(name: str, *overrides: str) -> np.ndarray:
        base = [
            f"ckpt_path={ckpt}",
            "num_samples=300",
            "batch_size=300",
            "sampler.steps=10",
        ]
        cfg = compose_cfg([*base, *overrides], config_name="sample")
        return np.load(sample(cfg, tmp_path / name) / "samples.npz")["samples"]

    as_trained = points("a")  # clip_denoised=null: as trained, i.e. off for the toy data
    assert np.abs(as_trained).max() > 1.0
    assert np.abs(points("b", "clip_denoised=true")).max() <= 1.0
    np.testing.assert_array_equal(points("c"), as_trained)
    assert not np.array_equal(points("d", "seed=1"), as_trained)
    # compile: through torch.compile (Dynamo with the eager backend: Inductor takes minutes on
    # 2 CPU cores), with the same samples
    compiled = compose_cfg([f"ckpt_path={ckpt}", "compile={backend: eager}"], config_name="sample")
    assert load_trained_for(compiled).backbone._compiled_call_impl is not None
    np.testing.assert_array_equal(points("e", "compile={backend: eager}"), as_trained)
    with pytest.raises(SystemExit):
        points("f", "compile=fast")
    assert "compile='fast' is invalid: allowed are true, false or a dict" in capsys.readouterr().err


def test_energy_distance_of_shifted_gaussians_matches_closed_form() -> None:
    """X ~ N(0, 1), Y ~ N(mu, 1) in 1-D: E|X-Y| = E|Z| for Z ~ N(mu, 2), E|X-X'| = 2/sqrt(pi)."""
    g = torch.Generator().manual_seed(0)
    n, mu = 6000, 0.8
    x = torch.randn(n, 1, generator=g, dtype=torch.float64)
    y = mu + torch.randn(n, 1, generator=g, dtype=torch.float64)
    s = math.sqrt(2)
    e_abs = s * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / (2 * s**2)) + mu * math.erf(
        mu / (s * math.sqrt(2))
    )
    expected = 2 * e_abs - 2 * (2 / math.sqrt(math.pi))
    assert energy_distance(x, y) == pytest.approx(expected, abs=0.03)  # ~4 standard errors
    # Identical samples: only the estimator's -2 E|X-X'| / n remains.
    assert abs(energy_distance(x, x.flip(0))) < 2 * 1.2 / n


def test_sliced_wasserstein_of_a_shift() -> None:
    """Y = X + v: each projection moves by v.theta, so SW2 = |v| / sqrt(2) over 2-D directions."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 2, generator=g)
    v = torch.tensor([0.6, -0.8])
    assert sliced_wasserstein(x, x + v, num_projections=2000) == pytest.approx(
        1 / math.sqrt(2), rel=0.03
    )
    assert sliced_wasserstein(x, x) == 0.0


def random_inception_weights(path: Path) -> Path:
    """A weights file in torch-fidelity's format with random values: the real file cannot be
    downloaded here, and the wiring (image range, channels, splits, metrics) is what is tested."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    original = torch.nn.Module.load_state_dict
    torch.save({}, path)
    try:
        torch.nn.Module.load_state_dict = lambda self, state, *a, **k: None  # keep random init
        network = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
        )
    finally:
        torch.nn.Module.load_state_dict = original
    torch.save(network.state_dict(), path)
    return path


@pytest.mark.slow
def test_fid_and_kid_from_a_local_weights_file(digits_ckpt: Path, compose_cfg, tmp_path) -> None:
    weights = random_inception_weights(tmp_path / "inception.pth")
    overrides = [
        f"ckpt_path={digits_ckpt}",
        "logger=none",
        "likelihood=[]",
        "batch_size=16",
        f"fid.weights_path={weights}",
        "fid.features=inception",
        "fid.num_samples=16",
        "fid.reference_split=val",
        "fid.num_reference=20",
    ]
    cfg = compose_cfg(overrides, config_name="eval")
    fid = evaluate(cfg, Path(cfg.paths.output_dir))["fid"]
    assert math.isfinite(fid["fid"]) and fid["fid"] >= 0 and math.isfinite(fid["kid_mean"])
    assert (fid["reference_split"], fid["num_samples"], fid["num_reference"]) == ("val", 16, 20)
    assert fid["features"] == "inception" and fid["num_floor"] == 16
    assert math.isfinite(fid["fid_floor"]) and math.isfinite(fid["kid_floor_mean"])


@pytest.mark.slow
def test_torchrun_splits_sampling_and_the_likelihoods_over_processes(
    digits_ckpt: Path, tmp_path
) -> None:
    """Two CPU processes (torchrun) share the batches and gather them: the samples, the bound and
    the ODE's NLL (per example, Hutchinson's probes seeded per batch) are those of one process,
    to the bit."""
    common = [f"ckpt_path={digits_ckpt}", "batch_size=2", "sampler.steps=10"]
    likelihood = ["likelihood=[bound,ode]", "ode.divergence=hutchinson"]
    commands = {
        "ddpm.cli.sample": [*common, "num_samples=5"],
        "ddpm.cli.evaluate": [*common, "max_examples=5", "fid.enabled=false", *likelihood],
    }
    # torchrun gives each process one thread; so does the single process here, since a
    # convolution's float32 sums depend on how many threads share them
    one_thread = {"OMP_NUM_THREADS": "1"}
    entry = {"ddpm.cli.sample": "ddpm-sample", "ddpm.cli.evaluate": "ddpm-eval"}
    lines = [
        [entry[script], *args, f"hydra.run.dir={tmp_path / 'one' / script}"]
        for script, args in commands.items()
    ]
    for outcome in run_in_one_interpreter(lines, tmp_path, one_thread):
        assert outcome["code"] == 0, outcome["stderr"][-3000:]
    for script, args in commands.items():
        torchrun = ["--nproc-per-node=2", "-m", script, *args]
        torchrun.append(f"hydra.run.dir={tmp_path / 'two' / script}")
        result = run_train(torchrun, tmp_path, script="torch.distributed.run", env=one_thread)
        assert result.returncode == 0, result.stderr[-3000:]
        if script == "ddpm.cli.sample":
            assert "sampling 3 batches on 2 processes" in result.stdout + result.stderr
    outputs = {
        name: (
            np.load(tmp_path / name / "ddpm.cli.sample" / "samples.npz")["samples"],
            json.loads((tmp_path / name / "ddpm.cli.evaluate" / "metrics.json").read_text()),
        )
        for name in ("one", "two")
    }
    assert np.array_equal(outputs["one"][0], outputs["two"][0]) and len(outputs["one"][0]) == 5
    assert outputs["one"][1]["bpd"] == outputs["two"][1]["bpd"]
    assert outputs["one"][1]["ode_bpd"] == outputs["two"][1]["ode_bpd"]
    assert outputs["one"][1]["num_examples"] == outputs["two"][1]["num_examples"] == 5
    terms = [
        (tmp_path / n / "ddpm.cli.evaluate" / "ode_terms.csv").read_text() for n in ("one", "two")
    ]
    assert terms[0] == terms[1] and len(terms[0].splitlines()) == 1 + 5


def test_eval_bound_follows_clip_denoised(digits_ckpt: Path, compose_cfg, tmp_path) -> None:
    """The bound is that of the model the sampler runs: clipped by default for a model trained
    with clipping, and `clip_denoised=false` gives the unclipped model's (another number)."""
    results = {}
    overrides = [f"ckpt_path={digits_ckpt}", "max_examples=8", "logger=none", "fid.enabled=false"]
    for clip in ("null", "false", "true"):
        cfg = compose_cfg([*overrides, f"clip_denoised={clip}"], config_name="eval")
        results[clip] = evaluate(cfg, tmp_path / clip)
    assert results["null"]["clip_denoised"] is True and results["false"]["clip_denoised"] is False
    assert results["null"]["bpd"] == results["true"]["bpd"] != results["false"]["bpd"]
    saved = json.loads((tmp_path / "false" / "metrics.json").read_text())
    assert saved["clip_denoised"] is False


def test_lightning_load_from_checkpoint_rebuilds_the_module(digits_ckpt: Path) -> None:
    """Lightning's idiom: the module is rebuilt from the run's config stored in the checkpoint,
    with the EMA weights, also when loading with weights_only=True."""
    from ddpm.module import DiffusionModule

    stored = torch.load(digits_ckpt, weights_only=True)
    for weights_only in (True, None):
        module = DiffusionModule.load_from_checkpoint(digits_ckpt, weights_only=weights_only)
        assert module.diffusion.num_timesteps == 50 and module.diffusion.variance == "beta"
        state = module.state_dict()
        assert state.keys() == stored["state_dict"].keys()
        assert all(torch.equal(v, stored["state_dict"][k]) for k, v in state.items())
    samples = module.sample(3, torch.Generator().manual_seed(0))
    assert samples.shape == (3, 1, 8, 8) and torch.isfinite(samples).all()


def test_a_schedule_choice_is_built_with_its_own_parameters(digits_ckpt: Path, compose_cfg) -> None:
    """`schedule=` on ddpm-sample replaces the stored schedule node, parameters included (they
    used to be dropped); a changed parameter is refused by its key unless allowed."""
    from ddpm.schedules import make_beta_schedule

    base = [f"ckpt_path={digits_ckpt}", "schedule=cosine", "schedule.s=0.02"]
    cfg = compose_cfg([*base, "allow_schedule_change=true"], config_name="sample")
    betas = load_trained_for(cfg).diffusion.betas
    assert torch.equal(betas, make_beta_schedule("cosine", 50, s=0.02))
    refused = compose_cfg(
        [f"ckpt_path={digits_ckpt}", "schedule=linear", "schedule.beta_end=0.03"],
        config_name="sample",
    )
    with pytest.raises(ValueError, match=r"schedule.beta_end=0.03 differs from the checkpoint's"):
        load_trained_for(refused)


@pytest.mark.slow
def test_readme_sampler_study_commands(digits_ckpt: Path, tmp_path: Path) -> None:
    """The Samplers section's two ddpm-eval sweeps, as typed, shortened (two step counts, few
    samples): each job measured with its sampler and calls, one table row per job with FID and
    its bootstrap spread (digits) or the energy distance (gmm), and the table's figure."""
    listed = [c for c in commands("Samplers") if not c.startswith("CK=")]
    assert len(listed) == 2, listed
    short = {"fid.num_samples": "32", "sampler.steps": "3,5"}
    lines = []
    for index, command in enumerate(listed):
        extra = [f"{k}={v}" for k, v in short.items() if k in command]
        extra.append(f"hydra.sweep.dir={tmp_path / str(index)}")
        words = with_overrides(command.replace("$CK", str(digits_ckpt)), extra)
        lines.append([*words, "data.num_test=300"] if "data=gmm" in command else words)
    outcomes = run_in_one_interpreter(lines, tmp_path)
    for line, outcome in zip(lines, outcomes, strict=True):
        assert outcome["code"] == 0, (line, outcome["stderr"][-3000:])
    for index, metric in enumerate(("eval/fid", "eval/energy_distance")):
        rows = list(csv.DictReader((tmp_path / str(index) / "results.csv").open()))
        samplers = ("ancestral", "ddim", "dpm_solver", "unipc")
        assert len(rows) == 8 and {r["status"] for r in rows} == {"finished"}
        assert {(r["sampler"], r["sampler.steps"]) for r in rows} == {
            (s, k) for s in samplers for k in ("3", "5")
        }
        for row in rows:
            assert float(row["eval/network_calls"]) == float(row["sampler.steps"])
            assert math.isfinite(float(row[metric]))
            if index == 0:
                assert 0 < float(row["eval/fid_bootstrap_std"]) < float(row["eval/fid"])
        assert (tmp_path / str(index) / "results.png").is_file()


def test_evaluations_that_differ_only_in_the_sampler_share_the_bound(
    compose_cfg, digits_ckpt: Path, tmp_path: Path, monkeypatch
) -> None:
    """eval_after_fit's variants pass evaluate() one `likelihoods` dict: a variant that changes only
    the sampler reuses the bound (the same numbers, no second pass over the T terms), one that
    changes the variance computes its own."""
    import ddpm.cli.evaluate as evaluate_module

    calls = []
    real = evaluate_module.bound_bpd

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "bound_bpd", counted)
    base = [f"ckpt_path={digits_ckpt}", "max_examples=4", "fid.enabled=false", "logger=none"]
    likelihoods: dict = {}
    first = evaluate(compose_cfg(base, config_name="eval"), tmp_path / "a", likelihoods)
    ddim = ["sampler=ddim", "sampler.steps=5"]
    second = evaluate(compose_cfg([*base, *ddim], config_name="eval"), tmp_path / "b", likelihoods)
    assert len(calls) == 1 and second["bpd"] == first["bpd"]
    assert (tmp_path / "b" / "bpd_terms.csv").is_file()
    other = ["variance=tilde_beta"]
    third = evaluate(compose_cfg([*base, *other], config_name="eval"), tmp_path / "c", likelihoods)
    assert len(calls) == 2 and third["bpd"] != first["bpd"]
