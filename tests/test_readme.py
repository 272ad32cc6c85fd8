"""The README's commands are the test: every command in its Examples and Sample-and-evaluate
sections and every row of its Troubleshooting table runs here as a subprocess, as a user types
it, shortened only by overrides (a short chain, few steps, few samples), and is checked for its
exit status and what the README says it leaves or prints. A command added to the README without
an entry here fails `test_every_readme_command_is_covered`.
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SHORT, commands, run_in_one_interpreter, section, with_overrides

# Commands that need what this machine lacks, with the reason.
SKIPPED = {
    "python train.py trainer=ddp trainer.accelerator=cpu trainer.devices=2": "runs in "
    "test_resume.py (shortened), as the reference of the DDP run killed and resumed there",
    "python train.py trainer=ddp": "needs GPUs (DDP on all visible GPUs)",
    "python train.py data=cifar10 data.download=true": "downloads CIFAR-10 (no internet here)",
    "python train.py experiment=ddpm_cifar10 trainer=ddp logger=wandb": "needs GPUs and CIFAR-10",
    "python train.py -m experiment=ddpm_cifar10 trainer=ddp hydra/launcher=slurm "
    "hydra.launcher.nodes=4": "needs a SLURM cluster",
    # the same sweep with eval_after_fit and the sample score is the first command of the
    # section "Sweeps, results tables and the paper's claims": tests/test_results.py runs it,
    # kills it, reruns it and pastes a job's checkpoint path into ddpm-sample
    "python train.py -m schedule=linear,cosine variance=beta,tilde_beta": "runs in test_results",
}

# Extra overrides per command (beyond SHORT), and why.
EXTRA = {
    # per-step metrics (the learning rate, the loss quarters) logged within the 12 steps
    "python train.py logger=wandb": ["trainer.log_every_n_steps=4"],
    # Inductor needs minutes on 2 CPU cores; the eager backend runs the same torch.compile path.
    # bf16 on a CPU without bf16 arithmetic is 5-10 times slower: 4 steps
    "python train.py trainer.precision=bf16-mixed compile=true": [
        "compile={backend: eager}",
        "trainer.max_steps=4",
    ],
    "python train.py experiment=toy2d data.name=moons": ["data.num_train=2000"],
    "python train.py data=image_folder data.root=~/faces data.image_size=64": [
        "data.batch_size=8",
        "data.image_size=16",
    ],
    "python train.py hparams_search=optuna experiment=mnist": [
        "trainer=cpu",  # the preset asks for a GPU
        "hydra.sweeper.n_trials=2",
        "trainer.max_steps=2",
        "data.batch_size=8",
        "backbone.base_channels=8",
        "backbone.num_groups=8",
        "model.val_bpd_every=0",
        "paths.data_dir=mnist-files",
        "data.val_size=8",  # the fake MNIST has 40 training images
    ],
    "ddpm-sample ckpt_path=$CK sampler.steps=100": ["sampler.steps=10"],  # T is 50 here
    "ddpm-sample ckpt_path=$CK variance=tilde_beta trajectory=true num_samples=1000": [
        "num_samples=16"
    ],
    "ddpm-eval ckpt_path=$CK": ["max_examples=20"],
    # the exact divergence is 64 backward passes a call; one Hutchinson probe is one
    "ddpm-eval ckpt_path=$CK likelihood=[bound,ode] fid.enabled=false": [
        "max_examples=8",
        "ode.divergence=hutchinson",
    ],
}


def troubleshooting_rows() -> list[tuple[str, str]]:
    rows = re.findall(r"^\| `([^`]+)`[^|]*\| `(.+)` \|$", section("Troubleshooting: errors"), re.M)
    assert len(rows) >= 30, rows
    return rows


def run(words: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a README command: `python` is this interpreter, `ddpm-*` the installed scripts."""
    program = {"python": [sys.executable]}.get(words[0])
    if program is None:
        program = [shutil.which(words[0]) or words[0]]
    if words[:2] == ["python", "train.py"]:
        words = ["python", str(ROOT / "train.py"), *words[2:]]
    full_env = {**os.environ, "WANDB_MODE": "", "HYDRA_FULL_ERROR": "0", **(env or {})}
    full_env.pop("WANDB_API_KEY", None)
    return subprocess.run(
        [*program, *words[1:]], cwd=cwd, capture_output=True, text=True, env=full_env, timeout=600
    )


