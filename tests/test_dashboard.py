"""What a run shows: loss per quarter of the t-range, gradient norm, images per second, the
schedule plot and the denoising trajectory, in files and in the loggers."""

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import FAST
from PIL import Image

from ddpm.cli.train import build, train


def test_loss_quarters_are_window_means_per_quarter(compose_cfg) -> None:
    module = build(compose_cfg([*FAST, "timesteps=100"])).module
    logged: dict[str, torch.Tensor] = {}
    module.log = lambda key, value, **kwargs: logged.__setitem__(key, value)  # type: ignore
    g = torch.Generator().manual_seed(0)
    all_losses, all_t = [], []
    for step in range(3):  # one logging window: steps 0, 1, 2 (the last is logged)
        module._trainer = SimpleNamespace(log_every_n_steps=3, global_step=step)
        losses, t = torch.rand(50, generator=g), torch.randint(0, 100, (50,), generator=g)
        all_losses.append(losses), all_t.append(t)
        module._add_to_quarters(losses, t)
    module._log_quarters()
    losses, t = torch.cat(all_losses).double().numpy(), torch.cat(all_t).numpy()
    for q in range(4):  # quarter q holds t in [25q, 25q + 25)
        in_q = (t >= 25 * q) & (t < 25 * (q + 1))
        assert logged[f"train/loss_q{q}"].item() == pytest.approx(losses[in_q].mean(), rel=1e-6)
    assert module.quarter_stats.sum().item() == 0  # the window restarts after a logged step


def test_a_run_logs_the_dashboard_and_writes_its_figures(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg([*FAST, "trainer.max_steps=4", "callbacks.samples.trajectory_every=2"])
    train(cfg)
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    trained = [r for r in rows if r.get("train/loss")]
    assert len(trained) == 4
    for row in trained:
        quarters = [float(row[f"train/loss_q{q}"]) for q in range(4)]
        assert all(math.isfinite(v) and v > 0 for v in quarters)
        assert float(row["train/grad_norm"]) > 0
        assert float(row["train/images_per_sec"]) > 0
    assert (tmp_path / "schedule.png").is_file()
    # validations at steps 2 and 4: the trajectory at the 1st (and would be at the 3rd)
    trajectories = sorted(p.name for p in (tmp_path / "samples").glob("trajectory_*.png"))
    assert trajectories == ["trajectory_0000002.png"]
    strip = np.asarray(Image.open(tmp_path / "samples" / "trajectory_0000002.png"))
    assert strip.shape[1] > strip.shape[0]  # 10 times side by side


def test_grad_norm_is_the_norm_before_clipping(compose_cfg) -> None:
    module = build(compose_cfg([*FAST])).module
    logged = {}
    module.log = lambda key, value, **kwargs: logged.__setitem__(key, value)  # type: ignore
    module._trainer = SimpleNamespace(log_every_n_steps=1, global_step=0)
    for p in module.backbone.parameters():
        p.grad = torch.full_like(p, 2.0)
    module.on_before_optimizer_step(None)  # type: ignore[arg-type]
    n = sum(p.numel() for p in module.backbone.parameters())
    assert logged["train/grad_norm"].item() == pytest.approx(2.0 * math.sqrt(n), rel=1e-5)


def test_ema_with_buffers_averages_float_buffers_and_copies_integer_ones() -> None:
    import lightning.pytorch as pl

    from ddpm.callbacks import EMA

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)
            self.register_buffer("count", torch.tensor(999))
            self.register_buffer("scale", torch.tensor(1.0))

    net = Net()
    callback = EMA(decay=0.5, use_buffers=True)
    callback.setup(SimpleNamespace(), net, "fit")  # type: ignore[arg-type]
    callback._average_model.update_parameters(net)
    net.count.fill_(1001), net.scale.fill_(3.0)
    callback._average_model.update_parameters(net)
    averaged = callback._average_model.module
    assert averaged.scale.item() == 2.0  # 0.5 * 1 + 0.5 * 3
    assert averaged.count.item() == 1001  # a counter is copied, not averaged to 1000


def test_ema_callback_is_the_exponential_average_of_the_weights() -> None:
    """Our EMA (torch's foreach form) against the recurrence in float64: ema_0 = w_0, then
    ema_k = decay * ema_{k-1} + (1 - decay) * w_k."""
    import lightning.pytorch as pl

    from ddpm.callbacks import EMA

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3, 2)

    net = Net()
    callback = EMA(decay=0.9, use_buffers=False)
    callback.setup(SimpleNamespace(), net, "fit")  # type: ignore[arg-type]
    expected = [p.detach().double().clone() for p in net.parameters()]
    callback._average_model.update_parameters(net)  # as Lightning calls it; first: a copy
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        callback._average_model.update_parameters(net)
        expected = [
            0.9 * e + 0.1 * p.detach().double()
            for e, p in zip(expected, net.parameters(), strict=True)
        ]
    assert int(callback._average_model.n_averaged) == callback.updates == 6  # for checkpoints
    averaged = list(callback._average_model.module.parameters())
    for got, want in zip(averaged, expected, strict=True):
        assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-6)
