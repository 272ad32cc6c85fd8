"""Every config group option composes and instantiates (Hydra compose API), a short in-process
run trains and checkpoints, and each bad input ends before training with one sentence."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import CONF, FAST
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ddpm.backbones import MLP, UNet
from ddpm.cli.train import build, train
from ddpm.diffusion import GaussianDiffusion


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("schedule", options("schedule"))
@pytest.mark.parametrize("variance", options("variance"))
def test_schedule_and_variance_build_the_diffusion(
    compose_cfg, schedule: str, variance: str
) -> None:
    loss = "hybrid" if variance.startswith("learned") else "simple"
    overrides = [f"schedule={schedule}", f"variance={variance}", f"loss={loss}", "timesteps=300"]
    cfg = compose_cfg(overrides)
    diffusion = instantiate(cfg.diffusion)
    assert isinstance(diffusion, GaussianDiffusion)
    assert diffusion.num_timesteps == 300 and diffusion.variance == variance
    assert cfg.schedule.name == schedule


def test_every_key_of_the_loss_node_reaches_what_it_sets(compose_cfg) -> None:
    choice = ["variance=learned_range", "loss=hybrid", "loss.vlb_weight=0.01"]
    choice += ["loss.weighting=min_snr", "loss.min_snr_gamma=2.5", "loss.timesteps=importance"]
    run = build(compose_cfg([*FAST, *choice, "logger=none"]))
    diffusion = run.module.diffusion
    assert (diffusion.loss, diffusion.vlb_weight) == ("hybrid", 0.01)
    assert (diffusion.weighting, diffusion.min_snr_gamma) == ("min_snr", 2.5)
    assert run.module.importance is not None
    assert build(compose_cfg([*FAST, "logger=none"])).module.importance is None


@pytest.mark.parametrize("prediction", options("prediction"))
@pytest.mark.parametrize("loss", options("loss"))
def test_prediction_and_loss_build_the_diffusion_and_size_the_output(
    compose_cfg, prediction: str, loss: str
) -> None:
    """Each option sets its key; a learned variance (which hybrid needs) doubles the backbone's
    output channels through the config's interpolation, for the U-Net and the MLP."""
    variance = "beta" if loss == "simple" else "learned_range"
    choice = [f"prediction={prediction}", f"loss={loss}", f"variance={variance}"]
    for data, key, channels in (("digits", "out_channels", 1), ("toy2d", "out_dim", 2)):
        extra = ["experiment=toy2d"] if data == "toy2d" else []
        cfg = compose_cfg([*choice, *extra])
        diffusion = instantiate(cfg.diffusion)
        assert (diffusion.prediction, diffusion.loss) == (prediction, loss)
        expected = channels * (2 if variance == "learned_range" else 1)
        assert cfg.backbone[key] == expected
        backbone = instantiate(cfg.backbone)
        x = torch.zeros(2, *backbone.data_shape)
        assert backbone(x, torch.zeros(2, dtype=torch.long)).shape[1] == expected


@pytest.mark.parametrize(
    ("overrides", "cls", "shape"),
    [
        (["backbone=unet"], UNet, (1, 8, 8)),
        (["backbone=mlp", "data=toy2d"], MLP, (2,)),
        (
            ["backbone=unet_ddpm_cifar10", "data.image_size=32", "data.channels=3"],
            UNet,
            (3, 32, 32),
        ),
    ],
)
def test_backbones_instantiate(compose_cfg, overrides: list[str], cls: type, shape: tuple) -> None:
    net = instantiate(compose_cfg(overrides).backbone)
    assert isinstance(net, cls) and net.data_shape == shape


def data_overrides(data: str, root: Path) -> list[str]:
    """Point a data option at the fake files of the `fake_data` fixture."""
    if data == "image_folder":
        return [f"data.root={root / 'images'}"]
    if data in ("mnist", "fashion_mnist", "cifar10"):
        return [f"paths.data_dir={root}", "data.val_size=4"]
    if data == "streaming":  # the image folder, prepared as ddpm-prepare does
        from ddpm.data import ImageFolderDataModule
        from ddpm.data.streaming import prepare

        if not (root / "prepared").exists():
            folder = ImageFolderDataModule(str(root / "images"), image_size=16, channels=3)
            prepare(folder, str(root / "prepared"), num_workers=1)
        return [f"data.input_dir={root / 'prepared'}"]
    return []


