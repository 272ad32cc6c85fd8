"""Every parameterisation of the reverse process (prediction, variance, loss) against
independent float64 computations from the closed forms, importance sampling of t against the
uniform estimate, and the samplers with each of them."""

import collections
import math

import numpy as np
import pytest
import torch

from ddpm.diffusion import PREDICTIONS, GaussianDiffusion, ImportanceTimesteps
from ddpm.schedules import make_beta_schedule

T = 40


def closed_forms(betas: np.ndarray) -> dict[str, np.ndarray]:
    """abar, abar_prev, the posterior's coefficients and variance (eqs. 6-7), SNR; [T, 1]."""
    ab = np.cumprod(1 - betas)
    abp = np.append(1.0, ab[:-1])
    forms = {
        "b": betas,
        "ab": ab,
        "abp": abp,
        "coef1": np.sqrt(abp) * betas / (1 - ab),
        "coef2": np.sqrt(1 - betas) * (1 - abp) / (1 - ab),
        "tilde": (1 - abp) / (1 - ab) * betas,
        "snr": ab / (1 - ab),
    }
    return {k: v[:, None] for k, v in forms.items()}


def draws(shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]


def x0_implied(prediction: str, out: np.ndarray, x_t: np.ndarray, f: dict) -> np.ndarray:
    """x_0 from a prediction, by the closed forms (eq. 4, eq. 7 inverted, v's definition)."""
    if prediction == "eps":
        return (x_t - np.sqrt(1 - f["ab"]) * out) / np.sqrt(f["ab"])
    if prediction == "x0":
        return out
    if prediction == "mean":
        return (out - f["coef2"] * x_t) / f["coef1"]
    return np.sqrt(f["ab"]) * x_t - np.sqrt(1 - f["ab"]) * out


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_each_target_and_its_conversions_follow_the_closed_forms(prediction: str) -> None:
    betas = make_beta_schedule("cosine", T).numpy()
    f = closed_forms(betas)
    d = GaussianDiffusion(torch.from_numpy(betas), prediction=prediction)
    x0, noise, _ = draws((T, 5), 0)
    t = torch.arange(T)
    x_t = np.sqrt(f["ab"]) * x0.numpy() + np.sqrt(1 - f["ab"]) * noise.numpy()
    mu = f["coef1"] * x0.numpy() + f["coef2"] * x_t
    expected = {
        "eps": noise.numpy(),
        "x0": x0.numpy(),
        "mean": mu,
        "v": np.sqrt(f["ab"]) * noise.numpy() - np.sqrt(1 - f["ab"]) * x0.numpy(),
    }[prediction]
    torch.testing.assert_close(d.q_sample(x0, t, noise).numpy(), x_t, rtol=1e-12, atol=1e-12)
    target = d.loss_target(x0, torch.from_numpy(x_t), t, noise)
    np.testing.assert_allclose(target.numpy(), expected, rtol=1e-10, atol=1e-12)
    # Given back as the network's output, the target recovers x_0, the posterior mean, eps.
    mean, _, _, pred_x0 = d.p_mean_variance(target, torch.from_numpy(x_t), t)
    np.testing.assert_allclose(pred_x0.numpy(), x0.numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(mean.numpy(), mu, rtol=1e-10, atol=1e-12)
    eps = d.predict_eps_from_x0(torch.from_numpy(x_t), t, pred_x0)
    np.testing.assert_allclose(eps.numpy(), noise.numpy(), rtol=1e-7, atol=1e-8)
    # Any output: the predicted x_0 is the closed form's.
    out = torch.randn(T, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    np.testing.assert_allclose(
        d.predict_x0(out, torch.from_numpy(x_t), t).numpy(),
        x0_implied(prediction, out.numpy(), x_t, f),
        rtol=1e-10,
        atol=1e-10,
    )


def test_learned_range_spans_beta_tilde_to_beta_on_any_chain() -> None:
    betas = make_beta_schedule("linear", T).numpy()
    d = GaussianDiffusion(torch.from_numpy(betas), variance="learned_range", loss="hybrid")
    for chain in (d, d.respace(7)):
        f = closed_forms(chain.betas.numpy())
        clipped = f["tilde"].copy()
        clipped[0] = clipped[1]  # log beta_tilde clipped at t = 0 by its value at t = 1
        n = chain.num_timesteps
        x, t = torch.zeros(n, 3, dtype=torch.float64), torch.arange(n)
        low = chain.model_log_variance_from(-torch.ones_like(x), x, t)
        high = chain.model_log_variance_from(torch.ones_like(x), x, t)
        middle = chain.model_log_variance_from(torch.zeros_like(x), x, t)
        np.testing.assert_allclose(low.numpy(), np.log(clipped).repeat(3, 1), rtol=1e-12)
        np.testing.assert_allclose(high.numpy(), np.log(f["b"]).repeat(3, 1), rtol=1e-12)
        geometric = 0.5 * (np.log(clipped) + np.log(f["b"]))
        np.testing.assert_allclose(middle.numpy(), geometric.repeat(3, 1), rtol=1e-12)
    learned = GaussianDiffusion(torch.from_numpy(betas), variance="learned", loss="vlb")
    out = torch.randn(T, 6, dtype=torch.float64)
    _, variance, log_variance, _ = learned.p_mean_variance(out, torch.zeros(T, 3), torch.arange(T))
    assert torch.equal(log_variance, out[:, 3:])
    torch.testing.assert_close(variance, out[:, 3:].exp())


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("weighting", ["none", "snr", "min_snr"])
def test_weighting_is_in_x0_units(prediction: str, weighting: str) -> None:
    """snr: the error of the implied x_0 times SNR_t; min_snr: times min(SNR_t, 5); none: the
    plain squared error against the prediction's own target."""
    betas = make_beta_schedule("linear", T).numpy()
    f = closed_forms(betas)
    d = GaussianDiffusion(torch.from_numpy(betas), prediction=prediction, weighting=weighting)
    x0, noise, out = draws((T, 4), 1)
    t = torch.arange(T)
    loss = d.training_loss(lambda x, tt: out, x0, t, noise)
    x_t = np.sqrt(f["ab"]) * x0.numpy() + np.sqrt(1 - f["ab"]) * noise.numpy()
    if weighting == "none":
        target = d.loss_target(x0, torch.from_numpy(x_t), t, noise).numpy()
        expected = ((target - out.numpy()) ** 2).mean(1)
    else:
        error = ((x0_implied(prediction, out.numpy(), x_t, f) - x0.numpy()) ** 2).mean(1)
        snr = f["snr"][:, 0]
        expected = (snr if weighting == "snr" else np.minimum(snr, 5.0)) * error
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-8)


def test_vlb_loss_is_T_times_the_bound_term_in_closed_form() -> None:
    """loss=vlb with a learned variance: T KL(q(x_{t-1}|x_t,x_0) || p) in bits/dim for t > 0,
    and T times the decoder's -log N(x_0; mu, sigma^2) at t = 0 (data on a continuum)."""
    betas = make_beta_schedule("cosine", T).numpy()
    f = closed_forms(betas)
    d = GaussianDiffusion(torch.from_numpy(betas), variance="learned", prediction="x0", loss="vlb")
    x0, noise, out = draws((T, 3), 2)
    out = torch.cat([out, 0.3 * out.flip(0) - 4.0], dim=1)  # x_0, then log sigma^2
    t = torch.arange(T)
    loss = d.training_loss(lambda x, tt: out, x0, t, noise, num_levels=None)
    x_t = np.sqrt(f["ab"]) * x0.numpy() + np.sqrt(1 - f["ab"]) * noise.numpy()
    q_mean = f["coef1"] * x0.numpy() + f["coef2"] * x_t
    p_mean = f["coef1"] * out[:, :3].numpy() + f["coef2"] * x_t
    log_var = out[:, 3:].numpy()
    q_var = np.where(np.arange(T)[:, None] == 0, f["tilde"][1], f["tilde"])
    kl = 0.5 * (log_var - np.log(q_var) - 1 + (q_var + (q_mean - p_mean) ** 2) / np.exp(log_var))
    nll = 0.5 * (np.log(2 * np.pi) + log_var + (x0.numpy() - p_mean) ** 2 / np.exp(log_var))
    expected = T * np.where(np.arange(T) == 0, nll.mean(1), kl.mean(1)) / math.log(2)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-9)


