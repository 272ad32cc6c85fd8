"""Class conditioning and classifier-free guidance: the guided oracle against closed forms
computed here (one Gaussian per class, Bayes' rule over the mixture in float64), the networks'
label embeddings, the data's labels, and the config and checkpoint checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHORT, commands, run_in_one_interpreter, with_overrides
from fake_data import write_image_folder
from PIL import Image

from ddpm.backbones import MLP, UNet
from ddpm.conditioning import Guided, drop_labels
from ddpm.data import GaussianMixtureDataModule, ImageFolderDataModule, Toy2DDataModule
from ddpm.data.base import SplitDataset
from ddpm.diffusion import GaussianDiffusion
from ddpm.metrics import energy_distance
from ddpm.schedules import make_beta_schedule
from ddpm.truth import Oracle

T = 100


def mixture_eps(
    means: torch.Tensor, variance: float, x_t: torch.Tensor, abar: float, only: int | None
) -> torch.Tensor:
    """E[eps | x_t] (and `only`: given component `only`) of equal-weight N(m_k, variance I),
    from the textbook formulas: x_t | k ~ N(sqrt(abar) m_k, (abar v + 1 - abar) I), x_0 | x_t, k
    Gaussian with mean m_k + v sqrt(abar) / (abar v + 1 - abar) (x_t - sqrt(abar) m_k)."""
    s = abar * variance + 1 - abar
    diff = x_t[:, None, :] - math.sqrt(abar) * means[None]  # [B, K, D]
    log_w = -0.5 * diff.pow(2).sum(-1) / s
    if only is not None:
        log_w = torch.where(torch.arange(len(means)) == only, log_w, -math.inf)
    w = torch.softmax(log_w, dim=1)
    x0_k = means[None] + variance * math.sqrt(abar) / s * diff
    x0 = (w[..., None] * x0_k).sum(1)
    return (x_t - math.sqrt(abar) * x0) / math.sqrt(1 - abar)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "mean"])
@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
def test_guided_oracle_is_the_guided_eps_of_the_closed_forms(prediction: str, scale: float) -> None:
    """Guided(oracle) at label y: eps_u + s (eps_c - eps_u) from the closed forms, converted to
    the prediction by the paper's formulas, for every prediction (combined in output space,
    which is the same since each prediction is affine in eps)."""
    data = GaussianMixtureDataModule(dim=3, components=4, variance=0.05)
    mixture = data.distribution()
    v = float(mixture.variances[0])  # 0.05 as the data config's float32 holds it
    diffusion = GaussianDiffusion(make_beta_schedule("linear", T), prediction=prediction)
    guided = Guided(Oracle(mixture, diffusion, num_classes=4), scale, 4, 3)
    g = torch.Generator().manual_seed(0)
    x_t = 1.3 * torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.arange(12) % 5  # 4 is the null label
    for step in (3, 60):
        abar = float(diffusion.alphas_cumprod[step])
        out = guided(x_t, torch.full((12,), step), y)
        uncond = mixture_eps(mixture.means, v, x_t, abar, None)
        eps = torch.stack([
            uncond[i] if y[i] == 4 else uncond[i] + scale * (
                mixture_eps(mixture.means, v, x_t[i : i + 1], abar, int(y[i]))[0] - uncond[i]
            ) for i in range(12)
        ])  # fmt: skip
        x0 = (x_t - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
        beta, abar_prev = float(diffusion.betas[step]), float(diffusion.alphas_cumprod_prev[step])
        expected = {
            "eps": eps,
            "x0": x0,
            "v": math.sqrt(abar) * eps - math.sqrt(1 - abar) * x0,
            "mean": math.sqrt(abar_prev) * beta / (1 - abar) * x0
            + math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar) * x_t,
        }[prediction]
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_guidance_is_one_batched_call_and_keeps_the_conditional_variance() -> None:
    calls = []

    def network(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return torch.cat([x * (y[:, None] + 1.0), -y[:, None].float().expand_as(x)], dim=1)

    x, t, y = torch.ones(5, 2), torch.zeros(5, dtype=torch.long), torch.tensor([0, 1, 2, 0, 1])
    out = Guided(network, 2.0, num_classes=3, channels=2)(x, t, y)
    assert calls == [10]
    # prediction: 4 + 2 ((y + 1) - 4); variance values: the conditional ones (-y)
    assert torch.equal(out[:, :2], (4 + 2 * (y[:, None] + 1.0 - 4)).expand(5, 2))
    assert torch.equal(out[:, 2:], -y[:, None].float().expand(5, 2))
    calls.clear()
    Guided(network, 1.0, 3, 2)(x, t, y), Guided(network, 0.0, 3, 2)(x, t, y)
    assert calls == [5, 5]  # s = 1 and s = 0: one plain call


@pytest.mark.parametrize("make", [
    lambda c: UNet(in_channels=1, image_size=8, base_channels=16, channel_mult=(1, 2),
                   num_res_blocks=1, attn_resolutions=(), num_groups=8, num_classes=c),
    lambda c: MLP(dim=2, hidden_dim=32, num_layers=2, num_classes=c),
])  # fmt: skip
def test_networks_embed_labels_and_the_null_label(make) -> None:
    torch.manual_seed(0)
    net = make(3).eval()  # no dropout
    for p in net.parameters():  # the U-Net's zero-initialised output layer would hide labels
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(4, *net.data_shape)
    t = torch.full((4,), 7)
    outs = [net(x, t, y=torch.full((4,), c)) for c in range(4)]
    assert all(not torch.allclose(outs[0], o) for o in outs[1:])  # each label its own output
    assert torch.equal(net(x, t), outs[3])  # no labels: the null label (index num_classes)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="labels were given to an unconditional network"):
        make(None)(x, t, y=torch.zeros(4, dtype=torch.long))


def test_label_dropout_rate() -> None:
    y = torch.zeros(20000, dtype=torch.long)
    dropped = drop_labels(y, 10, 0.1, torch.Generator().manual_seed(0))
    share = (dropped == 10).double().mean().item()
    assert abs(share - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 20000)  # binomial, 4 standard errors
    assert ((dropped == 0) | (dropped == 10)).all()
    assert drop_labels(y, 10, 0.0) is y


def test_labels_of_the_generated_data_are_their_components() -> None:
    """gmm: the label of each example is the component it was drawn from (so the mixture's own
    Bayes classifier agrees on almost every example, and the examples of a class have its
    mean); toy2d 8gaussians: the mode at angle 2 pi k / 8."""
    gmm = GaussianMixtureDataModule(components=5, num_train=4000)
    x, y = gmm.train_data, gmm.labels("train")
    mixture = gmm.distribution()
    assert (mixture.classify(x.double()) == y).double().mean() > 0.97
    for k in range(5):
        torch.testing.assert_close(x[y == k].double().mean(0), mixture.means[k], atol=0.01, rtol=0)
    toy = Toy2DDataModule(name="8gaussians", num_train=4000)
    x, y = toy.train_data, toy.labels("train")
    angles = torch.atan2(x[:, 1], x[:, 0]) % (2 * math.pi)
    nearest = torch.round(angles / (2 * math.pi / 8)).long() % 8
    assert (nearest == y).all() and toy.num_classes == 8
    assert Toy2DDataModule(name="moons").num_classes is None


def test_image_folder_classes_are_its_sub_folders(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "images", n=12, size=(16, 16))  # sub-folders a, b
    dm = ImageFolderDataModule(root=str(tmp_path / "images"), image_size=16, channels=3)
    assert dm.num_classes == 2
    folder_of = {
        np.asarray(Image.open(p)).tobytes(): ["a", "b"].index(p.parent.name)
        for p in (tmp_path / "images").rglob("*.png")
    }
    for split in ("train", "val", "test"):
        for x, y in zip(dm.splits[split], dm.labels(split), strict=True):
            key = x.permute(1, 2, 0).numpy().tobytes()
            assert folder_of.get(key, int(y)) == int(y)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "images" / "loose.png")
    assert ImageFolderDataModule(root=str(tmp_path / "images")).num_classes is None


def test_conditional_batches_are_images_and_labels() -> None:
    data = torch.arange(6, dtype=torch.uint8).reshape(6, 1)
    labels = torch.tensor([5, 4, 3, 2, 1, 0])
    x, y = SplitDataset(data, 256, labels)[2]
    assert y == 3 and x.shape == (1,)
    assert len(SplitDataset(data, 256)[2]) == 1
    with pytest.raises(ValueError, match="conditioning=class needs labelled data, but Toy2D"):
        Toy2DDataModule(name="swissroll").condition_on_labels()


SECTION = "Conditional generation and guidance"
GMM_SHORT = [
    "trainer.max_steps=400", "trainer.val_check_interval=400", "callbacks.samples.num_samples=16",
    "data.num_val=400", "data.num_test=400",
]  # fmt: skip
# The section's commands, each with the overrides that shorten it.
COMMANDS = {
    "python train.py conditioning=class": SHORT,
    "ddpm-sample ckpt_path=$CK labels=all guidance_scale=2": ["num_samples=3"],
    "ddpm-sample ckpt_path=$CK labels=[3] guidance_scale=3 sampler=dpm_solver sampler.steps=20": [
        "num_samples=4"
    ],
    "ddpm-eval ckpt_path=$CK guidance_scale=2": ["max_examples=20", "fid.num_samples=40"],
    "python train.py experiment=gmm conditioning=class": GMM_SHORT,
    "ddpm-sample backbone=oracle data=gmm conditioning=class labels=[3] guidance_scale=1": [
        "labels=all", "num_samples=300", "batch_size=2400",
    ],
    "ddpm-eval backbone=oracle data=gmm conditioning=class": [
        "max_examples=100", "likelihood=[ode]",
    ],
    "ddpm-truth backbone=oracle data=gmm conditioning=class labels=[3]": [
        "t_points=8", "num_samples=400", "max_examples=100",
    ],
}  # fmt: skip


@pytest.mark.slow
def test_conditional_generation_commands(tmp_path: Path) -> None:
    """The section's commands as typed (shortened), in one interpreter, and what the issue asks
    of them: the oracle's samples of each class at s = 1 lie on that class's component (energy
    distance at the floor of two draws of it); a gmm model trained 400 steps puts most samples
    of each label on its component, one trained with drop_prob=0 is conditional only (sampling
    without labels is refused) and one with drop_prob=1 unconditional only (its labels steer
    nothing); the digits model samples one row per class and is scored by class_accuracy; the
    oracle's ODE NLL given the labels is the exact conditional NLL."""
    listed = [c for c in commands(SECTION) if not c.startswith("CK=")]
    assert listed == list(COMMANDS), listed
    digits_train, sample_all, sample_solver, evaluate, gmm_train, oracle, oracle_eval, truth = (
        COMMANDS
    )

    def words(command: str, *more: str) -> list[str]:
        found = with_overrides(command, [*COMMANDS[command], *more])
        return ["train.py", *found[2:]] if found[:2] == ["python", "train.py"] else found

    def ck(name: str) -> str:
        return str(tmp_path / name / "checkpoints" / "last.ckpt")

    at_once = ["num_samples=50", "batch_size=400"]  # 50 per class, one batch
    runs = {
        "digits": words(digits_train),
        "gmm": words(gmm_train),
        "gmm-drop0": words(gmm_train, "conditioning.drop_prob=0"),
        "gmm-drop1": words(gmm_train, "conditioning.drop_prob=1"),
        "sample-all": words(sample_all),
        "sample-solver": words(sample_solver),
        "eval": words(evaluate),
        "gmm-samples": words(sample_all, *at_once, "guidance_scale=1"),
        "drop0-samples": words(sample_all, *at_once, "guidance_scale=1"),
        "drop0-unlabelled": words(sample_all, "labels=null", "guidance_scale=1"),
        "drop1-samples": words(sample_all, *at_once, "guidance_scale=1"),
        "drop1-unlabelled": words(
            sample_all, "num_samples=400", "batch_size=400", "labels=null", "guidance_scale=1"
        ),
        "oracle": words(oracle),
        "oracle-eval": words(oracle_eval),
        "truth": words(truth),
    }
    checkpoints = {"gmm-samples": "gmm", "drop0-samples": "gmm-drop0",
                   "drop0-unlabelled": "gmm-drop0", "drop1-samples": "gmm-drop1",
                   "drop1-unlabelled": "gmm-drop1"}  # fmt: skip
    lines = []
    for name, line in runs.items():
        source = ck(checkpoints.get(name, "digits"))
        folder = f"hydra.run.dir={tmp_path / name}"
        lines.append([*(w.replace("$CK", source) for w in line), folder])
    outcomes = dict(zip(runs, run_in_one_interpreter(lines, tmp_path), strict=True))
    print({name: outcome["seconds"] for name, outcome in outcomes.items()})
    for name, outcome in outcomes.items():
        if name == "drop0-unlabelled":
            assert outcome["code"] == 1, outcome["stderr"][-2000:]
            assert (
                "labels= is needed: this model was trained with conditioning.drop_prob=0"
                in (outcome["stderr"])
            )
            continue
        assert outcome["code"] == 0, (name, outcome["stderr"][-3000:])
        assert "Traceback" not in outcome["stderr"], name

    mixture = GaussianMixtureDataModule().distribution()

    def on_their_component(name: str) -> np.ndarray:
        """Per class, the share of its samples whose most responsible component is its own."""
        found = np.load(tmp_path / name / "samples.npz")
        x, y = torch.from_numpy(found["samples"]).double(), torch.from_numpy(found["labels"])
        hit = mixture.classify(x) == y
        return np.array([hit[y == k].double().mean().item() for k in range(8)])

    # the digits: the validation grid and samples.png one row per class (8x8 digits drawn 4x,
    # padding 4: 36 pixels a cell), every sample's label stored; class accuracy
    grid = Image.open(sorted((tmp_path / "digits" / "samples").glob("step_*.png"))[-1])
    assert grid.size == (4 + 36, 4 + 10 * 36)  # num_samples=4 < 10 classes: one of each
    assert Image.open(tmp_path / "sample-all" / "samples.png").size == (4 + 3 * 36, 4 + 10 * 36)
    stored = np.load(tmp_path / "sample-all" / "samples.npz")
    assert stored["labels"].tolist() == [k for k in range(10) for _ in range(3)]
    assert np.load(tmp_path / "sample-solver" / "samples.npz")["labels"].tolist() == [3] * 4
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["guidance_scale"] == 2 and 0 <= metrics["class_accuracy"] <= 1
    assert metrics["class_accuracy_real"] > 0.8  # the classifier's ceiling on real test digits
    assert metrics["fid"]["fid"] > 0 and "bpd" in metrics

    # trained gmm models: most samples of each label on its component (drop_prob 0.1 and 0)
    for name in ("gmm-samples", "drop0-samples"):
        shares = on_their_component(name)
        assert shares.min() > 0.6 and shares.mean() > 0.85, (name, shares)
    # drop_prob=1: the labels steer nothing; without them, every component is sampled
    assert on_their_component("drop1-samples").mean() < 0.4
    free = torch.from_numpy(np.load(tmp_path / "drop1-unlabelled" / "samples.npz")["samples"])
    shares = torch.bincount(mixture.classify(free.double()), minlength=8) / len(free)
    assert shares.min() > 0.04, shares  # each of 8 equally weighted components, ~1/8

    # the oracle at s = 1: each class's samples against fresh draws of its component, at the
    # floor (the mean plus 4 standard deviations of the distance between two such draws)
    found = np.load(tmp_path / "oracle" / "samples.npz")
    x, y = torch.from_numpy(found["samples"]).double(), torch.from_numpy(found["labels"])
    g = torch.Generator().manual_seed(1)
    for k in range(8):
        part = mixture.of_class(k)
        floor = torch.tensor([
            energy_distance(part.sample(300, g), part.sample(300, g)) for _ in range(30)
        ])  # fmt: skip
        got = energy_distance(x[y == k], part.sample(300, g))
        assert got < floor.mean() + 4 * floor.std(), (k, got, floor.mean(), floor.std())
    oracle_metrics = json.loads((tmp_path / "oracle-eval" / "metrics.json").read_text())
    assert oracle_metrics["class_accuracy"] > 0.95 * oracle_metrics["class_accuracy_real"]
    # the perfect conditional network's flow given the labels carries each class's density:
    # its NLL is the exact -log p(x | y) (up to the prior's mismatch at T, ~1e-3 nats)
    assert abs(oracle_metrics["ode_bpd"] - oracle_metrics["exact_bpd"]) < 0.005, oracle_metrics
    # ddpm-truth at class 3: a single Gaussian, whose true reverse step is Gaussian (gap 0)
    summary = json.loads((tmp_path / "truth" / "truth.json").read_text())
    assert summary["label"] == 3 and abs(summary["gaussian_gap_total"]) < 1e-6
    assert summary["num_examples"] == 100