@pytest.mark.parametrize("data", options("data"))
def test_data_instantiate(compose_cfg, fake_data: Path, data: str) -> None:
    """Every data option builds, on fake files where it reads files."""
    dm = instantiate(compose_cfg([f"data={data}", *data_overrides(data, fake_data)]).data)
    assert isinstance(dm, pl.LightningDataModule) and len(dm.train_data) >= 10
    assert tuple(dm.train_data.shape[1:]) == dm.data_shape
    # conditioning=class: labelled data serve (x, y) batches; the rest refuse in one sentence
    if dm.num_classes is None:
        assert data == "toy2d"  # swissroll, the default toy set, has no labels
        with pytest.raises(ValueError, match="conditioning=class needs labelled data"):
            dm.condition_on_labels()
        return
    assert dm.condition_on_labels() == dm.num_classes
    x, y = next(iter(dm.val_dataloader()))
    assert y.dtype == torch.long and len(y) == len(x)
    assert int(y.min()) >= 0 and int(y.max()) < dm.num_classes
    assert all(len(dm.labels(s)) == len(dm.splits[s]) for s in ("train", "val", "test"))


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainers_instantiate_on_cpu(compose_cfg, trainer: str) -> None:
    cfg = compose_cfg([f"trainer={trainer}", "trainer.accelerator=cpu", "trainer.devices=1"])
    assert isinstance(instantiate(cfg.trainer, logger=False), pl.Trainer)


def test_callbacks_are_chosen_one_file_each(compose_cfg) -> None:
    """callbacks=default composes every file of conf/callbacks/, callbacks=[...] a chosen few,
    callbacks=none none of ours, and callbacks.<name>=null drops one. (Keys set for a callback
    that is not chosen are a README Troubleshooting row.)"""
    from ddpm.callbacks import EMA, NanGuard

    def ours(overrides: list[str]) -> set[type]:
        trainer = build(compose_cfg(["timesteps=50", "logger=none", *overrides])).trainer
        return {type(c) for c in trainer.callbacks if type(c).__module__.startswith("ddpm")}

    files = {p.stem for p in (CONF / "callbacks").glob("*.yaml")} - {"default", "none"}
    assert set(compose_cfg([]).callbacks) == files
    assert {EMA, NanGuard} <= ours([])
    assert ours(["callbacks=[checkpoint,ema]"]) == {EMA}
    assert ours(["callbacks=none"]) == set()
    assert EMA not in ours(["callbacks.ema=null"]) and NanGuard in ours(["callbacks.ema=null"])


