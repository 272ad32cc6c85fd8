"""The bad-input table: each mistake ends before any long work with exit code 1 and one
sentence naming the key, the value and what is allowed, and leaves earlier runs untouched.
The README's troubleshooting section lists these messages."""

import re
from pathlib import Path

import pytest
import torch
from conftest import FAST

from ddpm.cli.common import user_errors
from ddpm.cli.evaluate import evaluate
from ddpm.cli.sample import sample
from ddpm.cli.train import build, train

TRAIN = [
    (["timesteps=0"], r"timesteps=0 is invalid: it must be an integer >= 1"),
    (["timesteps=abc"], r"timesteps='abc' is invalid: it must be an integer >= 1"),
    (["timesteps=10"], r"schedule 'linear' .* timesteps=10 gives .* outside \(0, 1\)"),
    (["schedule.beta_end=2.0"], r"schedule.beta_end=2.0 .* outside \(0, 1\)"),
    (["schedule=cosine", "schedule.max_beta=1.5"], r"schedule.max_beta=1.5 .* outside \(0, 1\)"),
    (["diffusion.variance=fixed"], r"variance='fixed' is unknown: allowed are beta, tilde_beta,"),
    (["variance=learned"], r"loss=simple with variance=learned: .* use loss=hybrid or loss=vlb"),
    (["loss=hybrid"], r"loss=hybrid with variance=beta: .* use loss=simple, or variance="),
    (["diffusion.prediction=noise"], r"prediction='noise' is unknown: allowed are eps, x0, mean"),
    (["variance=learned_range", "loss=hybrid", "loss.vlb_weight=0"], r"loss.vlb_weight=0 is"),
    (["loss.weighting=min_snr", "loss.min_snr_gamma=-1"], r"loss.min_snr_gamma=-1 is invalid"),
    (["loss=vlb", "loss.weighting=snr"], r"loss.weighting=snr with loss=vlb: .*allowed"),
    (
        ["variance=learned_range", "loss=hybrid", "backbone.out_channels=1"],
        r"backbone=.* outputs 1 channel\(s\) but variance=learned_range needs 2 for data with 1",
    ),
    (["loss.timesteps=stratified"], r"loss.timesteps='stratified' is unknown: allowed are"),
    (["experiment=toy2d", "data.name=spiral"], r"data.name='spiral' is unknown: allowed are"),
    (["backbone.channel_mult=[1,2,2,2,2]"], r"data.image_size=8 cannot be halved 4 times"),
    (["backbone.attn_resolutions=[16]"], r"backbone.attn_resolutions=\[16\] .* allowed are"),
    (["backbone.num_groups=7"], r"backbone.num_groups=7 does not divide the channel widths"),
    (["backbone.dropout=1.5"], r"backbone.dropout=1.5 is invalid: it must lie in \[0, 1\)"),
    (["backbone.in_channels=3"], r"takes examples of shape \(3, 8, 8\) but data=.* \(1, 8, 8\)"),
    (["data=toy2d"], r"backbone=unet does not fit data=toy2d: .*'data.channels' not found"),
    (["data.image_size=16"], r"data.image_size=16 .* do not fit data=digits"),
    (["data.batch_size=0"], r"data.batch_size=0 is invalid"),
    (["data.val_fraction=0.7"], r"data.val_fraction=0.7 is invalid: it must lie in \(0, 0.5\)"),
    (["model.optimizer.lr=-1"], r"model.optimizer.lr=-1 is invalid: it must be a number > 0"),
    (["model.warmup_steps=-5"], r"model.warmup_steps=-5 is invalid: it must be an integer >= 0"),
    (["model.val_bpd_every=-1"], r"model.val_bpd_every=-1 is invalid: it must be an integer >= 0"),
    (["callbacks.ema.decay=1.5"], r"callbacks.ema.decay=1.5 is invalid: it must lie in \[0, 1\]"),
    (["callbacks.samples.num_samples=0"], r"callbacks.samples.num_samples=0 is invalid"),
    (["matmul_precision=low"], r"matmul_precision='low' is invalid: allowed are highest, high"),
    (["channels_last=maybe"], r"channels_last='maybe' is invalid: allowed are true, false"),
    (
        ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=3"],
        r"data.batch_size=128 is the global batch and must be divisible by the 3",
    ),
    (
        ["data=mnist", "paths.data_dir={previous}/none"],
        r"data.root=.*none' lacks the mnist files .*train-images-idx3-ubyte.*data.download=true",
    ),
    (
        ["data=cifar10", "backbone=unet_ddpm_cifar10", "paths.data_dir={previous}"],
        r"data.root=.*previous' lacks the cifar10 files .*cifar-10-batches-py/data_batch_1",
    ),
    (["data=image_folder"], r"data.root: Missing mandatory value"),
    (
        ["data=image_folder", "data.root={previous}/none", "data.image_size=8"],
        r"data.root=.*none' is not a folder: data=image_folder needs a folder of images",
    ),
    (
        ["data=image_folder", "data.root={previous}/checkpoints", "data.image_size=8"],
        r"data.root=.*checkpoints' holds 0 image\(s\): .* at least 3",
    ),
    (["ckpt_path={previous}"], r"ckpt_path=.*previous is a folder; pass a checkpoint file"),
    (["ckpt_path={previous}/missing.ckpt"], r"missing.ckpt does not exist"),
    (["ckpt_path={previous}/checkpoints/last.ckpt"], r"last.ckpt is not a readable checkpoint"),
]