def test_conditional_loss_floor_of_one_gaussian_per_class() -> None:
    """Given its label, an example of a one-Gaussian-per-class mixture is N(m_y, v I): the eps
    loss's floor is Var(eps | x_t) = abar v / (abar v + 1 - abar) per dimension (closed form;
    Monte Carlo within 4 standard errors per t); with drop_prob the floor
    mixes in the mixture's own, which is higher."""
    from ddpm.truth import conditional_loss_floor, loss_floor

    mixture = GaussianMixtureDataModule(dim=2, components=4, variance=0.05).distribution()
    v = float(mixture.variances[0])
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 50))
    abar = diffusion.alphas_cumprod
    exact = abar * v / (abar * v + 1 - abar)
    floor = conditional_loss_floor(diffusion, mixture, 0.0, 8000, torch.Generator().manual_seed(0))
    # 8000 draws per t, each the mean over 2 dimensions of exact * chi^2_1: variance exact^2
    tolerance = 4 * exact / math.sqrt(8000)
    assert ((floor - exact).abs() < tolerance).all(), (floor, exact)
    whole, _ = loss_floor(diffusion, mixture, 8000, torch.Generator().manual_seed(1))
    mixed = conditional_loss_floor(diffusion, mixture, 0.3, 8000, torch.Generator().manual_seed(0))
    assert (whole - exact).max() > 0.05  # not knowing the component costs where it is unclear
    torch.testing.assert_close(mixed, 0.7 * floor + 0.3 * whole, atol=0.01, rtol=0)


