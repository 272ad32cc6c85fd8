"""The paper's released models (diffusers' format) imported and exported (`ddpm.convert`,
ddpm-import, ddpm-export), checked against diffusers itself: its UNet2DModel with the released
configs and random weights (no internet here), its DDPMScheduler, its from_pretrained."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import commands, run_in_one_interpreter, with_overrides
from fake_data import write_cifar10, write_image_folder
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ddpm.checkpoint import load_trained
from ddpm.convert import backbone_node, diffusion_node, from_diffusers, to_diffusers
from ddpm.data import CIFAR10DataModule
from ddpm.results import config_digest

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

# The released UNet2DModel configs (google/ddpm-cifar10-32; google/ddpm-celebahq-256, -church-256
# and -bedroom-256 share the second), as their config.json files give them.
RELEASED = {
    "cifar10-32": {
        "sample_size": 32, "in_channels": 3, "out_channels": 3,
        "block_out_channels": [128, 256, 256, 256],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 2, "norm_eps": 1e-6, "norm_num_groups": 32,
        "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1,
        "attention_head_dim": None, "act_fn": "silu", "center_input_sample": False,
        "mid_block_scale_factor": 1, "time_embedding_type": "positional",
    },
    "256": {
        "sample_size": 256, "in_channels": 3, "out_channels": 3,
        "block_out_channels": [128, 128, 256, 256, 512, 512],
        "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
        "layers_per_block": 2, "norm_eps": 1e-6, "norm_num_groups": 32,
        "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1,
        "attention_head_dim": None, "act_fn": "silu", "center_input_sample": False,
        "mid_block_scale_factor": 1, "time_embedding_type": "positional",
    },
}  # fmt: skip
SCHEDULER = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
             "num_train_timesteps": 1000, "clip_sample": True}  # fmt: skip
# A digits-sized layout (our default U-Net's), for what needs no large network.
SMALL = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [16, 32, 32],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1,
    "norm_num_groups": 8, "flip_sin_to_cos": False, "freq_shift": 1, "attention_head_dim": None,
}  # fmt: skip


def saved_pipeline(folder: Path, config: dict, variance: str = "fixed_large", **schedule) -> Path:
    """A DDPMPipeline folder written by diffusers: the UNet with seeded random weights (normal,
    so that no branch is zero), its scheduler."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**config)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05)
    scheduler = diffusers.DDPMScheduler(**{**SCHEDULER, **schedule}, variance_type=variance)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


def same_outputs(ours: torch.nn.Module, theirs: torch.nn.Module, shape: tuple, steps: list) -> None:
    """Our network and diffusers' in float64 on the same random inputs at the steps t."""
    ours, theirs = ours.double().eval(), theirs.double().eval()
    x = torch.randn(len(steps), *shape, generator=torch.Generator().manual_seed(1)).double()
    t = torch.tensor(steps)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), theirs(x, t).sample, rtol=0, atol=1e-12)


@pytest.mark.parametrize("padding", [0, 1])
def test_a_layout_is_diffusers_network_and_maps_back_exactly(padding: int) -> None:
    config = {**SMALL, "downsample_padding": padding, "norm_eps": 1e-6}
    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(**config)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.1)
    node = backbone_node(dict(theirs.config))
    ours = instantiate(node)
    ours.load_state_dict(from_diffusers(theirs.state_dict(), node))
    same_outputs(ours, theirs, (1, 8, 8), [0, 1, 250, 999])
    back = to_diffusers(ours.state_dict(), node)
    original = theirs.state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
         "down_block_types='CrossAttnDownBlock2D'"),
        ("attention_head_dim", 8, "attention_head_dim=8"),
        ("flip_sin_to_cos", True, "flip_sin_to_cos=True"),
        ("act_fn", "gelu", "act_fn='gelu'"),
    ],
)  # fmt: skip
def test_another_layout_is_refused_naming_the_key(key: str, value: object, named: str) -> None:
    with pytest.raises(ValueError, match=f"^{named} is not the DDPM layout this converts"):
        backbone_node({**SMALL, key: value})


