"""Speed benchmarks, each a ratio measured side by side in this one process:

1. overhead     our DiffusionModule under Lightning's Trainer vs a plain PyTorch loop
                (same U-Net, batch, Adam, gradient clipping, EMA, data in memory)
2. diffusers    a training step with diffusers' UNet2DModel + DDPMScheduler.add_noise vs ours
                with our U-Net at the same size; ancestral sampling with DDPMScheduler vs our
                sample_loop, both driving the same (diffusers) network
3. utilisation  model FLOPs per step (torch.utils.flop_counter) / step time, against the
                machine's measured matmul rate (float32 on the CPU, bf16 on a GPU)
4. scaling      step time against batch size and image size; sampling time against steps
5. variants     (on a GPU, or with --variants) our training step under bf16 autocast,
                channels-last and torch.compile against float32; sampling with the network
                compiled (mode=reduce-overhead: CUDA graphs) against eager
6. parameterisation  1 and the sampler alone of 2 again with v/learned_range/hybrid, and its
                training step against eps/beta/simple on the same U-Net (bf16 on a GPU)
7. solvers      each sampler's own work (a network that costs nothing) against diffusers'
                matching scheduler on the same timesteps: DDIM (50 steps) vs DDIMScheduler,
                DPM-Solver++(2M) and SDE-DPM-Solver++(2M) (20 steps) vs
                DPMSolverMultistepScheduler; UniPC (10 steps, trailing) vs UniPCMultistepScheduler

    python benchmarks/run.py --device cpu --out results.json      # a few minutes on 2 cores
    python benchmarks/run.py --device cuda --out results.json     # CIFAR-10 sizes

Contenders are timed in turn (ABBA order), after `--warmup` untimed calls each, so that each pair
of times is taken under the same conditions; a ratio is the median of the per-pair ratios, given
with its quartiles. diffusers is optional (`pip install -e ".[bench]"`); without it, comparison 2
is skipped.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from ddpm.backbones import UNet
from ddpm.callbacks import EMA
from ddpm.diffusion import GaussianDiffusion
from ddpm.module import DiffusionModule
from ddpm.schedules import make_beta_schedule


@dataclass
class Size:
    """One problem size: images, batch, U-Net width, diffusion steps for sampling."""

    image_size: int
    channels: int
    batch: int
    base_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    num_groups: int
    attn: tuple[int, ...]
    sample_batch: int
    sample_steps: int


SIZES = {
    # digits-size (our default network) and a narrow CIFAR-shaped U-Net, for 2 CPU cores
    "cpu": {
        "digits": Size(8, 1, 128, 16, (1, 2, 2), 1, 8, (), 64, 50),
        "cifar-narrow": Size(32, 3, 16, 32, (1, 2, 2, 2), 2, 8, (16,), 8, 20),
    },
    # the paper's CIFAR-10 network and batch
    "cuda": {"cifar10": Size(32, 3, 128, 128, (1, 2, 2, 2), 2, 32, (16,), 256, 100)},
}
EMA_DECAY = 0.9999


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    """Seconds of one call of `fn`."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_time(fn: Callable[[], Any], warmup: int, repeats: int, device: str) -> float:
    """Median seconds of `fn()` over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device) for _ in range(repeats))


def paired(
    contenders: dict[str, Callable[[], Any]], warmup: int, repeats: int, device: str
) -> dict[str, list[float]]:
    """Seconds per call of each contender, called in turn (ABBA order) so that each pair of
    times is taken under the same conditions of a shared machine."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    items = list(contenders.items())
    for i in range(repeats):
        for name, fn in items if i % 2 == 0 else reversed(items):
            times[name].append(timed(fn, device))
    return times