@pytest.mark.parametrize("option", ["ancestral", "ddim", "dpm_solver", "unipc", "ode"])
def test_every_sampler_takes_labels_and_guidance(option: str) -> None:
    """Each sampler of the group, given labels through `generate` with the conditional oracle
    and s = 2: every sample on the component of its label (the mixture's classifier), one
    batched network call per step."""
    from ddpm.checkpoint import oracle_without_checkpoint
    from ddpm.config import group_option
    from ddpm.sampling import build_sampler, generate

    data = {"_target_": "ddpm.data.GaussianMixtureDataModule", "num_train": 10}
    backbone = {"_target_": "ddpm.truth.Oracle", "distribution": "data"}
    conditioning = {"name": "class", "drop_prob": 0.1}
    trained = oracle_without_checkpoint(data, backbone, None, 1000, None, None, conditioning)
    node = dict(group_option("sampler", option, "sampler"))
    if option not in ("ode", "ancestral"):  # ancestral: all 1000 steps (10 blur a component)
        node["steps"] = 10
    labels = torch.arange(64) % 8
    calls = []
    oracle_forward = trained.backbone.forward

    def counted(x, t, y=None):  # noqa: ANN001, ANN202
        calls.append(len(x))
        return oracle_forward(x, t, y=y)

    trained.backbone.forward = counted
    samples, _ = generate(trained, 64, 64, build_sampler(node), False, labels=labels,
                          guidance_scale=2.0)  # fmt: skip
    mixture = trained.datamodule.distribution()
    assert (mixture.classify(samples.double()) == labels).all()
    assert set(calls) == {128}  # conditional and null labels in one batch, every call


def test_evaluation_draws_the_classes_of_its_samples_as_the_data_has_them() -> None:
    """ddpm-eval's samples of a conditional model: classes i.i.d. from the training split's
    frequencies (binomial shares within 4 standard errors), reproducible from the seed."""
    from types import SimpleNamespace

    from ddpm.cli.evaluate import sample_labels

    labels = torch.tensor([0] * 700 + [1] * 200 + [2] * 100)
    trained = SimpleNamespace(num_classes=3, datamodule=SimpleNamespace(labels=lambda _: labels))
    y = sample_labels(trained, 20000, seed=0)
    shares = torch.bincount(y, minlength=3).double() / 20000
    expected = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    assert ((shares - expected).abs() < 4 * (expected * (1 - expected) / 20000).sqrt()).all()
    assert torch.equal(y, sample_labels(trained, 20000, seed=0))
    assert not torch.equal(y, sample_labels(trained, 20000, seed=1))
    assert sample_labels(SimpleNamespace(num_classes=None), 5, seed=0) is None