@pytest.mark.parametrize(
    ("schedule", "T"), [("linear", 1000), ("linear", 500), ("scaled_linear", 1000),
                        ("squaredcos_cap_v2", 1000)],
)  # fmt: skip
def test_the_chain_is_the_schedulers(schedule: str, T: int) -> None:
    """The imported chain against DDPMScheduler's (`same_chain`); the variance and prediction
    as named."""
    settings = {"beta_schedule": schedule, "num_train_timesteps": T}
    if T != 1000:
        settings.update(beta_start=2e-4, beta_end=0.04)
    scheduler = diffusers.DDPMScheduler(**{**SCHEDULER, **settings}, variance_type="fixed_small",
                                        prediction_type="v_prediction")  # fmt: skip
    node = diffusion_node(dict(scheduler.config), learned=False)
    chain = instantiate(node)
    assert (chain.variance, chain.prediction) == ("tilde_beta", "v")
    same_chain(chain, scheduler)


def same_chain(chain: torch.nn.Module, scheduler: object) -> None:
    """Our betas are diffusers' to float32 rounding (diffusers holds them in float32), and so
    abar_t, whose float32 product over 1000 steps drifts by up to ~1e-5 relative."""
    torch.testing.assert_close(chain.betas, scheduler.betas.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(
        chain.alphas_cumprod, scheduler.alphas_cumprod.double(), rtol=1e-4, atol=0
    )


def test_the_released_cifar10_layout_is_unet_ddpm_cifar10(compose_cfg) -> None:
    cfg = compose_cfg(["backbone=unet_ddpm_cifar10", "data=cifar10"])
    preset = OmegaConf.to_container(cfg.backbone, resolve=True)
    imported = backbone_node(RELEASED["cifar10-32"])
    assert {**preset, "dropout": 0.0} == imported  # the release has dropout 0 (inference)
    preset_256 = compose_cfg(["backbone=unet_ddpm_256", "data=image_folder", "data.root=x",
                              "data.image_size=256"]).backbone  # fmt: skip
    assert OmegaConf.to_container(preset_256, resolve=True) == backbone_node(RELEASED["256"])


def test_init_from_starts_from_the_weights_and_checks_the_chain(compose_cfg, tmp_path) -> None:
    """train.py init_from=<an imported checkpoint>: the network starts with its weights (and a
    fresh optimizer); another chain is refused naming the key."""
    from ddpm.cli.convert import import_model
    from ddpm.cli.train import build

    source = saved_pipeline(tmp_path / "small", {**SMALL, "block_out_channels": [16, 32, 32],
                            "down_block_types": ["DownBlock2D"] * 3,
                            "up_block_types": ["UpBlock2D"] * 3},
                            beta_start=2e-4, beta_end=0.04, num_train_timesteps=500)  # fmt: skip
    ckpt = tmp_path / "small.ckpt"
    import_model(OmegaConf.create({"source": str(source), "out": str(ckpt), "data": compose_cfg(
        ["data=digits"]).data}))  # fmt: skip
    module = build(compose_cfg([f"init_from={ckpt}", "logger=none"])).module
    imported = torch.load(ckpt, weights_only=True)["state_dict"]
    for name, value in module.backbone.state_dict().items():
        assert torch.equal(value, imported[f"backbone.{name}"]), name
    with pytest.raises(
        ValueError, match=r"diffusion.betas.timesteps=1000 differs from 500 in init"
    ):
        build(compose_cfg([f"init_from={ckpt}", "timesteps=1000", "logger=none"]))


def test_added_keys_leave_the_digest_of_a_default_run_unchanged(compose_cfg) -> None:
    """conditioning and init_from at their defaults: the digest of before they existed."""
    config = OmegaConf.to_container(compose_cfg([]), resolve=True)
    before = {k: v for k, v in config.items() if k not in ("conditioning", "init_from")}
    assert config_digest(config) == config_digest(before)
    assert config_digest({**config, "init_from": "x.ckpt"}) != config_digest(before)


SECTION = "The paper's models"


@pytest.mark.slow
def test_the_papers_models_commands(tmp_path: Path, monkeypatch) -> None:
    """The section's commands as typed, on folders diffusers wrote with the released configs
    and random weights in place of the downloads (the download itself needs internet), fake
    CIFAR-10 files and a folder of 256x256 images: the imports' networks are diffusers' to float
    rounding (float64) and their chains the schedulers'; evaluation, sampling and fine-tuning
    run on the import; the export is the original folder's network, bit for bit."""
    listed = commands(SECTION)
    download, *rest = listed
    assert download.startswith("huggingface-cli download google/ddpm-cifar10-32"), download
    assert len(rest) == 7, rest
    import_cifar, evaluate, sample, prepare_church, import_church, fine_tune, export = rest
    saved_pipeline(tmp_path / "downloads" / "ddpm-cifar10-32", RELEASED["cifar10-32"])
    saved_pipeline(tmp_path / "downloads" / "ddpm-church-256", RELEASED["256"], "fixed_small")
    write_cifar10(tmp_path / "data", per_batch=250)  # 1250 training images: val_size is 1000
    # the FID classifier of these files, cached where ddpm-eval looks (trained briefly: its
    # quality is not what this tests)
    import torchvision

    import ddpm.classifier

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    fast = ddpm.classifier.train_classifier
    monkeypatch.setattr(ddpm.classifier, "train_classifier", lambda *a, **k: fast(*a, **k, steps=5))
    cifar = CIFAR10DataModule(root=str(tmp_path / "data"), image_size=32, channels=3)
    ddpm.classifier.classifier_for(cifar, tmp_path / "data")
    write_image_folder(tmp_path / "church-images", n=6, size=(256, 256))
    cheap_samples = ["sampler=dpm_solver", "sampler.steps=2"]
    short = {
        import_cifar: [],
        evaluate: ["device=cpu", "fid.num_samples=4", "likelihood=[]", *cheap_samples,
                   "fid.features=classifier"],
        sample: ["num_samples=2", "sampler.steps=2"],
        prepare_church: ["num_workers=2"],
        import_church: [],
        fine_tune: ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true",
                    "trainer.max_steps=1", "trainer.val_check_interval=1",
                    "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
                    "data.batch_size=2", "data.num_workers=0", "model.val_bpd_every=0",
                    "callbacks.samples.num_samples=1", "callbacks.samples.trajectory_every=0",
                    "sampler@callbacks.samples.sampler=dpm_solver",
                    "callbacks.samples.sampler.steps=2", "logger=none"],
        export: [],
    }  # fmt: skip
    lines, folders = [], {}
    for number, command in enumerate(rest):
        words = with_overrides(command, short[command])
        words = ["train.py", *words[2:]] if words[:2] == ["python", "train.py"] else words
        folders[command] = tmp_path / "runs" / str(number)
        data_dir = f"paths.data_dir={tmp_path / 'data'}"
        lines.append([*words, f"hydra.run.dir={folders[command]}", data_dir])
    outcomes = run_in_one_interpreter(lines, tmp_path, env={"DDPM_TEST_FAKE_CIFAR10": "1"})
    print([outcome["seconds"] for outcome in outcomes])
    for line, outcome in zip(lines, outcomes, strict=True):
        assert outcome["code"] == 0, (line, outcome["stderr"][-3000:])
        assert "Traceback" not in outcome["stderr"], line

    # each import is diffusers' network (float64, several t) on its scheduler's chain
    # (the 256x256 layout's networks on 64x64 inputs: every weight takes part at any size
    # divisible by 32, at a sixteenth of the cost)
    for name, shape, steps in (("ddpm-cifar10-32", (3, 32, 32), [0, 1, 500, 999]),
                               ("ddpm-church-256", (3, 64, 64), [0, 637, 999])):  # fmt: skip
        trained = load_trained(tmp_path / "checkpoints" / f"{name}.ckpt")
        source = tmp_path / "downloads" / name
        theirs = diffusers.UNet2DModel.from_pretrained(source, subfolder="unet")
        same_outputs(trained.backbone, theirs, shape, steps)
        scheduler = diffusers.DDPMScheduler.from_pretrained(source, subfolder="scheduler")
        same_chain(trained.diffusion, scheduler)
        variance = {"fixed_large": "beta", "fixed_small": "tilde_beta"}
        assert trained.diffusion.variance == variance[scheduler.config.variance_type]
    # the 256x256 import names the prepared set it is evaluated on, streamed
    church = torch.load(tmp_path / "checkpoints" / "ddpm-church-256.ckpt", weights_only=True)
    data = church["hyper_parameters"]["run_config"]["data"]
    assert data["_target_"].endswith("StreamingDataModule") and data["image_size"] == 256
    assert (tmp_path / "prepared" / "church-256" / "ddpm.json").is_file()
    # Lightning rebuilds the imported module as any trained one
    from ddpm.module import DiffusionModule

    imported = tmp_path / "checkpoints" / "ddpm-cifar10-32.ckpt"
    module = DiffusionModule.load_from_checkpoint(imported)
    weights = torch.load(imported, weights_only=True)["state_dict"]
    for name, value in module.backbone.state_dict().items():
        assert torch.equal(value, weights[f"backbone.{name}"]), name
    # evaluation, samples and a fine-tuning step on the import
    metrics = json.loads((folders[evaluate] / "metrics.json").read_text())
    assert metrics["fid"]["fid"] >= 0 and metrics["network_calls"] == 2
    assert (folders[sample] / "samples.npz").is_file()
    tuned = torch.load(folders[fine_tune] / "checkpoints" / "last.ckpt", weights_only=True)
    assert tuned["global_step"] == 1
    # the export of the import is the downloaded network and scheduler
    exported = tmp_path / "exported" / "ddpm-cifar10-32"
    original = diffusers.UNet2DModel.from_pretrained(
        tmp_path / "downloads" / "ddpm-cifar10-32", subfolder="unet"
    ).state_dict()
    back = diffusers.UNet2DModel.from_pretrained(exported, subfolder="unet").state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    pipeline = diffusers.DDPMPipeline.from_pretrained(exported)
    assert pipeline.scheduler.config.variance_type == "fixed_large"