def ratio_of_pairs(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """The median and quartiles of the per-pair ratios numerator[i] / denominator[i]."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator, strict=True))
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return {"ratio": median, "q1": q1, "q3": q3, "pairs": len(ratios)}


# (prediction, variance, loss): the paper's default, and Improved DDPM's with v-prediction
PARAMETERISATIONS = {
    "eps/beta/simple": ("eps", "beta", "simple"),
    "v/learned_range/hybrid": ("v", "learned_range", "hybrid"),
}


def make_diffusion(parameterisation: str = "eps/beta/simple") -> GaussianDiffusion:
    prediction, variance, loss = PARAMETERISATIONS[parameterisation]
    return GaussianDiffusion(make_beta_schedule("linear", 1000), variance, prediction, loss)


def our_unet(size: Size, learned_variance: bool = False) -> UNet:
    return UNet(
        out_channels=size.channels * (2 if learned_variance else 1),
        in_channels=size.channels,
        image_size=size.image_size,
        base_channels=size.base_channels,
        channel_mult=size.channel_mult,
        num_res_blocks=size.num_res_blocks,
        attn_resolutions=tuple(a for a in size.attn if a <= size.image_size),
        dropout=0.1,
        num_groups=size.num_groups,
    )


def diffusers_unet(size: Size) -> torch.nn.Module:
    """diffusers' UNet2DModel laid out as the paper's CIFAR-10 network (google/ddpm-cifar10-32),
    at this size's width."""
    from diffusers import UNet2DModel

    c = size.base_channels
    return UNet2DModel(
        sample_size=size.image_size,
        in_channels=size.channels,
        out_channels=size.channels,
        block_out_channels=(c, 2 * c, 2 * c, 2 * c),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        attention_head_dim=None,
        norm_num_groups=size.num_groups,
        dropout=0.1,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_eps=1e-6,
        downsample_padding=0,
    )


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def data(size: Size, n_batches: int) -> torch.Tensor:
    return (
        torch.rand(size.batch * n_batches, size.channels, size.image_size, size.image_size) * 2 - 1
    )


def loader(size: Size, n_batches: int) -> DataLoader:
    """In-memory images, as a DataLoader over a TensorDataset."""
    return DataLoader(TensorDataset(data(size, n_batches)), batch_size=size.batch)


def plain_loop(
    size: Size, device: str, n_batches: int, parameterisation: str = "eps/beta/simple"
) -> Callable[[], None]:
    """What a researcher writes by hand: the same U-Net, L_simple, Adam, clipping at 1.0 and an
    EMA of the weights (torch._foreach_lerp_), over a DataLoader of in-memory images. Each call
    fetches the next batch and takes one step. Another parameterisation's objective is our
    `GaussianDiffusion.training_loss` (so only the training loop around it differs)."""
    torch.manual_seed(0)
    diffusion = make_diffusion(parameterisation).to(device)
    net = our_unet(size, diffusion.learned_variance).to(device)
    ema = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, foreach=True)
    abar = torch.cumprod(1 - make_beta_schedule("linear", 1000), 0).float().to(device)
    batches = iter(loader(size, n_batches))

    def step() -> None:
        (x0,) = next(batches)
        x0 = x0.to(device, non_blocking=True)
        if parameterisation == "eps/beta/simple":
            t = torch.randint(0, 1000, (x0.shape[0],), device=device)
            noise = torch.randn_like(x0)
            a = abar[t].view(-1, 1, 1, 1)
            loss = F.mse_loss(net(a.sqrt() * x0 + (1 - a).sqrt() * noise, t), noise)
        else:  # L_0 as our module computes it without a data module: continuous
            loss = diffusion.training_loss(net, x0, num_levels=None).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, list(net.parameters()), 1 - EMA_DECAY)

    return step