def only(paths: list[Path]) -> Path:
    assert len(paths) == 1, paths
    return paths[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The folder the commands run in, like a user's clone: outputs/ and data/ under it, with
    fake MNIST files and a folder of images standing in for ~/faces."""
    from fake_data import write_image_folder, write_mnist

    root = tmp_path_factory.mktemp("user")
    write_mnist(root / "mnist-files", "MNIST")
    write_image_folder(root / "faces")
    return root


@pytest.fixture(scope="module")
def ckpt(digits_ckpt: Path) -> Path:
    """The checkpoint the Sample-and-evaluate commands use ($CK): the README's first command,
    shortened (the session's digits checkpoint)."""
    return digits_ckpt


def test_every_readme_command_is_covered() -> None:
    listed = commands("Examples") + commands("Sample and evaluate")
    assert len(listed) >= 20
    for command in listed:
        assert command.startswith(
            ("python train.py", "ddpm-sample", "ddpm-eval", "python -m ddpm")
        ) or command.startswith("CK="), command
    for command in list(SKIPPED) + list(EXTRA):
        assert command in listed, f"{command!r} is no longer in the README"


def runs_in(run_root: Path) -> list[Path]:
    return sorted(p for p in run_root.iterdir() if p.is_dir()) if run_root.is_dir() else []


def check_train_run(folder: Path, steps: int, csv_logs: bool = True, hydra: bool = True) -> None:
    """What the README's Outputs section promises of a finished run, however short (`hydra`:
    with the folder hydra.main writes)."""
    assert (folder / ".hydra" / "config.yaml").is_file() or not hydra
    last = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == steps
    assert only(list((folder / "checkpoints").glob("best-step-*.ckpt")))
    assert (folder / "samples" / f"step_{steps:07d}.png").is_file()  # the final validation's
    assert (folder / "schedule.png").is_file()
    if csv_logs:
        rows = list(csv.DictReader((folder / "csv" / "metrics.csv").open()))
        assert any(r.get("val/loss") for r in rows) and any(r.get("train/loss") for r in rows)


# Examples that run as processes of their own: DDP starts its workers by re-running the command
# line, wandb starts its service, the Optuna sweep keeps a study on disk between two commands.
# The others run one after another in one interpreter, each through train.py's entry point with
# its own argv (tests/run_commands.py), which saves their start-up.
OWN_PROCESS = ("trainer=ddp", "logger=wandb", "hparams_search=optuna")


def example_words(command: str, workdir: Path, ckpt: Path, log_dir: Path) -> list[str]:
    """The command's words as run here: shortened (SHORT and EXTRA), the checkpoint and the
    image folder put in, runs under `log_dir`."""
    extra = EXTRA.get(command, [])
    command = command.replace("outputs/train/linear-beta/<time>/checkpoints/last.ckpt", str(ckpt))
    command = command.replace("~/faces", str(workdir / "faces"))
    words = with_overrides(command, [*SHORT, *extra])
    if "ckpt_path=" + str(ckpt) in command:  # continue the checkpoint's run further
        words = with_overrides(" ".join(words), ["trainer.max_steps=16"])
    return [*words, f"paths.log_dir={log_dir}"]


@pytest.fixture(scope="module")
def shared_examples(workdir: Path, ckpt: Path, tmp_path_factory) -> dict[str, dict]:
    """The Examples not in OWN_PROCESS, run in one interpreter: each one's outcome and log_dir
    (the `my-run` example twice, the second time continued to 14 steps)."""
    root = tmp_path_factory.mktemp("examples")
    names, lines = [], []
    for number, command in enumerate(commands("Examples")):
        if command in SKIPPED or any(key in command for key in OWN_PROCESS):
            continue
        words = example_words(command, workdir, ckpt, root / str(number))
        names.append(command)
        lines.append(["train.py", *words[2:]])
        if "hydra.run.dir=outputs/train/my-run" in command:
            names.append(command + " again")
            lines.append(["train.py", *words[2:-1], "trainer.max_steps=14", words[-1]])
    outcomes = run_in_one_interpreter(lines, workdir)
    return {
        name: {**outcome, "log_dir": Path(line[-1].split("=", 1)[1])}
        for name, line, outcome in zip(names, lines, outcomes, strict=True)
    }


@pytest.mark.slow
@pytest.mark.parametrize("command", commands("Examples"))
def test_examples(command: str, workdir: Path, ckpt: Path, tmp_path: Path, shared_examples):
    if command in SKIPPED:
        pytest.skip(SKIPPED[command])
    env = {"NETRC": str(tmp_path / "no-netrc")}
    if command in shared_examples:
        outcome = shared_examples[command]
        code, stdout, log_dir = outcome["code"], outcome["stdout"], outcome["log_dir"]
        output = stdout + outcome["stderr"]
        words = example_words(command, workdir, ckpt, log_dir)
    else:
        log_dir = tmp_path / "outputs"
        words = example_words(command, workdir, ckpt, log_dir)
        result = run(words, workdir, env)
        code, stdout, output = result.returncode, result.stdout, result.stdout + result.stderr
    assert code == 0, output[-3000:]
    for noise in ("LeafSpec", "set_vital", "💡 Tip", "Total FLOPs", "Traceback"):
        assert noise not in output, noise
    if "--cfg" in words:
        assert "diffusion:" in stdout and not log_dir.exists()
        return
    if "hparams_search=optuna" in command:  # the same command again continues the study
        again = run(with_overrides(" ".join(words), ["hydra.sweeper.n_trials=1"]), workdir, env)
        assert again.returncode == 0, again.stderr[-3000:]
        check_optuna_study(log_dir, trials=3)
        return
    if "hydra.run.dir=outputs/train/my-run" in command:  # run, then continued by ckpt_path=auto
        again = shared_examples[command + " again"]
        assert again["code"] == 0, again["stderr"][-3000:]
        folder = workdir / "outputs" / "train" / "my-run"
        assert (folder / "samples" / "step_0000012.png").is_file()  # the first run's end
        assert "ckpt_path=auto: resuming from" in (folder / "train.log").read_text()
        check_train_run(folder, 14)
        return
    steps = int([w for w in words if w.startswith("trainer.max_steps=")][-1].split("=")[1])
    folder = only([r for f in runs_in(log_dir / "train") for r in runs_in(f)])
    check_train_run(folder, steps, csv_logs="logger=" not in command)
    assert "parameters" in (folder / "train.log").read_text()
    if "schedule=cosine" in command:
        assert folder.parent.name == "cosine-tilde_beta"
    if "logger=wandb" in command:
        check_wandb_offline_record(folder, "linear-beta-unet", "schedule=linear")
        assert output.count("wandb: logging offline to") == 1 and "wandb sync" in output
    if "compile=true" in command:  # compiled in place: the checkpoint loads into a plain network
        from ddpm.checkpoint import load_trained

        trained = load_trained(folder / "checkpoints" / "last.ckpt")
        assert trained.backbone._compiled_call_impl is None
    if "trainer.devices=2" in command:
        assert "MEMBER: 2/2" in output


def check_optuna_study(log_dir: Path, trials: int) -> None:
    """The study in <log_dir>/optuna.db holds `trials` finished trials over the searched keys, and
    each command's sweep folder names its best."""
    import optuna
    import yaml

    study = optuna.load_study(study_name="ddpm", storage=f"sqlite:///{log_dir}/optuna.db")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == trials
    assert {"model.optimizer.lr", "schedule", "variance"} == set(done[0].params)
    assert all(1e-5 <= t.params["model.optimizer.lr"] <= 1e-3 for t in done)
    assert all(math.isfinite(t.value) and 0 < t.value < 2 for t in done)
    results = sorted(log_dir.glob("train/multirun/*/optimization_results.yaml"))
    assert len(results) == 2
    best = yaml.safe_load(results[-1].read_text())
    assert best["best_value"] == pytest.approx(min(t.value for t in done))


def check_wandb_offline_record(folder: Path, name: str, tag: str) -> None:
    """The offline run (what `wandb sync` uploads) holds the run's name, its tags, the metrics of
    the dashboard, its images and the resolved config; the record stores strings as bytes."""
    offline_run = only(list((folder / "wandb").glob("offline-run-*")))
    images = offline_run / "files" / "media" / "images"
    assert list(images.glob("samples_*.png")) and len(list(images.glob("schedule_*.png"))) == 1
    assert len(list(images.glob("trajectory_*.png"))) == 1  # the first validation's
    record = only(list(offline_run.glob("run-*.wandb"))).read_bytes()
    expected = [name, tag, "train/loss", "val/loss", "lr-Adam", "train/loss_q0", "train/loss_q3"]
    for text in [*expected, "train/grad_norm", "train/images_per_sec", "run_config"]:
        assert text.encode() in record, text


def parameterisation_commands() -> list[str]:
    """The commands of the Parameterisations section's table of the paper's Table 2 rows."""
    found = re.findall(r"^\|.*\| `(python train.py[^`]*)` \|$", section("Parameterisations"), re.M)
    assert len(found) >= 6, found
    return found


@pytest.mark.parametrize("command", parameterisation_commands())
def test_parameterisation_commands(command: str, compose_cfg, tmp_path: Path) -> None:
    """Every row of the table, composed from the command's own overrides (with SHORT) and
    trained in-process: the config path the command takes, without a second interpreter's
    start-up (the Examples run `python train.py` itself as a subprocess)."""
    from ddpm.cli.train import train

    if command == "python train.py":
        pytest.skip("the Examples run it (as a subprocess)")
    cfg = compose_cfg(with_overrides(command, SHORT)[2:])
    metrics = train(cfg)
    assert "val/loss" in metrics and "train/loss" in metrics
    check_train_run(tmp_path, 12, hydra=False)


@pytest.mark.slow
def test_sample_and_evaluate(ckpt: Path, workdir: Path, tmp_path: Path) -> None:
    """Every command of the section: `ddpm-sample` and `ddpm-eval` lines through their entry
    points in one interpreter, `python -m ddpm.cli.evaluate` as a subprocess, as typed; each
    exits 0 and leaves the files the section names."""
    listed = [c for c in commands("Sample and evaluate") if not c.startswith("CK=")]
    lines = []
    for index, command in enumerate(listed):
        words = with_overrides(command, EXTRA.get(command, []))
        lines.append([w.replace("$CK", str(ckpt)) for w in words])
        lines[-1].append(f"hydra.run.dir={tmp_path / str(index)}")
    entry = [line for line in lines if line[0] != "python"]
    outcomes = dict(zip(map(tuple, entry), run_in_one_interpreter(entry, workdir), strict=True))
    for index, (command, words) in enumerate(zip(listed, lines, strict=True)):
        if words[0] == "python":
            result = run(words, workdir)
            code, output = result.returncode, result.stdout + result.stderr
        else:
            outcome = outcomes[tuple(words)]
            code, output = outcome["code"], outcome["stdout"] + outcome["stderr"]
        assert code == 0, (command, output[-3000:])
        assert "Traceback" not in output, command
        folder = tmp_path / str(index)
        if words[0] == "ddpm-sample":
            assert (folder / "samples.png").is_file() and (folder / "samples.npz").is_file()
            assert (folder / "trajectory.png").is_file() == ("trajectory=true" in command)
        else:
            for name in ("metrics.json", "bpd_terms.csv", "bpd_terms.png"):
                assert (folder / name).is_file(), (command, name)
            assert "bpd" in output and "clip_denoised" in (folder / "metrics.json").read_text()
            metrics = json.loads((folder / "metrics.json").read_text())
            if "likelihood=[bound,ode]" in command:  # the ODE's NLL beside the bound
                assert len((folder / "ode_terms.csv").read_text().splitlines()) == 1 + 8
                assert metrics["ode_nfe"] > 10 and math.isfinite(metrics["ode_bpd"]), metrics
                assert "fid" not in metrics
                continue
            # the digits' sample score: the classifier's features, 360 samples, beside the floor
            fid = metrics["fid"]
            assert fid["features"] == "classifier" and fid["num_samples"] == 360
            assert 0 < fid["fid_floor"] < fid["fid"], fid


def message_pattern(message: str) -> str:
    """The README's message as a regular expression: `...`, `<...>`, N and T stand for anything."""
    parts = re.split(r"(\.\.\.|<[^>]*>|\b[NT]\b)", message)
    return "".join(".*" if i % 2 else re.escape(p) for i, p in enumerate(parts))


def test_troubleshooting_rows(ckpt: Path, workdir: Path, tmp_path: Path) -> None:
    """Each row: exit status 1 and the one-line message the README shows, nothing already
    written touched. The rows run through their commands' entry points, many to an interpreter
    (tests/run_commands.py): they end before any training, so start-up was most of their cost."""
    previous = ckpt.parent.parent
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:1000])
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    (tmp_path / "no-images").mkdir()
    from ddpm.data import DigitsDataModule
    from ddpm.data.streaming import prepare

    prepare(DigitsDataModule(), str(tmp_path / "prepared-digits"), num_workers=1)
    places = {
        "<prepared digits>": str(tmp_path / "prepared-digits"),
        "outputs/train/linear-beta/<time>": str(previous),
        "<truncated file>": str(truncated),
        "<ckpt>": str(ckpt),
        "<a file>": str(blocker),
        "<no images>": str(tmp_path / "no-images"),
        "<12 images>": str(workdir / "faces"),
        "<40 MNIST images>": str(workdir / "mnist-files"),
        "<ckpt trained with 50>": str(ckpt),
    }
    before = {p: p.read_bytes() for p in sorted(previous.rglob("*")) if p.is_file()}
    cases = []
    for command, message in troubleshooting_rows():
        for place, value in places.items():
            command = command.replace(place, value)
        words = shlex.split(command)
        words = ["train.py", *words[2:]] if words[:2] == ["python", "train.py"] else words
        if words[0] == "train.py" and str(ckpt) in command:
            words.append("timesteps=50")  # the checkpoint's T, so the row's key is the one named
        if "..." in words[1:]:  # `ddpm-sample ... key=value`: with the checkpoint
            words = [f"ckpt_path={ckpt}" if w == "..." else w for w in words]
        if not any(w.startswith("paths.log_dir=") for w in words):
            words.append(f"paths.log_dir={tmp_path / 'outputs'}")
        cases.append((words, message))

    def check(share: list[tuple[list[str], str]]) -> list[str]:
        """Run a share of the rows in one interpreter (tests/run_commands.py: each row through
        its command's entry point, with its own argv)."""
        outcomes = run_in_one_interpreter([w for w, _ in share], workdir)
        failures = []
        for (words, message), outcome in zip(share, outcomes, strict=True):
            stderr = outcome["stderr"].strip()
            last = stderr.splitlines()[-1] if stderr else ""
            if outcome["code"] != 1 or "Traceback" in stderr:
                failures.append(f"{words}: exit {outcome['code']}: {stderr[-500:]}")
            elif not re.fullmatch("Error: " + message_pattern(message), last):
                failures.append(f"{words}: {last!r} does not read {message!r}")
        return failures

    # two interpreters, each with every other row
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        failures = [f for share in pool.map(check, (cases[::2], cases[1::2])) for f in share]
    assert not failures, "\n".join(failures)
    assert {p: p.read_bytes() for p in sorted(previous.rglob("*")) if p.is_file()} == before
    assert not list((tmp_path / "outputs").rglob("*.ckpt"))  # no refused run wrote a checkpoint
    assert blocker.read_text() == "not a folder\n"