def test_import_and_export_refuse_in_one_sentence(compose_cfg, tmp_path, capsys) -> None:
    """An existing `out` is kept as it was, data of another shape is refused naming it, and an
    export into a folder that holds files writes nothing."""
    from ddpm.cli.convert import export_model, import_model

    source = saved_pipeline(tmp_path / "small", SMALL)
    digits = compose_cfg(["data=digits"]).data

    def refused(run, keys: dict) -> str:
        with pytest.raises(SystemExit) as exit_:
            run(OmegaConf.create(keys))
        assert exit_.value.code == 1
        return capsys.readouterr().err.strip().splitlines()[-1]

    kept = tmp_path / "kept.ckpt"
    kept.write_text("a checkpoint\n")
    message = refused(import_model, {"source": str(source), "out": str(kept), "data": digits})
    assert message == f"Error: out={kept} exists: choose a new file (nothing is overwritten)."
    assert kept.read_text() == "a checkpoint\n"
    points = compose_cfg(["data=gmm"]).data
    message = refused(import_model, {"source": str(source), "out": str(tmp_path / "x.ckpt"),
                                     "data": points})  # fmt: skip
    # the data option as typed inside a Hydra run (gmm), else its class
    assert re.match(r"Error: data=(gmm|GaussianMixtureDataModule) has examples of shape \(2,\), "
                    r"but the network takes \(1, 8, 8\)", message), message  # fmt: skip
    assert not (tmp_path / "x.ckpt").exists()
    ckpt = tmp_path / "small.ckpt"
    import_model(OmegaConf.create({"source": str(source), "out": str(ckpt), "data": digits}))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine\n")
    message = refused(export_model, {"ckpt_path": str(ckpt), "out": str(busy), "use_ema": True})
    assert (
        message == f"Error: out={busy} is not empty: choose a new folder (nothing is overwritten)."
    )
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
