"""The exact likelihood of the probability-flow ODE (Song et al. 2021, section 4.3, appendix D.2).

The flow of `ddpm.samplers.ode`, dx/dlambda = v(x, lambda) = alpha (x0(x) - alpha x), carries a
data point x to x_T at the chain's last step; along the path d log p / dlambda = -div v
(the instantaneous change of variables, Chen et al. 2018), so

    log p(x) = log N(x_T; 0, I) + delta,   delta = integral from the data to lambda_T of div v,
    div v = alpha div x0 - alpha^2 D,

x and delta integrated together by one adaptive solve (`ode_nll`). The divergence is exact
(autograd, one backward pass per dimension) or Hutchinson's unbiased estimate with Rademacher
probes held fixed along the path (Grathwohl et al. 2019). The flow starts at the data point
itself (at sigma = 1e-4, `SIGMA_AT_DATA`, below the chain's first step) and ends at the chain's
last step, where N(0, I) is the prior, as in the bound's L_T.

Discrete data (levels) are dequantized: x + u, u uniform in the level's bin (width 2 / (L - 1)),
so that -log p(x + u) - D log(width) bounds the discrete NLL from above (Theis et al. 2016; with
several draws, the importance-weighted bound of Ho et al. 2019); continuous data are not.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ddpm.checks import check_choice, check_int
from ddpm.conditioning import batch_labels
from ddpm.distributed import batch_seed, gather_in_order, my_share
from ddpm.samplers.base import Model
from ddpm.samplers.ode import (
    check_tolerances,
    drift,
    flow_denoiser,
    lambda_at,
    lambda_at_data,
    odeint,
)

LIKELIHOODS = ("bound", "ode")
DIVERGENCES = ("auto", "exact", "hutchinson")
# divergence=auto: exact (one backward pass per dimension) up to this many dimensions (2-D
# points, gmm, the 8x8 digits), Hutchinson beyond (MNIST, CIFAR-10)
AUTO_EXACT_MAX_DIM = 64
# divergence=exact is refused beyond this many backward passes per network call
EXACT_MAX_DIM = 1024


@dataclass
class ODESettings:
    """The `ode.` keys of ddpm-eval (conf/evaluation/default.yaml)."""

    rtol: float = 1e-5
    atol: float = 1e-5
    method: str = "dopri5"
    divergence: str = "auto"
    probes: int = 1
    dequantization: int = 1

    def check(self, dim: int | None) -> ODESettings:
        """One-sentence ValueErrors for bad settings (before any work); `divergence` resolved for
        data of `dim` dimensions (None: the ODE is not asked for, nothing resolved)."""
        check_tolerances(self.rtol, self.atol, self.method, "ode")
        check_choice("ode.divergence", self.divergence, DIVERGENCES)
        check_int("ode.probes", self.probes)
        check_int("ode.dequantization", self.dequantization)
        divergence = self.divergence
        if dim is None:
            return self
        if divergence == "auto":
            divergence = "exact" if dim <= AUTO_EXACT_MAX_DIM else "hutchinson"
        if divergence == "exact" and dim > EXACT_MAX_DIM:
            raise ValueError(
                f"ode.divergence=exact on data of {dim} dimensions costs {dim} backward passes "
                f"per network call (allowed up to {EXACT_MAX_DIM}): use ode.divergence=hutchinson "
                "(ode.probes passes per call, an unbiased estimate)."
            )
        return ODESettings(**{**asdict(self), "divergence": divergence})


def check_likelihoods(likelihoods: Any) -> list[str]:
    """`likelihood`: a list of entries of LIKELIHOODS."""
    if isinstance(likelihoods, str) or not hasattr(likelihoods, "__iter__"):
        raise ValueError(
            f"likelihood={likelihoods!r} is invalid: it must be a list of {', '.join(LIKELIHOODS)}"
            ", e.g. likelihood=[bound,ode] (likelihood=[] for none)."
        )
    for entry in likelihoods:
        check_choice("likelihood", entry, LIKELIHOODS)
    return list(likelihoods)


def divergence(x0: torch.Tensor, x: torch.Tensor, probes: torch.Tensor | None) -> torch.Tensor:
    """div_x x0(x) per example, [B]: exact (probes None: one backward pass per dimension) or
    Hutchinson's estimate, the mean over probes v [P, *x.shape] of v^T (dx0/dx) v."""
    if probes is None:
        flat = x0.flatten(1)
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for i in range(flat.shape[1]):
            (grad,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)
            total += grad.flatten(1)[:, i]
        return total
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for v in probes:
        (grad,) = torch.autograd.grad((x0 * v).sum(), x, retain_graph=True)
        total += (grad * v).flatten(1).sum(1)
    return total / len(probes)