# The commands of "The true reverse process", in the README's order: the overrides that shorten
# each, and the folder it writes (hydra.run.dir). The first model is continued to a second,
# later checkpoint, so that the KL per t can be seen to fall with training.
TRUTH_COMMANDS = {
    "python train.py experiment=gmm": [
        "trainer.max_steps=150", "trainer.val_check_interval=150",
        "callbacks.samples.num_samples=16", "trainer.log_every_n_steps=10",
    ],
    "ddpm-truth ckpt_path=outputs/train/gmm-linear-beta/<time>/checkpoints/last.ckpt": [
        "t_points=8", "num_samples=400", "max_examples=100", "batch_size=400",
    ],
    "ddpm-truth data=gmm gaussianity.timesteps=[2,5,10,50,1000]": [
        "gaussianity.num_samples=1000", "gaussianity.t_points=8",
    ],
    "ddpm-truth data=digits distribution=train gaussianity.num_samples=1000 "
    "gaussianity.t_points=20": [
        "gaussianity.timesteps=[5]", "gaussianity.num_samples=200", "gaussianity.t_points=3",
    ],
    "ddpm-sample backbone=oracle data=gmm sampler=dpm_solver sampler.steps=10": [],
    "ddpm-eval backbone=oracle data=gmm sampler=dpm_solver sampler.steps=10": [],
    "ddpm-eval backbone=oracle data=gmm likelihood=[ode]": [],
    "ddpm-eval ckpt_path=outputs/train/gmm-linear-beta/<time>/checkpoints/last.ckpt "
    "likelihood=[bound,ode]": ["max_examples=300"],
    "ddpm-sample backbone=oracle backbone.distribution=train data=digits": [
        "timesteps=50", "num_samples=32",
    ],
}  # fmt: skip