SAMPLE = [
    (["ckpt_path=null"], r"ckpt_path is required"),
    (["ckpt_path={good}", "sampler=euler"], r"sampler='euler' is unknown: allowed are ancestral"),
    (["ckpt_path={good}", "sampler=respaced"], r"sampler=respaced needs steps=K"),
    (["ckpt_path={good}", "sampler=respaced", "steps=0"], r"steps=0 is invalid: .*\[1, 50\]"),
    (["ckpt_path={good}", "sampler=ddim", "eta=2"], r"eta=2 is invalid: it must lie in \[0, 1\]"),
    (["ckpt_path={good}", "num_samples=0"], r"num_samples=0 is invalid"),
    (["ckpt_path={good}", "timesteps=1000"], r"timesteps=1000 differs from the checkpoint's"),
    (["ckpt_path={good}", "variance=learned"], r"variance=learned differs from the checkpoint's"),
    (
        ["ckpt_path={good}", "prediction=v"],
        r"prediction=v differs from the checkpoint's prediction",
    ),
    (["ckpt_path={good}", "matmul_precision=tf32"], r"matmul_precision='tf32' is invalid"),
    (["ckpt_path={good}", "channels_last=1"], r"channels_last=1 is invalid: allowed are true"),
]

EVAL = [
    (["ckpt_path={good}", "split=holdout"], r"split='holdout' is unknown: allowed are train"),
    (["ckpt_path={good}", "fid.reference_split=x"], r"split='x' is unknown"),
    (["ckpt_path={good}", "schedule=cosine"], r"schedule='cosine' differs from the checkpoint's"),
]


@pytest.fixture
def previous(tmp_path: Path) -> Path:
    """An earlier run's folder, whose files no failed run may touch."""
    folder = tmp_path / "previous"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"\x80\x02 truncated pickle")
    (folder / "train.log").write_text("earlier run\n")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def expect_one_sentence(capsys, pattern: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: "), err
    assert re.search(pattern, err[0]), err[0]


def test_the_table_has_at_least_20_entries() -> None:
    assert len(TRAIN) + len(SAMPLE) + len(EVAL) >= 20


@pytest.mark.parametrize(("overrides", "pattern"), TRAIN)
def test_train(compose_cfg, capsys, previous: Path, tmp_path: Path, overrides, pattern) -> None:
    before = snapshot(previous)
    cfg = compose_cfg([o.format(previous=previous) for o in overrides])
    with pytest.raises(SystemExit) as exit_info:
        train(cfg)
    assert exit_info.value.code == 1
    expect_one_sentence(capsys, pattern)
    assert snapshot(previous) == before
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "samples").exists()


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory) -> Path:
    """A real checkpoint from a four-step run (T = 50)."""
    from conftest import CONF
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    out = tmp_path_factory.mktemp("good")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*FAST, "logger=none"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    run = build(cfg)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    GlobalHydra.instance().clear()
    return out / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(
    ("entry", "overrides", "pattern"),
    [("sample", *case) for case in SAMPLE] + [("eval", *case) for case in EVAL],
)
def test_sample_and_eval(compose_cfg, capsys, good_ckpt: Path, tmp_path, entry, overrides, pattern):
    before = good_ckpt.read_bytes()
    cfg = compose_cfg([o.format(good=good_ckpt) for o in overrides], config_name=entry)
    run = sample if entry == "sample" else evaluate
    with pytest.raises(SystemExit) as exit_info, user_errors():
        run(cfg, tmp_path / "out")
    assert exit_info.value.code == 1
    expect_one_sentence(capsys, pattern)
    assert good_ckpt.read_bytes() == before and not (tmp_path / "out").exists()


def test_resume_with_another_model_names_both_values(compose_cfg, capsys, good_ckpt: Path) -> None:
    cfg = compose_cfg([*FAST, f"ckpt_path={good_ckpt}", "variance=tilde_beta"])
    with pytest.raises(SystemExit):
        train(cfg)
    expect_one_sentence(
        capsys, r"diffusion.variance='tilde_beta' differs from 'beta' in ckpt_path="
    )
    # The same model resumes (a checkpoint at step 4 of 4 has nothing left to do).
    assert torch.load(good_ckpt, weights_only=True)["global_step"] == 4


def test_an_output_folder_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    """Checked by a Hydra callback before Hydra makes the sweep folder (as root, a file in the
    way stands in for a folder without write permission); a single run's folder is a README
    Troubleshooting row (test_readme)."""
    from conftest import run_train

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    for mode in (["-m"],):
        result = run_train([*mode, f"paths.log_dir={blocker}/runs", *FAST], cwd=tmp_path)
        assert result.returncode == 1
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: paths.log_dir: the run folder ") and "is a file" in last
        assert "Traceback" not in result.stderr
    assert blocker.read_text() == "not a folder\n"