def ode_nll(
    diffusion: Any,
    model: Model,
    x: torch.Tensor,
    settings: ODESettings,
    generator: torch.Generator | None = None,
    **model_kwargs: Any,
) -> dict[str, Any]:
    """-log p(x) under the flow, per example, nats [B] (`nll`), with its parts: `prior` (log
    N(x_T; 0, I)), `delta` (the integral of the divergence: nll = -(prior + delta)), `x_T`, and
    `calls`, the network calls made (each with its divergence). `settings` must be checked
    (`ODESettings.check`); Hutchinson's probes are drawn from `generator`."""
    x = x.to(torch.float64)
    dim = x[0].numel()
    probes = None
    if settings.divergence == "hutchinson":
        source = generator.device if generator is not None else torch.device("cpu")
        shape = (settings.probes, *x.shape)
        bits = torch.randint(0, 2, shape, generator=generator, device=source)
        probes = (2.0 * bits - 1.0).to(x)
    x0_at = flow_denoiser(diffusion, model, **model_kwargs)
    calls = [0]

    def f(lam: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        calls[0] += 1
        alpha2 = torch.sigmoid(2 * lam.double())
        alpha = alpha2.sqrt()
        with torch.enable_grad():
            xx = state[0].detach().requires_grad_(True)
            x0 = x0_at(xx, lam)
            div_x0 = divergence(x0, xx, probes)
        return drift(state[0], x0.detach(), lam), alpha * div_x0 - alpha2 * dim

    start, end = lambda_at_data(diffusion), lambda_at(diffusion, diffusion.num_timesteps - 1)
    zero = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    x_T, delta = odeint(f, (x, zero), start, end, settings.rtol, settings.atol, settings.method)
    prior = -0.5 * (dim * math.log(2 * math.pi) + x_T.flatten(1).pow(2).sum(1))
    # dlog p / dlambda = -div(dx / dlambda) along the path: log p(x) = log p(x_T) + delta
    return {"nll": -(prior + delta), "prior": prior, "delta": delta, "x_T": x_T, "calls": calls[0]}


@torch.no_grad()
def ode_bpd(
    trained: Any,
    data: torch.Tensor,
    num_levels: int | None,
    settings: ODESettings,
    batch_size: int,
    seed: int = 0,
    device: str = "cpu",
    labels: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The flow's NLL of `data` in bits/dim (of the discrete data when `num_levels` is set, after
    `settings.dequantization` uniform draws per example), over batches split among processes
    as the bound's: the mean, its standard error over examples, the mean network calls per
    example, and `rows` per example (index, ode_bpd, nll_nats, prior_nats, calls). With
    `labels` (a conditional model) the flow given the labels: -log p(x | y)."""

    backbone, diffusion = trained.backbone.to(device), trained.diffusion.to(device)
    dim = data[0].numel()
    draws = settings.dequantization if num_levels is not None else 1
    width = 2.0 / (num_levels - 1) if num_levels is not None else None
    done = []
    for index, batch in tqdm(my_share(data.split(batch_size)), desc="ode bits/dim"):
        generator = torch.Generator().manual_seed(batch_seed(seed, index))
        x = batch.to(device, torch.float64)
        y = batch_labels(labels, index, batch_size, device)
        log_p, priors, calls = [], [], 0
        for _ in range(draws):
            if width is not None:
                u = torch.rand(x.shape, generator=generator, dtype=torch.float64) - 0.5
                x_in = x + width * u.to(device)
            else:
                x_in = x
            out = ode_nll(diffusion, backbone, x_in, settings, generator, **y)
            log_p.append(-out["nll"])
            priors.append(out["prior"])
            calls += out["calls"]
        # the importance-weighted estimate: log (1/K sum_k p(x + u_k) width^D)
        log_mass = torch.logsumexp(torch.stack(log_p), 0) - math.log(draws)
        if width is not None:
            log_mass = log_mass + dim * math.log(width)
        nll = -log_mass.cpu()
        rows = [
            {
                "example": index * batch_size + i,
                "ode_bpd": value / (dim * math.log(2)),
                "nll_nats": value,
                "prior_nats": -p,
                "calls": calls,
            }
            for i, (value, p) in enumerate(
                zip(nll.tolist(), torch.stack(priors).mean(0).tolist(), strict=True)
            )
        ]
        done.append((index, rows))
    rows = [row for part in gather_in_order(done) for row in part]
    bpd = torch.tensor([row["ode_bpd"] for row in rows], dtype=torch.float64)
    return {
        "ode_bpd": bpd.mean().item(),
        "ode_bpd_stderr": (bpd.std() / len(bpd) ** 0.5).item() if len(bpd) > 1 else 0.0,
        "ode_nfe": sum(row["calls"] for row in rows) / len(rows),
        "rows": rows,
    }