@pytest.mark.parametrize("logger", options("logger"))
def test_loggers_instantiate(compose_cfg, logger: str, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent")
    cfg = compose_cfg([f"logger={logger}"])
    loggers = [instantiate(v) for v in cfg.logger.values()]
    assert len(loggers) == (0 if logger == "none" else 1)
    if logger == "none":
        assert cfg.callbacks.lr_monitor is None
    if logger == "wandb":
        assert loggers[0]._offline and loggers[0]._wandb_init["name"] == "linear-beta-unet"


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_build(compose_cfg, fake_data: Path, experiment: str) -> None:
    """Every preset builds (on the CPU, with fake files where it reads files)."""
    data = {"mnist": "mnist", "ddpm_cifar10": "cifar10", "ddpm_cifar10_cosine": "cifar10"}
    overrides = ["logger=none", "trainer.accelerator=cpu", "trainer.devices=1"]
    if experiment in data:  # the fake files hold a few dozen images, fewer than one batch of 128
        overrides.append("data.batch_size=2")
    run = build(
        compose_cfg(
            [
                f"experiment={experiment}",
                *overrides,
                *data_overrides(data.get(experiment, ""), fake_data),
            ]
        )
    )
    assert tuple(run.module.backbone.data_shape) == run.datamodule.data_shape


TABLE_2 = {  # DDPM's Table 2 rows (and Improved DDPM's choice): prediction, variance, loss
    "eps_simple": ("eps", "beta", "simple"),
    "eps_vlb_fixed": ("eps", "beta", "vlb"),
    "eps_vlb_learned": ("eps", "learned", "vlb"),
    "mean_mse": ("mean", "beta", "simple"),
    "mean_vlb_fixed": ("mean", "beta", "vlb"),
    "mean_vlb_learned": ("mean", "learned", "vlb"),
    "learned_range_hybrid": ("eps", "learned_range", "hybrid"),
}


@pytest.mark.parametrize("objective", options("objective"))
def test_objectives_set_prediction_variance_and_loss(compose_cfg, objective: str) -> None:
    assert sorted(TABLE_2) == options("objective")
    run = build(compose_cfg([f"objective={objective}", "logger=none"]))
    diffusion = run.module.diffusion
    assert (diffusion.prediction, diffusion.variance, diffusion.loss) == TABLE_2[objective]


def test_ddpm_cifar10_is_the_papers_run(compose_cfg) -> None:
    """Ho et al. (2020), sec. 4 and appendix B, constant by constant."""
    cfg = compose_cfg(["experiment=ddpm_cifar10"])
    assert cfg.timesteps == 1000 and cfg.schedule.name == "linear"
    assert (cfg.schedule.beta_start, cfg.schedule.beta_end) == (1e-4, 0.02)
    assert cfg.diffusion.variance == "beta"
    assert cfg.data._target_.endswith("CIFAR10DataModule") and cfg.data.hflip is True
    assert cfg.data.batch_size == 128 and cfg.data.val_size == 0
    assert cfg.model.optimizer._target_ == "torch.optim.Adam" and cfg.model.optimizer.lr == 2e-4
    assert cfg.model.warmup_steps == 5000
    optimizer = instantiate(cfg.model.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    assert optimizer.defaults["foreach"] is True  # one multi-tensor update (benchmarks/)
    assert cfg.trainer.max_steps == 800_000 and cfg.trainer.gradient_clip_val == 1.0
    assert cfg.callbacks.ema.decay == 0.9999
    net = instantiate(cfg.backbone)
    assert sum(p.numel() for p in net.parameters()) == 35_746_307
    assert cfg.backbone.dropout == 0.1
    cosine = compose_cfg(["experiment=ddpm_cifar10_cosine"])
    assert cosine.schedule.name == "cosine"
    assert OmegaConf.masked_copy(cosine, ["model", "trainer", "data"]) == OmegaConf.masked_copy(
        cfg, ["model", "trainer", "data"]
    )


def test_channels_last_lays_out_the_backbone_and_keeps_its_function(compose_cfg) -> None:
    """channels_last=true puts the U-Net's conv weights in NHWC order; the network
    then computes what the same weights compute in NCHW order, and so do its gradients."""
    nhwc = build(compose_cfg([*FAST, "logger=none", "channels_last=true"])).module.backbone
    nchw = build(compose_cfg([*FAST, "logger=none", "channels_last=false"])).module.backbone
    conv = nhwc.down[0].conv1.weight  # 16 -> 16 channels: the two orders differ
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert nchw.down[0].conv1.weight.is_contiguous()
    for p in nhwc.parameters():  # the zero-initialised last convs would hide a difference
        torch.nn.init.normal_(p, std=0.1)
    nchw.load_state_dict(nhwc.state_dict())
    x, t = torch.randn(16, 1, 8, 8), torch.randint(0, 50, (16,))
    out_nhwc, out_nchw = nhwc(x, t), nchw(x, t)
    torch.testing.assert_close(out_nhwc, out_nchw, rtol=1e-4, atol=1e-5)
    out_nhwc.square().sum().backward()
    out_nchw.square().sum().backward()
    for a, b in zip(nhwc.parameters(), nchw.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_short_training_run_checkpoints_and_samples(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg([*FAST, "logger=tensorboard"])
    run = build(cfg)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert torch.isfinite(torch.tensor(float(run.trainer.callback_metrics["val/loss"])))
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "step_0000002.png",
        "step_0000004.png",
        "trajectory_0000002.png",  # every 5th validation, from the first
    ]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert ckpt["hyper_parameters"]["run_config"]["diffusion"]["variance"] == "beta"
    assert ckpt["hyper_parameters"]["run_config"]["timesteps"] == 50
    # The checkpoint's state_dict holds the EMA weights, which the module holds after fit.
    ema = {k: v for k, v in ckpt["state_dict"].items()}
    current = ckpt["current_model_state"]
    name = "backbone.conv_in.weight"
    assert not torch.equal(ema[name], current[name])
    assert torch.equal(run.module.state_dict()[name], ema[name])
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"samples", "schedule", "trajectory"} <= set(events.Tags()["images"])
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_q0", "train/loss_q3", "train/grad_norm"} <= scalars
    samples = run.module.sample(3, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 1, 8, 8) and samples.abs().max() <= 1


def test_checkpoints_every_n_steps_between_validations(compose_cfg, tmp_path: Path) -> None:
    overrides = [
        *FAST,
        "logger=none",
        "trainer.max_steps=3",
        "trainer.val_check_interval=100",
        "callbacks.periodic_checkpoint.every_n_train_steps=2",
    ]
    run = build(compose_cfg(overrides))
    saved_at = []
    original = run.trainer.save_checkpoint

    def recording(path, *args, **kwargs):
        saved_at.append((Path(path).name, run.trainer.global_step))
        return original(path, *args, **kwargs)

    run.trainer.save_checkpoint = recording
    run.trainer.fit(run.module, datamodule=run.datamodule)
    # Every 2 steps, and at the end, where the run's final validation writes the best and the
    # last checkpoint although val_check_interval never fell due.
    assert saved_at[0] == ("last.ckpt", 2)
    assert sorted(saved_at[1:]) == [("best-step-0000003.ckpt", 3), ("last.ckpt", 3)]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best-step-0000003.ckpt", "last.ckpt"]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3
    # Saved after fit copied the EMA weights into the module: the raw weights are still there.
    name = "backbone.conv_in.weight"
    assert not torch.equal(checkpoint["state_dict"][name], checkpoint["current_model_state"][name])


def test_a_failed_save_leaves_the_previous_last_checkpoint_readable(compose_cfg, tmp_path) -> None:
    """A fault in the middle of writing (the disk fills, the job is killed) must not corrupt
    last.ckpt: Lightning writes through an fsspec transaction (a temporary file, then a move)."""
    from fsspec.implementations.local import LocalFileOpener

    run = build(compose_cfg([*FAST, "logger=none"]))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    original = LocalFileOpener.write

    def half_then_fail(self, data):
        original(self, data[: len(data) // 2])
        raise OSError("No space left on device")

    LocalFileOpener.write = half_then_fail
    try:
        with pytest.raises(OSError, match="No space left"):
            run.trainer.save_checkpoint(last)
    finally:
        LocalFileOpener.write = original
    assert last.read_bytes() == before
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert sorted(p.name for p in last.parent.iterdir()) == ["best-step-0000004.ckpt", "last.ckpt"]


def test_val_bpd_is_logged_when_asked(compose_cfg) -> None:
    cfg = compose_cfg([*FAST, "logger=none", "model.val_bpd_every=2", "callbacks.samples=null"])
    run = build(cfg)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    # Validations at steps 2 and 4; the bound is measured at the first (every 2nd from 0).
    assert run.module.num_validations == 2
    assert 0.0 < float(run.trainer.callback_metrics["val/bpd"]) < 20.0
    none = build(
        compose_cfg(
            [
                *FAST,
                "logger=none",
                "model.val_bpd_every=2",
                "model.val_bpd_batches=0",
                "callbacks.samples=null",
            ]
        )
    )
    none.trainer.fit(none.module, datamodule=none.datamodule)
    assert "val/bpd" not in none.trainer.callback_metrics


def test_seed_makes_a_cpu_run_repeatable(compose_cfg) -> None:
    overrides = [*FAST, "logger=none", "callbacks.samples=null", "callbacks.checkpoint=null"]
    first = train(compose_cfg(overrides))
    second = train(compose_cfg(overrides))
    assert first["train/loss"] == second["train/loss"] and first["val/loss"] == second["val/loss"]
    third = train(compose_cfg([*overrides, "seed=7"]))
    assert third["train/loss"] != first["train/loss"]


def test_val_bpd_cadence_is_kept_in_checkpoints(compose_cfg) -> None:
    """The count of validations (which decides when val/bpd is due) survives a resume."""
    module = build(compose_cfg([*FAST, "logger=none"])).module
    module.num_validations = 7
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    fresh = build(compose_cfg([*FAST, "logger=none"])).module
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.num_validations == 7


def test_the_sampler_group_reaches_the_grid_and_the_evaluations(compose_cfg) -> None:
    """`sampler@callbacks.samples.sampler=` and `sampler@eval.sampler=` choose the validation
    grid's and eval_after_fit's sampler with their keys; an eval variant chooses one as on
    ddpm-eval's command line (`sampler: ddim`, `sampler.steps: 5`), over the eval node's, and
    the likelihoods (`likelihood: [bound, ode]`, `ode.divergence: ...`) likewise."""
    from ddpm.callbacks import SampleGrid
    from ddpm.cli.train import eval_config
    from ddpm.samplers import DDIM, Ancestral, DPMSolver
    from ddpm.sampling import sampler_of

    cfg = compose_cfg([
        "timesteps=50", "logger=none", "eval_after_fit=true",
        "sampler@callbacks.samples.sampler=dpm_solver", "callbacks.samples.sampler.steps=5",
        "sampler@eval.sampler=dpm_solver", "eval.sampler.order=3",
        "eval.variants={ddim5: {sampler: ddim, sampler.steps: 5}, all: {sampler: ancestral},"
        " ode: {likelihood: [bound, ode], ode.divergence: hutchinson}}",
    ])  # fmt: skip
    [grid] = [c for c in build(cfg).trainer.callbacks if isinstance(c, SampleGrid)]
    assert isinstance(grid.sampler, DPMSolver) and grid.sampler.steps == 5
    samplers = {name: sampler_of(node) for name, node in eval_config(cfg).items()}
    assert isinstance(samplers[""], DPMSolver) and samplers[""].order == 3
    assert isinstance(samplers["ddim5"], DDIM) and samplers["ddim5"].steps == 5
    assert isinstance(samplers["all"], Ancestral) and samplers["all"].steps is None
    ode = eval_config(cfg)["ode"]  # and a variant asks for the ODE's likelihood
    assert list(ode.likelihood) == ["bound", "ode"] and ode.ode.divergence == "hutchinson"