def plain_loop_step_times(size: Size, device: str, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` plain-loop steps after `warmup` steps."""
    step = plain_loop(size, device, warmup + repeats)
    for _ in range(warmup):
        step()
    return [timed(step, device) for _ in range(repeats)]


class Interleaved(pl.Callback):
    """Runs one plain-loop step before each of Lightning's training steps and times both: ours
    from one `on_train_batch_start` to the next (Lightning's hooks, our training step, the
    optimizer, the EMA callback and the next batch's fetch), the plain one with its own fetch."""

    def __init__(self, plain_step: Callable[[], None], device: str) -> None:
        self.plain_step, self.device = plain_step, device
        self.times: dict[str, list[float]] = {"plain": [], "ours": []}
        self.start: float | None = None

    def _lap(self) -> None:
        sync(self.device)
        if self.start is not None:
            self.times["ours"].append(time.perf_counter() - self.start)

    def on_train_batch_start(self, *args: Any) -> None:
        self._lap()
        self.times["plain"].append(timed(self.plain_step, self.device))
        self.start = time.perf_counter()

    def on_train_end(self, *args: Any) -> None:
        self._lap()


def overhead(
    size: Size, device: str, warmup: int, repeats: int, parameterisation: str = "eps/beta/simple"
) -> dict[str, Any]:
    """Our DiffusionModule under Lightning's Trainer, set up as conf/ sets it up (foreach Adam,
    our EMA callback, clipping, logging every 50 steps), against the plain loop, one step of
    each in turn within one `fit`, both with `parameterisation`."""
    steps = warmup + repeats
    interleaved = Interleaved(plain_loop(size, device, steps, parameterisation), device)
    torch.manual_seed(0)
    diffusion = make_diffusion(parameterisation)
    adam = functools.partial(torch.optim.Adam, lr=2e-4, foreach=True)
    module = DiffusionModule(our_unet(size, diffusion.learned_variance), diffusion, adam)
    trainer = pl.Trainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        max_steps=steps,
        gradient_clip_val=1.0,
        callbacks=[EMA(decay=EMA_DECAY, use_buffers=False), interleaved],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=50,
    )
    trainer.fit(module, train_dataloaders=loader(size, steps))
    plain, ours = (interleaved.times[k][warmup:] for k in ("plain", "ours"))
    return {
        "plain_seconds": statistics.median(plain),
        "lightning_seconds": statistics.median(ours),
        **ratio_of_pairs(ours, plain),
    }


def diffusers_training(size: Size, device: str, warmup: int, repeats: int) -> dict[str, Any]:
    """One training step (forward, L_simple, backward, Adam) with each library's U-Net and
    noising: diffusers' UNet2DModel + DDPMScheduler.add_noise vs our UNet + training_loss."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 1000), "beta").to(device)
    x0 = data(size, 1).to(device)
    steps: dict[str, Callable[[], None]] = {}
    params: dict[str, int] = {}
    for name in ("diffusers", "ours"):
        torch.manual_seed(0)
        net = (diffusers_unet(size) if name == "diffusers" else our_unet(size)).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=2e-4, foreach=True)

        def step(net: torch.nn.Module = net, opt: torch.optim.Optimizer = opt, name=name) -> None:
            if name == "diffusers":
                noise = torch.randn_like(x0)
                t = torch.randint(0, 1000, (x0.shape[0],), device=device)
                x_t = scheduler.add_noise(x0, noise, t)
                loss = F.mse_loss(net(x_t, t).sample, noise)
            else:
                loss = diffusion.training_loss(net, x0).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[name], params[name] = step, count(net)
    times = paired(steps, warmup, repeats, device)
    return {
        **{
            name: {"params": params[name], "images_per_sec": size.batch / statistics.median(t)}
            for name, t in times.items()
        },
        # images/s ours over theirs: their seconds over ours
        **ratio_of_pairs(times["diffusers"], times["ours"]),
    }


def diffusers_sampling(
    size: Size,
    device: str,
    repeats: int,
    network: str = "unet",
    parameterisation: str = "eps/beta/simple",
) -> dict[str, Any]:
    """Ancestral sampling of `sample_batch` images for `sample_steps` steps of a T = 1000 chain,
    both samplers driving the same network: DDPMScheduler.step (what DDPMPipeline runs) vs our
    sample_loop. `network="unet"` is diffusers' U-Net; `"none"` returns its input scaled, so
    that only the samplers' own work is timed (with v/learned_range: the scaled input and a
    variance value, for DDPMScheduler with prediction_type=v_prediction and
    variance_type=learned_range)."""
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    learned = parameterisation != "eps/beta/simple"
    if network == "unet":
        unet = diffusers_unet(size).to(device).eval()

        def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return unet(x, t).sample

    elif learned:

        def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return torch.cat([0.5 * x, 0.1 * x], dim=1)

    else:

        def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return 0.5 * x

    K = size.sample_steps if network == "unet" else 1000
    shape = (size.sample_batch, size.channels, size.image_size, size.image_size)
    kinds = {"prediction_type": "v_prediction", "variance_type": "learned_range"}
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        clip_sample=True,
        **(kinds if learned else {}),
    )
    diffusion = make_diffusion(parameterisation).respace(K).to(device)

    @torch.no_grad()
    def theirs() -> None:
        scheduler.set_timesteps(K)
        x = torch.randn(shape, device=device)
        for t in scheduler.timesteps:
            x = scheduler.step(net(x, t), t, x).prev_sample

    @torch.no_grad()
    def ours() -> None:
        diffusion.sample_loop(net, shape, clip_denoised=True)

    times = paired({"diffusers": theirs, "ours": ours}, 1, repeats, device)
    return {
        "steps": K,
        "images": size.sample_batch,
        "seconds": {name: statistics.median(t) for name, t in times.items()},
        # speed ours over theirs: their seconds over ours
        **ratio_of_pairs(times["diffusers"], times["ours"]),
    }


def diffusers_solvers(size: Size, device: str, repeats: int) -> dict[str, Any]:
    """Comparison 7: our DDIM and DPMSolver against diffusers' DDIMScheduler and
    DPMSolverMultistepScheduler on the same T = 1000 linear chain, the same timesteps and
    `sample_batch` images, the network returning its input scaled (so only the samplers' own
    work is timed); the ratio is diffusers' seconds over ours."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    from ddpm.samplers import DDIM, DPMSolver, UniPC

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * x

    shape = (size.sample_batch, size.channels, size.image_size, size.image_size)
    diffusion = make_diffusion().to(device)
    results: dict[str, Any] = {}
    for name, ours, make in (
        ("ddim", DDIM(steps=50), lambda: DDIMScheduler(timestep_spacing="linspace")),
        ("dpm_solver", DPMSolver(steps=20), lambda: DPMSolverMultistepScheduler(
            final_sigmas_type="zero", lower_order_final=True)),
        ("dpm_solver_sde", DPMSolver(steps=20, stochastic=True),
         lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++",
                                             final_sigmas_type="zero", lower_order_final=True)),
        ("unipc", UniPC(steps=10, spacing="trailing"),
         lambda: UniPCMultistepScheduler(timestep_spacing="trailing", final_sigmas_type="zero")),
    ):  # fmt: skip
        timesteps = ours.timesteps(diffusion).tolist()
        scheduler = make()

        @torch.no_grad()
        def theirs(scheduler=scheduler, timesteps=timesteps) -> None:
            if isinstance(scheduler, (DDIMScheduler, UniPCMultistepScheduler)):
                scheduler.set_timesteps(len(timesteps))  # the same steps as ours
            else:
                scheduler.set_timesteps(timesteps=timesteps)
            x = torch.randn(shape, device=device)
            for t in scheduler.timesteps:
                x = scheduler.step(net(x, t), t, x).prev_sample

        @torch.no_grad()
        def mine(ours=ours) -> None:
            ours.sample(net, diffusion, torch.randn(shape, device=device))

        times = paired({"diffusers": theirs, "ours": mine}, 1, repeats, device)
        results[name] = {
            "steps": len(timesteps),
            "seconds": {k: statistics.median(v) for k, v in times.items()},
            **ratio_of_pairs(times["diffusers"], times["ours"]),
        }
    return results


VARIANTS = {
    # name: (bf16 autocast, channels-last, torch.compile options or None)
    "fp32": (False, False, None),
    "bf16": (True, False, None),
    "bf16+channels_last": (True, True, None),
    "bf16+compile": (True, False, {}),
}


def training_variants(size: Size, device: str, warmup: int, repeats: int) -> dict[str, Any]:
    """Our U-Net's training step (L_simple, backward, Adam) in float32 against bf16 autocast,
    bf16 with channels-last tensors, and bf16 with the backbone compiled (Inductor)."""
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 1000), "beta").to(device)
    steps: dict[str, Callable[[], None]] = {}
    for name, (bf16, channels_last, compile_options) in VARIANTS.items():
        torch.manual_seed(0)
        net = our_unet(size).to(device)
        x0 = data(size, 1).to(device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
            x0 = x0.contiguous(memory_format=torch.channels_last)
        if compile_options is not None:
            net.compile(**compile_options)
        opt = torch.optim.Adam(net.parameters(), lr=2e-4, foreach=True)

        def step(net=net, x0=x0, opt=opt, bf16=bf16) -> None:
            with torch.autocast(device.split(":")[0], torch.bfloat16, enabled=bf16):
                loss = diffusion.training_loss(net, x0).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[name] = step
    times = paired(steps, warmup, repeats, device)
    return {
        name: {
            "images_per_sec": size.batch / statistics.median(times[name]),
            # speed-up over float32: its seconds over this variant's
            **ratio_of_pairs(times["fp32"], times[name]),
        }
        for name in steps
    }


def parameterisation_cost(
    size: Size, device: str, warmup: int, repeats: int, bf16: bool = False
) -> dict[str, Any]:
    """Our U-Net's training step (objective, backward, Adam) with v/learned_range/hybrid (2C
    output channels, the bound's term in float32) against eps/beta/simple, optionally under bf16
    autocast."""
    x0 = data(size, 1).to(device)
    steps: dict[str, Callable[[], None]] = {}
    for name in PARAMETERISATIONS:
        torch.manual_seed(0)
        diffusion = make_diffusion(name).to(device)
        net = our_unet(size, diffusion.learned_variance).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=2e-4, foreach=True)

        def step(net=net, opt=opt, diffusion=diffusion) -> None:
            with torch.autocast(device.split(":")[0], torch.bfloat16, enabled=bf16):
                loss = diffusion.training_loss(net, x0, num_levels=256).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[name] = step
    times = paired(steps, warmup, repeats, device)
    eps, v = times["eps/beta/simple"], times["v/learned_range/hybrid"]
    return {"bf16": bf16, **ratio_of_pairs(v, eps)}


def sampling_variants(size: Size, device: str, repeats: int) -> dict[str, Any]:
    """Our sample_loop with the U-Net eager against the U-Net compiled with
    mode=reduce-overhead (CUDA graphs on a GPU), what `ddpm-sample compile=...` does."""
    shape = (size.sample_batch, size.channels, size.image_size, size.image_size)
    chain = GaussianDiffusion(make_beta_schedule("linear", 1000), "beta")
    chain = chain.respace(size.sample_steps).to(device)
    chains: dict[str, Callable[[], None]] = {}
    for name, options in (("eager", None), ("compiled", {"mode": "reduce-overhead"})):
        torch.manual_seed(0)
        net = our_unet(size).to(device).eval()
        if options is not None:
            net.compile(**options)
        chains[name] = functools.partial(chain.sample_loop, net, shape)
    times = paired(chains, 1, repeats, device)
    return {
        "steps": size.sample_steps,
        "images": size.sample_batch,
        "seconds": {name: statistics.median(t) for name, t in times.items()},
        **ratio_of_pairs(times["eager"], times["compiled"]),
    }


def matmul_rate(device: str) -> float:
    """FLOP/s of a large matmul (float32 on the CPU, bf16 on a GPU): a practical peak."""
    n = 2048 if device == "cpu" else 8192
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = median_time(lambda: a @ b, 2, 5, device)
    return 2 * n**3 / seconds


def training_flops(size: Size) -> int:
    """FLOPs of one forward and backward pass of our U-Net on a batch (counted on the CPU)."""
    net = our_unet(size)
    x = torch.randn(size.batch, size.channels, size.image_size, size.image_size)
    t = torch.randint(0, 1000, (size.batch,))
    with FlopCounterMode(display=False) as counter:
        net(x, t).square().mean().backward()
    return counter.get_total_flops()


def scaling(size: Size, device: str, warmup: int, repeats: int) -> dict[str, Any]:
    """Plain-loop step time against batch size and image size, our sampling time against steps."""
    by_batch = {}
    for batch in (size.batch // 2, size.batch, size.batch * 2):
        s = Size(**{**size.__dict__, "batch": batch})
        by_batch[batch] = statistics.median(plain_loop_step_times(s, device, warmup, repeats))
    by_image = {}
    for image_size in (size.image_size // 2, size.image_size, size.image_size * 2):
        s = Size(**{**size.__dict__, "image_size": image_size})
        by_image[image_size] = statistics.median(plain_loop_step_times(s, device, warmup, repeats))
    net = our_unet(size).to(device).eval()
    shape = (size.sample_batch, size.channels, size.image_size, size.image_size)
    base = GaussianDiffusion(make_beta_schedule("linear", 1000), "beta")
    by_steps = {}
    for steps in (size.sample_steps // 2, size.sample_steps, size.sample_steps * 2):
        chain = base.respace(steps).to(device)
        by_steps[steps] = median_time(
            lambda chain=chain: chain.sample_loop(net, shape), 1, max(1, repeats // 5), device
        )
    return {
        "step_seconds_by_batch": by_batch,
        "step_seconds_by_image_size": by_image,
        "sampling_seconds_by_steps": by_steps,
    }


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def row(rows: list, size: str, what: str, result: dict[str, float]) -> None:
    rows.append((size, what, result["ratio"], result["q1"], result["q3"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", default="results.json")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=40, help="pairs of training steps")
    parser.add_argument("--chains", type=int, default=10, help="pairs of sampling chains")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--sizes", nargs="*", default=None, help="a subset of the sizes")
    parser.add_argument(
        "--variants",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="5: bf16, channels-last and torch.compile (default: on a GPU only)",
    )
    args = parser.parse_args()
    device = args.device
    unknown = set(args.sizes or ()) - set(SIZES[device])
    if unknown:
        parser.error(
            f"--sizes {' '.join(sorted(unknown))} unknown for --device {device}: allowed are "
            f"{', '.join(SIZES[device])}."
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "sizes": {},
    }
    peak = matmul_rate(device)
    results["matmul_flops_per_sec"] = peak
    rows: list[tuple[str, str, float, float, float]] = []
    for name, size in SIZES[device].items():
        if args.sizes and name not in args.sizes:
            continue
        out: dict[str, Any] = {"size": size.__dict__}
        out["overhead"] = overhead(size, device, args.warmup, args.repeats)
        row(rows, name, "overhead: ours (Lightning) / plain step time", out["overhead"])
        v = "v/learned_range/hybrid"
        out["overhead_v"] = overhead(size, device, args.warmup, args.repeats, v)
        row(rows, name, "overhead, v/learned_range: ours / plain step", out["overhead_v"])
        out["parameterisation"] = parameterisation_cost(
            size, device, args.warmup, args.repeats, bf16=device == "cuda"
        )
        precision = "bf16" if device == "cuda" else "fp32"
        what = f"training ({precision}): v/learned_range / eps/beta time"
        row(rows, name, what, out["parameterisation"])
        flops = training_flops(size)
        achieved = flops / out["overhead"]["lightning_seconds"]
        out["utilisation"] = {
            "flops_per_step": flops,
            "achieved_flops_per_sec": achieved,
            "fraction_of_matmul_rate": achieved / peak,
        }
        rows.append((name, "utilisation: model FLOP/s / matmul FLOP/s", achieved / peak, 0, 0))
        try:
            import diffusers  # noqa: F401
        except ImportError:
            print("diffusers is not installed: comparison 2 skipped (pip install -e '.[bench]')")
        else:
            if size.image_size == 32:
                out["diffusers"] = {
                    "training": diffusers_training(size, device, args.warmup, args.repeats),
                    "sampling": diffusers_sampling(size, device, args.chains),
                    "sampler_alone": diffusers_sampling(size, device, args.chains, "none"),
                    "sampler_alone_v": diffusers_sampling(
                        size, device, args.chains, "none", "v/learned_range/hybrid"
                    ),
                }
                out["diffusers"]["solvers"] = diffusers_solvers(size, device, args.chains)
                for key, result in out["diffusers"]["solvers"].items():
                    row(rows, name, f"{key} alone (no network): diffusers / ours", result)
                for key, what in (
                    ("training", "training: ours / diffusers images/s"),
                    ("sampling", "sampling: diffusers / ours seconds"),
                    ("sampler_alone", "sampler alone (no network): diffusers / ours"),
                    ("sampler_alone_v", "sampler alone, v/learned_range: diffusers / ours"),
                ):
                    row(rows, name, what, out["diffusers"][key])
        if args.variants if args.variants is not None else device == "cuda":
            out["variants"] = {
                "training": training_variants(size, device, args.warmup, args.repeats),
                "sampling": sampling_variants(size, device, args.chains),
            }
            for variant, result in out["variants"]["training"].items():
                if variant != "fp32":
                    row(rows, name, f"training: {variant} / fp32 speed", result)
            row(rows, name, "sampling: compiled / eager speed", out["variants"]["sampling"])
        out["scaling"] = scaling(size, device, args.warmup, max(3, args.repeats // 4))
        results["sizes"][name] = out
    print(f"\n{'size':<14} {'comparison':<48} {'ratio':>7} {'quartiles':>15}")
    for name, what, ratio, q1, q3 in rows:
        spread = f"{q1:6.3f}-{q3:.3f}" if q3 else ""
        print(f"{name:<14} {what:<48} {ratio:7.3f} {spread:>15}")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