@pytest.mark.slow
def test_true_reverse_process_commands(tmp_path: Path) -> None:
    """The section's commands, as typed (shortened by overrides), in one interpreter
    (tests/run_commands.py): a gmm model and its continuation measured against the truth (the
    KL falls with training, finite at every measured t), train/excess_loss_q* logged, the
    small-steps claim on gmm and the digits' empirical distribution, and the oracle sampling
    (a perfect network: DDPM's distance to the data at the floor, memorised digits)."""
    listed = commands("The true reverse process")
    assert listed == list(TRUTH_COMMANDS), listed
    train_gmm, truth_model, gaps_gmm, gaps_digits, solver, solver_eval, *rest = TRUTH_COMMANDS
    oracle_nll, model_nll, memorise = rest

    def words(command: str, *more: str) -> list[str]:
        found = with_overrides(command, [*TRUTH_COMMANDS[command], *more])
        return ["train.py", *found[2:]] if found[:2] == ["python", "train.py"] else found

    def last(name: str) -> str:
        return f"ckpt_path={tmp_path / name / 'checkpoints' / 'last.ckpt'}"

    runs = {
        "early": words(train_gmm),
        "later": words(train_gmm, last("early"), "trainer.max_steps=600",
                       "trainer.val_check_interval=600"),
        "truth-early": words(truth_model, last("early")),
        "truth-later": words(truth_model, last("later")),
        "gaps-gmm": words(gaps_gmm),
        "gaps-digits": words(gaps_digits),
        "solver": words(solver),
        "solver-eval": words(solver_eval),
        "oracle-nll": words(oracle_nll),
        "model-nll": words(model_nll, last("later")),
        "memorise": words(memorise),
    }  # fmt: skip
    lines = [[*w, f"hydra.run.dir={tmp_path / name}"] for name, w in runs.items()]
    outcomes = run_in_one_interpreter(lines, tmp_path)
    print({name: outcome["seconds"] for name, outcome in zip(runs, outcomes, strict=True)})
    for line, outcome in zip(lines, outcomes, strict=True):
        assert outcome["code"] == 0, (line, outcome["stderr"][-3000:])
        assert "Traceback" not in outcome["stderr"], line

    # training on a known distribution logs the simple loss above its floor per quarter of t
    rows = list(csv.DictReader((tmp_path / "early" / "csv" / "metrics.csv").open()))
    logged = [r for r in rows if r.get("train/excess_loss_q3")]
    assert logged
    for r in logged:
        for q in range(4):
            loss, excess = float(r[f"train/loss_q{q}"]), float(r[f"train/excess_loss_q{q}"])
            # the floor (the mean of Var(eps | x_t) over the quarter's t) lies in (0, 1]; the
            # excess is a Monte Carlo difference, which may dip below 0 near the floor
            assert 0 < loss - excess <= 1 + 1e-6, (q, loss, excess)

    # the model against the truth: finite KL at every measured t, falling with training
    summaries = []
    for folder in (tmp_path / "truth-early", tmp_path / "truth-later"):
        summary = json.loads((folder / "truth.json").read_text())
        terms = list(csv.DictReader((folder / "truth_terms.csv").open()))
        assert len(terms) == 8 and (folder / "truth.png").is_file()
        for row in terms:  # finite, and not below 0 by more than its Monte Carlo error
            kl, stderr = float(row["kl"]), float(row["kl_stderr"])
            assert math.isfinite(kl) and kl > -3 * stderr, row
        assert summary["nll_bpd_exact"] < summary["bound_bpd_model"]
        assert summary["num_examples"] == 100 and summary["num_samples_per_t"] == 400
        assert any(r.get("truth/kl") for r in csv.DictReader(only(
            list(folder.glob("csv/**/metrics.csv"))).open()))  # fmt: skip
        summaries.append(summary)
    early_kl, late_kl = (s["kl_total"] for s in summaries)
    late_err = summaries[1]["kl_total_stderr"]
    assert late_kl + 3 * late_err < early_kl, (early_kl, late_kl)

    # the small-steps claim: the gap falls as T grows, on gmm and the digits' training split
    gaps = json.loads((tmp_path / "gaps-gmm" / "gaussianity.json").read_text())
    total = {int(T): v["gaussian_gap_total"] for T, v in gaps["chains"].items()}
    error = {int(T): v["gaussian_gap_total_stderr"] for T, v in gaps["chains"].items()}
    counted = list(csv.DictReader((tmp_path / "gaps-gmm" / "gaussianity.csv").open()))
    assert [sum(int(r["T"]) == T for r in counted) for T in (2, 5, 10, 50, 1000)] == [2, 5, 8, 8, 8]
    for small, large in ((2, 10), (10, 1000)):
        assert total[large] + 3 * error[large] < total[small] - 3 * error[small], total
    digits = tmp_path / "gaps-digits"
    assert json.loads((digits / "gaussianity.json").read_text())["dim"] == 64
    assert (digits / "gaussianity.png").is_file() and (digits / "gaussianity.csv").is_file()

    # a perfect network: DPM-Solver++'s samples in 10 calls and their distance to the data
    assert (tmp_path / "solver" / "samples.npz").is_file()
    metrics = json.loads((tmp_path / "solver-eval" / "metrics.json").read_text())
    assert metrics["network_calls"] == 10
    distance = metrics["energy_distance"]
    assert distance["model"] < distance["gaussian_baseline"] / 2, distance

    # the ODE's NLL with the exact network is each test point's exact NLL, plus the prior's
    # mismatch at T (the truth's log q_T - log N(0, I) at the x_T the same flow reaches)
    from ddpm.data.gmm import GaussianMixtureDataModule
    from ddpm.diffusion import GaussianDiffusion
    from ddpm.likelihood import ODESettings, ode_nll
    from ddpm.schedules import make_beta_schedule
    from ddpm.truth import Oracle

    gmm = GaussianMixtureDataModule()
    test, mixture = gmm.split("test").double(), gmm.distribution()
    rows = list(csv.DictReader((tmp_path / "oracle-nll" / "ode_terms.csv").open()))
    found = torch.tensor([float(r["nll_nats"]) for r in rows], dtype=torch.float64)
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 1000))
    flow = ode_nll(diffusion, Oracle(mixture, diffusion), test, ODESettings().check(2))
    last = torch.full((len(test),), 999)
    mismatch = mixture.marginal_log_prob(diffusion, flow["x_T"], last) - flow["prior"]
    error = found - mismatch + mixture.log_prob(test)
    assert len(rows) == 2000 and error.abs().max() < 1e-3, error.abs().max()
    oracle = json.loads((tmp_path / "oracle-nll" / "metrics.json").read_text())
    assert "bpd" not in oracle and oracle["ode_nfe"] > 50  # likelihood=[ode]: no bound
    table_row = json.loads((tmp_path / "oracle-nll" / "results.json").read_text())["metrics"]
    assert table_row["eval/ode_bpd"] == oracle["ode_bpd"]  # a sweep's table shows it
    # a trained model's: not below the exact NLL beyond its standard error (cross-entropy is at
    # least the entropy), reported beside its bound on the same 300 examples
    model = json.loads((tmp_path / "model-nll" / "metrics.json").read_text())
    rows = list(csv.DictReader((tmp_path / "model-nll" / "ode_terms.csv").open()))
    excess = torch.tensor([float(r["nll_nats"]) for r in rows], dtype=torch.float64)
    excess += mixture.log_prob(test[:300])
    assert excess.mean() > -3 * excess.std() / math.sqrt(len(excess)), excess.mean()
    assert model["num_examples"] == len(rows) == 300
    assert {"bpd", "ode_bpd", "ode_bpd_stderr", "exact_bpd"} <= set(model)
    # the empirical distribution's oracle regenerates training digits, level for level
    from ddpm.data import DigitsDataModule

    samples = torch.from_numpy(np.load(tmp_path / "memorise" / "samples.npz")["samples"]).permute(
        0, 3, 1, 2
    )
    train = DigitsDataModule().splits["train"]
    assert len(samples) == 32
    for sample in samples:
        assert (train == sample).flatten(1).all(1).any()