def test_hybrid_loss_reaches_the_mean_only_through_l_simple() -> None:
    betas = make_beta_schedule("linear", T)
    d = GaussianDiffusion(betas, variance="learned_range", loss="hybrid", vlb_weight=1e-3)
    g = torch.Generator().manual_seed(3)
    x0 = (torch.randint(0, 256, (T, 2, 3), generator=g) / 127.5 - 1).double()
    noise = torch.randn(T, 2, 3, generator=g, dtype=torch.float64)
    out = torch.randn(T, 4, 3, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.arange(T)
    d.training_loss(lambda x, tt: out, x0, t, noise).sum().backward()
    # d/d eps_theta of mean over 6 dimensions of (eps - eps_theta)^2, and nothing else
    expected = -2 * (noise - out[:, :2].detach()) / 6
    torch.testing.assert_close(out.grad[:, :2], expected, rtol=1e-12, atol=1e-14)
    # the variance learns from vlb_weight * T * L_t alone (its own computation, in float64)
    values = out[:, 2:].detach().clone().requires_grad_()
    x_t = d.q_sample(x0, t, noise)
    vb = d.vb_terms_bpd(torch.cat([out[:, :2].detach(), values], 1), x0, x_t, t, 256)
    (1e-3 * T * vb).sum().backward()
    assert values.grad.abs().min() > 0
    torch.testing.assert_close(out.grad[:, 2:], values.grad, rtol=1e-5, atol=1e-9)
    # with loss=vlb the bound does reach the mean
    vlb = GaussianDiffusion(betas, variance="learned_range", loss="vlb")
    out.grad = None
    vlb.training_loss(lambda x, tt: out, x0, t, noise).sum().backward()
    assert out.grad[1:, :2].abs().min() > 0


def test_importance_history_keeps_the_last_losses_of_each_t() -> None:
    """The on-device ring buffer against a per-t deque of the losses in order of arrival."""
    steps, history = 7, 3
    sampler = ImportanceTimesteps(steps, history=history)
    brute = collections.defaultdict(lambda: collections.deque(maxlen=history))
    g = torch.Generator().manual_seed(4)
    for batch in (5, 40, 1, 13, 40):
        t = torch.randint(0, steps, (batch,), generator=g)
        losses = torch.rand(batch, generator=g, dtype=torch.float64)
        sampler.update(t, losses)
        for ti, li in zip(t.tolist(), losses.tolist(), strict=True):
            brute[ti].append(li)
        for ti in range(steps):
            held = sorted(sampler.losses[ti, : int(sampler.counts[ti])].tolist())
            assert held == sorted(brute[ti]), ti
    w = np.array([np.sqrt(np.mean(np.square(brute[ti]))) for ti in range(steps)])
    p = w / w.sum() * (1 - 1e-3) + 1e-3 / steps
    np.testing.assert_allclose(sampler.probabilities().numpy(), p, rtol=1e-12)


def test_importance_sampling_is_unbiased_and_lowers_the_variance() -> None:
    """The mean of w_t L_t (w_t = 1 / (T p_t)) over t ~ p estimates what the mean of L_t over
    uniform t does, (1/T) sum_t E[L_t], here of the bound's terms of a network with a known
    error. The uniform estimate is stratified (1000 draws of every t; they also fill the
    history); 20000 importance draws must agree with it within 4 standard errors of the
    difference (a 5% error in one t's weight is about 6), and scatter less than uniform draws."""
    steps, n = 20, 20000
    d = GaussianDiffusion(torch.linspace(1e-3, 0.2, steps, dtype=torch.float64), loss="vlb")
    g = torch.Generator().manual_seed(5)
    x0 = torch.randint(0, 17, (n, 3), generator=g) / 8.0 - 1

    def bound_terms(t: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=g)
        model = lambda x, tt: noise + 0.2 * torch.tanh(3 * x)  # noqa: E731
        return d.training_loss(model, x0, t, noise, num_levels=17).double()

    sampler = ImportanceTimesteps(steps)
    strata = torch.arange(steps).repeat(n // steps)
    stratified = bound_terms(strata)
    sampler.update(strata, stratified)
    by_t = stratified.reshape(-1, steps)
    uniform, se_uniform = (
        by_t.mean().item(),
        by_t.var(0).sum().sqrt().item() / steps / math.sqrt(len(by_t)),
    )
    t, weights = sampler.sample(n, torch.device("cpu"), generator=g)
    assert 0.1 < sampler.probabilities().max() < 0.9  # far from uniform, and not one t
    weighted = bound_terms(t) * weights.double()
    se_weighted = weighted.std().item() / math.sqrt(n)
    difference = abs(uniform - weighted.mean().item())
    assert difference < 4 * math.hypot(se_uniform, se_weighted), (difference, se_weighted)
    assert weighted.std() < stratified.std()


def perfect_output(d: GaussianDiffusion, prediction: str, c: torch.Tensor, learned: bool):
    """The network that knows the data is the point c: its exact prediction on d's steps."""

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0 = c.expand_as(x).to(x.dtype)
        eps = (x - d._extract(d.sqrt_alphas_cumprod, t, x) * x0) / d._extract(
            d.sqrt_one_minus_alphas_cumprod, t, x
        )
        out = d.loss_target(x0, x, t, eps)
        return torch.cat([out, torch.zeros_like(out)], 1) if learned else out

    return model


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("variance", ["tilde_beta", "learned_range"])
def test_every_sampler_recovers_a_point_mass_with_every_prediction(prediction, variance) -> None:
    loss = "simple" if variance == "tilde_beta" else "vlb"
    d = GaussianDiffusion(make_beta_schedule("linear", 200), variance, prediction, loss)
    c = torch.tensor([0.25, -0.5])
    model = perfect_output(d, prediction, c, variance == "learned_range")
    r = d.respace(12)
    # each respaced step's mean is the respaced chain's posterior mean given c (eqs. 6-7)
    f = closed_forms(r.betas.numpy())
    x = torch.randn(12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.arange(12)
    mean = r.p_mean_variance(model(x, r.timestep_map[t]), x, t)[0]
    expected = f["coef1"] * c.double().numpy() + f["coef2"] * x.numpy()
    np.testing.assert_allclose(mean.numpy(), expected, rtol=1e-9, atol=1e-9)
    g = torch.Generator().manual_seed(0)
    for out in (
        d.sample_loop(model, (6, 2), generator=g, clip_denoised=False),
        r.sample_loop(model, (6, 2), generator=g, clip_denoised=False),
        r.ddim_sample_loop(model, (6, 2), eta=0.0, generator=g, clip_denoised=False),
        r.ddim_sample_loop(model, (6, 2), eta=1.0, generator=g, clip_denoised=True),
    ):
        torch.testing.assert_close(out, c.expand(6, 2), atol=2e-4, rtol=0)


# A short toy2d run (moons, T = 100): long enough for every parameterisation to learn the shape.
TOY = [
    "experiment=toy2d",
    "data.name=moons",
    "data.num_train=4000",
    "data.num_val=500",
    "data.num_test=1000",
    "timesteps=100",
    "trainer.max_steps=800",
    "backbone.hidden_dim=128",
    "model.optimizer.lr=2e-3",
    "trainer.val_check_interval=1600",
    "trainer.log_every_n_steps=10",
    "callbacks.samples.num_samples=16",
    "logger=csv",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "choice",
    [
        ["prediction=eps", "variance=learned_range", "loss=vlb", "loss.timesteps=importance"],
        ["prediction=x0", "variance=tilde_beta", "loss.weighting=min_snr"],
        # the paper's mu-tilde row with the true bound; a mean output learns slowest
        ["prediction=mean", "loss=vlb", "trainer.max_steps=1600"],
        ["prediction=v", "variance=learned_range", "loss=hybrid"],
    ],
    ids=lambda choice: choice[0],
)
def test_each_prediction_learns_the_moons(compose_cfg, choice: list[str]) -> None:
    """train/loss falls, and the samples are closer to held-out data (energy distance) than a
    Gaussian fitted to the training data."""
    import csv
    from pathlib import Path

    from ddpm.cli.train import build
    from ddpm.metrics import point_distances

    cfg = compose_cfg([*TOY, *choice])
    run = build(cfg)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    rows = csv.DictReader((Path(cfg.paths.output_dir) / "csv" / "metrics.csv").open())
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == cfg.trainer.max_steps // 10
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    samples = run.module.sample(1000, torch.Generator().manual_seed(0))
    data = run.datamodule
    energy = point_distances(samples, data.split("test"), data.second_draw(1000), data.train_data)
    energy = energy["energy_distance"]
    assert energy["model"] < energy["gaussian_baseline"], energy


def test_a_learned_variance_checkpoint_samples_and_evaluates(compose_cfg, tmp_path) -> None:
    """v with learned_range and the hybrid loss, end to end: its logs, the sample grid, the
    respaced and DDIM samplers with a trajectory, the full bound, and the refusals."""
    import csv
    from pathlib import Path

    from ddpm.checkpoint import load_trained
    from ddpm.cli.evaluate import evaluate
    from ddpm.cli.sample import sample
    from ddpm.cli.train import build

    choice = ["prediction=v", "variance=learned_range", "loss=hybrid"]
    cfg = compose_cfg(["experiment=smoke", *choice, "logger=csv"])
    run = build(cfg)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    folder = Path(cfg.paths.output_dir)
    ckpt = folder / "checkpoints" / "last.ckpt"
    stored = torch.load(ckpt, weights_only=True)["hyper_parameters"]["run_config"]
    assert stored["diffusion"]["prediction"] == "v" and stored["backbone"]["out_channels"] == 2
    assert (folder / "samples" / "step_0000004.png").is_file()
    rows = list(csv.DictReader((folder / "csv" / "metrics.csv").open()))
    for key in ("train/loss", "train/mse", "train/vb", "train/loss_q0", "val/loss"):
        assert any(r.get(key) for r in rows), key
    for i, overrides in enumerate(
        (["sampler.steps=5", "trajectory=true"], ["sampler=ddim", "sampler.steps=5"])
    ):
        out = tmp_path / f"sample{i}"
        sample(compose_cfg([f"ckpt_path={ckpt}", "num_samples=4", *overrides], "sample"), out)
        assert (out / "samples.png").is_file() and (out / "samples.npz").is_file()
    assert (tmp_path / "sample0" / "trajectory.png").is_file()
    eval_cfg = compose_cfg([f"ckpt_path={ckpt}", "max_examples=4", "logger=none"], "eval")
    metrics = evaluate(eval_cfg, tmp_path / "eval")
    assert metrics["variance"] == "learned_range" and 0 < metrics["bpd"] < 30
    # the bound is that of the learned variance: another (fixed) variance gives another value
    trained = load_trained(ckpt)
    x0 = trained.datamodule.split("test")[:4]
    bound = trained.diffusion.nll_bpd(trained.backbone, x0, 17, torch.Generator().manual_seed(0))
    fixed = GaussianDiffusion(trained.diffusion.betas, "beta", "v")
    fixed_bound = fixed.nll_bpd(
        lambda x, t: trained.backbone(x, t)[:, :1], x0, 17, torch.Generator().manual_seed(0)
    )
    assert not torch.allclose(bound["total_bpd"], fixed_bound["total_bpd"])
    with pytest.raises(ValueError, match=r"prediction=eps differs from the checkpoint's"):
        load_trained(ckpt, prediction="eps")
    with pytest.raises(ValueError, match=r"variance=beta differs .* \(allowed: learned_range\)"):
        load_trained(ckpt, variance="beta")
    assert load_trained(ckpt, variance="learned_range", prediction="v").diffusion.prediction == "v"


def test_importance_history_makes_a_resume_exact(compose_cfg, tmp_path) -> None:
    """loss.timesteps=importance, cosine T = 10 (warm after a step or two): a 6-step run
    continued to 12 steps takes the uninterrupted run's t, losses and final weights, to the bit;
    without the history in the checkpoint the continued run would draw t uniformly again."""
    import csv
    from pathlib import Path

    from ddpm.cli.train import build

    choice = ["experiment=smoke", "timesteps=10", "schedule=cosine", "prediction=v"]
    choice += ["variance=learned_range", "loss=vlb", "loss.timesteps=importance", "logger=csv"]
    choice += ["trainer.max_steps=12"]

    def fit(folder: Path, *extra: str) -> Path:
        cfg = compose_cfg([*choice, f"hydra.run.dir={folder}", *extra])
        with open_dict(cfg):
            cfg.paths.output_dir = str(folder)
        run = build(cfg)
        run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=run.ckpt_path)
        return folder

    def losses(folder: Path) -> list[str]:
        rows = csv.DictReader((folder / "csv" / "metrics.csv").open())
        return [r["train/loss"] for r in rows if r.get("train/loss")]

    from omegaconf import open_dict

    whole = fit(tmp_path / "whole")
    half = fit(tmp_path / "half", "trainer.max_steps=6")
    saved = torch.load(half / "checkpoints" / "last.ckpt", weights_only=True)
    assert bool((saved["importance_timesteps"]["counts"] == 10).all())  # warm when saved
    fit(half, f"ckpt_path={half / 'checkpoints' / 'last.ckpt'}")
    expected, got = losses(whole), losses(half)  # the half's 6 steps, then the continued 6
    assert len(expected) == 12 and got == expected
    final = torch.load(half / "checkpoints" / "last.ckpt", weights_only=True)
    reference = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    for name, value in final["state_dict"].items():
        assert torch.equal(value, reference["state_dict"][name]), name
    assert torch.equal(
        final["importance_timesteps"]["losses"], reference["importance_timesteps"]["losses"]
    )


def test_a_checkpoint_from_before_the_parameterisations_still_resumes(compose_cfg) -> None:
    """Keys an older checkpoint's config lacks (prediction, loss, ..., out_channels) stand for
    their defaults when resuming; a real difference is still refused by its key."""
    from omegaconf import OmegaConf

    from ddpm.checkpoint import check_same_model

    ours = OmegaConf.to_container(compose_cfg(["experiment=smoke"]), resolve=True)
    old = {"diffusion": dict(ours["diffusion"]), "backbone": dict(ours["backbone"])}
    for key in ("prediction", "loss", "vlb_weight", "weighting", "min_snr_gamma"):
        del old["diffusion"][key]
    del old["backbone"]["out_channels"]
    checkpoint = {"hyper_parameters": {"run_config": old}}
    check_same_model(ours, checkpoint, "old.ckpt")
    changed = OmegaConf.to_container(
        compose_cfg(["experiment=smoke", "prediction=x0"]), resolve=True
    )
    # the old checkpoint predicted eps, the default of the key it lacks
    with pytest.raises(ValueError, match=r"diffusion.prediction='x0' differs from 'eps'"):
        check_same_model(changed, checkpoint, "old.ckpt")
