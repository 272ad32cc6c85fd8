"""The true reverse process, computed, for data whose distribution is a Gaussian mixture.

q(x_{t-1} | x_t) integrates q(x_{t-1} | x_t, x_0) q(x_0 | x_t) over the data distribution and
is intractable in general. For a mixture of isotropic Gaussians (a finite data set is one, with
variance 0: `empirical`) it is exact: x_t is a mixture too, each component's responsibility for
x_t follows from Bayes' rule, and given a component the reverse step is a Gaussian (the product
of the component's Gaussian at t-1 and the forward kernel). So the Bayes-optimal denoiser
E[x_0 | x_t], the floor of the simple loss, the KL from the true reverse step to a model's
Gaussian and the gap between the true step and the best Gaussian are all computed here.

Time steps are 0-based, as in `ddpm.diffusion`: at step t, x_t has abar = alphas_cumprod[t] and
x_{t-1} has abar_prev = alphas_cumprod_prev[t] (1 at t = 0: x_{t-1} is the data).
All arithmetic is float64 on the mixture's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ddpm.diffusion import GaussianDiffusion
from ddpm.samplers.ode import input_dtype

# Elements of a [B, K, D] intermediate per chunk (float64: 32 MiB); batches are split to fit.
CHUNK_ELEMENTS = 2**22


class GaussianMixture:
    """sum_k w_k N(means[k], variances[k] I): isotropic components, a variance may be 0 (a point
    mass). `weights` are normalised to sum to 1. `labels` (int64 [K], optional) is each
    component's class: the labelled data's distribution given class c is `of_class(c)`."""

    def __init__(
        self,
        means: torch.Tensor | Sequence,
        variances: torch.Tensor | Sequence[float],
        weights: torch.Tensor | Sequence[float],
        labels: torch.Tensor | Sequence[int] | None = None,
    ) -> None:
        means = torch.as_tensor(means, dtype=torch.float64)
        variances = torch.as_tensor(variances, dtype=torch.float64, device=means.device)
        weights = torch.as_tensor(weights, dtype=torch.float64, device=means.device)
        k = means.shape[0] if means.ndim else 0
        if means.ndim < 2 or k < 1:
            raise ValueError("means must be [K, *shape] with K >= 1 components.")
        if variances.shape != (k,) or weights.shape != (k,):
            raise ValueError(f"variances and weights must be [K] = [{k}], one per component.")
        if not bool((variances >= 0).all()) or not bool(torch.isfinite(variances).all()):
            raise ValueError("variances must be finite and >= 0.")
        if not bool((weights >= 0).all()) or not float(weights.sum()) > 0:
            raise ValueError("weights must be >= 0 with a positive sum.")
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long, device=means.device)
            if labels.shape != (k,) or bool((labels < 0).any()):
                raise ValueError(f"labels must be [K] = [{k}] classes >= 0, one per component.")
        self.labels = labels
        self.means = means
        self.variances = variances
        self.weights = weights / weights.sum()
        self.shape = tuple(means.shape[1:])
        self.dim = math.prod(self.shape)
        self._flat = means.reshape(k, -1)
        self._outer: torch.Tensor | None = None  # the m_k m_k^T, [K, D * D], when first needed

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def to(self, device: torch.device | str) -> GaussianMixture:
        """The same mixture with its tensors on `device`."""
        labels = None if self.labels is None else self.labels.to(device)
        return GaussianMixture(
            self.means.to(device), self.variances.to(device), self.weights.to(device), labels
        )

    @property
    def num_classes(self) -> int | None:
        """The number of classes of a labelled mixture (the largest label + 1), else None."""
        return None if self.labels is None else int(self.labels.max()) + 1

    def of_class(self, label: int) -> GaussianMixture:
        """The distribution given class `label`: its components, reweighted to sum to 1."""
        if self.labels is None or not bool((self.labels == label).any()):
            raise ValueError(f"the mixture has no component of class {label}.")
        keep = self.labels == label
        return GaussianMixture(
            self.means[keep], self.variances[keep], self.weights[keep], self.labels[keep]
        )

    def classify(self, x0: torch.Tensor) -> torch.Tensor:
        """The class of each example's most responsible component (the Bayes classifier of a
        labelled mixture with one component per class), int64 [B]; variances must be > 0."""
        x = self._flatten(x0)
        log_n = _log_normal(x, self._flat, torch.ones_like(x[:, 0]), self.variances)
        return self.labels[(self.weights.log() + log_n).argmax(dim=1)]

    def log_prob(self, x0: torch.Tensor) -> torch.Tensor:
        """log q(x_0), [B] (nats); needs every variance > 0 (point masses have no density)."""
        if not bool((self.variances > 0).all()):
            raise ValueError(
                "this mixture has components of variance 0 (point masses, e.g. `empirical`): it "
                "has no density; use a mixture whose variances are all > 0."
            )
        x = self._flatten(x0)
        log_components = _log_normal(x, self._flat, torch.ones_like(x[:, 0]), self.variances)
        return torch.logsumexp(self.weights.log() + log_components, dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws, float64 [n, *shape], on the generator's device (the CPU when None) and then
        the mixture's."""
        return self.sample_components(n, generator)[0]

    def sample_components(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """n draws as `sample` makes them, and the component each came from, int64 [n]."""
        source = generator.device if generator is not None else torch.device("cpu")
        k = torch.multinomial(self.weights.to(source), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=source)
        k, z = k.to(self.means.device), z.to(self.means.device)
        x = self._flat[k] + self.variances[k].sqrt()[:, None] * z
        return x.reshape(n, *self.shape), k

    def denoise(
        self, diffusion: GaussianDiffusion, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """E[x_0 | x_t], the Bayes-optimal denoiser, in x_t's dtype, [B, *shape] (t may be a
        fractional step of the continuous schedule, see `ddpm.diffusion`).

        Given component k, x_t ~ N(sqrt(abar) m_k, s_k I) with s_k = abar v_k + 1 - abar, and
        x_0 | x_t, k is Gaussian with mean m_k + (v_k sqrt(abar) / s_k) (x_t - sqrt(abar) m_k);
        the components are weighted by their responsibilities for x_t.
        """
        out = []
        for x, tt in self._chunks(x_t, t):
            abar = diffusion.alphas_cumprod_at(tt)
            log_r = self._log_responsibilities(x, abar)
            r = log_r.exp()
            gain = self.variances * abar.sqrt()[:, None] / _noised_variance(abar, self.variances)
            mean = r @ self._flat - ((r * gain) * abar.sqrt()[:, None]) @ self._flat
            out.append(mean + (r * gain).sum(1, keepdim=True) * x)
        return torch.cat(out).reshape(x_t.shape).to(x_t.dtype)

    def reverse_log_prob(
        self, diffusion: GaussianDiffusion, x_prev: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """log q(x_{t-1} | x_t), [B] (nats); where x_{t-1} is the data (t = 0) it needs every
        variance > 0."""
        out = []
        for (y, tt), (x, _) in zip(self._chunks(x_prev, t), self._chunks(x_t, t), strict=True):
            log_r, a, c, var = self._reverse_components(diffusion, x, tt)
            if not bool((var > 0).all()):
                raise ValueError(
                    "q(x_{t-1} | x_t) at t = 0 of a mixture with point masses is discrete: it "
                    "has no density there (use t >= 1)."
                )
            # ||y - a_k m_k - c_k x||^2 from inner products (no [B, K, D] is formed)
            m = self._flat
            yx = (y * x).sum(1, keepdim=True)
            sq = (
                y.pow(2).sum(1, keepdim=True)
                - 2 * c * yx
                + c**2 * x.pow(2).sum(1, keepdim=True)
                - 2 * a * (y @ m.T)
                + 2 * a * c * (x @ m.T)
                + a**2 * m.pow(2).sum(1)[None]
            ).clamp(min=0)
            log_n = -0.5 * (self.dim * torch.log(2 * math.pi * var) + sq / var)
            out.append(torch.logsumexp(log_r + log_n, dim=1))
        return torch.cat(out)

    def sample_reverse(
        self,
        diffusion: GaussianDiffusion,
        x_t: torch.Tensor,
        t: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """x_{t-1} ~ q(x_{t-1} | x_t), in x_t's dtype: a component drawn by its responsibility,
        then its Gaussian. Draws come from `generator` (on its device; the CPU when None)."""
        source = generator.device if generator is not None else torch.device("cpu")
        out = []
        for x, tt in self._chunks(x_t, t):
            log_r, a, c, var = self._reverse_components(diffusion, x, tt)
            k = torch.multinomial(log_r.exp().to(source), 1, generator=generator)[:, 0]
            z = torch.randn(x.shape, generator=generator, dtype=torch.float64, device=source)
            k, z, rows = k.to(x.device), z.to(x.device), torch.arange(len(x), device=x.device)
            mean = a[rows, k, None] * self._flat[k] + c[rows, k, None] * x
            out.append(mean + var[rows, k].sqrt()[:, None] * z)
        return torch.cat(out).reshape(x_t.shape).to(x_t.dtype)

    def reverse_moments(
        self, diffusion: GaussianDiffusion, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean [B, D] and covariance [B, D, D] of q(x_{t-1} | x_t) (flattened), float64: the
        moments of the best Gaussian fitted to the true reverse step. With component means
        u_k = a_k m_k + c_k x: sum_k r_k (var_k I + u_k u_k^T) - mean mean^T, expanded so that
        sum_k r_k a_k^2 m_k m_k^T is one product with the components' outer products."""
        if self._outer is None:
            self._outer = (self._flat[:, :, None] * self._flat[:, None, :]).flatten(1)
        means, covariances = [], []
        d = self.dim
        for x, tt in self._chunks(x_t, t, per_row=self.num_components + d * d):
            mean, cross, cc, spread, r_var = self._reverse_sums(diffusion, x, tt)
            covariance = (spread @ self._outer).reshape(-1, d, d)
            covariance += cross[:, :, None] * x[:, None, :] + x[:, :, None] * cross[:, None, :]
            covariance += cc[:, None, None] * x[:, :, None] * x[:, None, :]
            covariance -= mean[:, :, None] * mean[:, None, :]
            covariance.diagonal(dim1=1, dim2=2).add_(r_var[:, None])
            means.append(mean)
            covariances.append(covariance)
        return torch.cat(means), torch.cat(covariances)

    def reverse_variance(
        self, diffusion: GaussianDiffusion, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The variance per dimension of q(x_{t-1} | x_t), [B, *shape], float64: the diagonal
        Gaussian closest to the true step (what a learned variance converges to)."""
        out = []
        for x, tt in self._chunks(x_t, t):
            mean, cross, cc, spread, r_var = self._reverse_sums(diffusion, x, tt)
            second = spread @ self._flat.pow(2) + 2 * cross * x + cc[:, None] * x.pow(2)
            out.append(second - mean.pow(2) + r_var[:, None])
        return torch.cat(out).reshape(x_t.shape)

    def _reverse_sums(
        self, diffusion: GaussianDiffusion, x: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """What the reverse step's moments are made of: its mean sum_k r_k (a_k m_k + c_k x)
        [B, D], sum_k r_k a_k c_k m_k [B, D], sum_k r_k c_k^2 [B], the weights r_k a_k^2 [B, K]
        of the m_k m_k^T, and sum_k r_k var_k [B]."""
        log_r, a, c, var = self._reverse_components(diffusion, x, t)
        r = log_r.exp()
        mean = (r * a) @ self._flat + (r * c).sum(1, keepdim=True) * x
        cross = (r * a * c) @ self._flat
        return mean, cross, (r * c**2).sum(1), r * a**2, (r * var).sum(1)

    def marginal_log_prob(
        self, diffusion: GaussianDiffusion, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """log q(x_t), [B] (nats): the mixture noised to step t (or a fractional step)."""
        out = []
        for x, tt in self._chunks(x_t, t):
            abar = diffusion.alphas_cumprod_at(tt)
            log_n = _log_normal(x, self._flat, abar.sqrt(), _noised_variance(abar, self.variances))
            out.append(torch.logsumexp(self.weights.log() + log_n, dim=1))
        return torch.cat(out)

    # The pieces.

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"examples of shape {tuple(x.shape[1:])} do not fit the mixture's {self.shape}."
            )
        return x.reshape(len(x), -1).to(self.means.device, torch.float64)

    def _chunks(
        self, x: torch.Tensor, t: torch.Tensor, per_row: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x flattened to float64 [b, D], t [b]) in chunks whose [b, K, D] intermediates fit."""
        x = self._flatten(x)
        t = t.to(x.device)
        size = max(1, CHUNK_ELEMENTS // (per_row or self.num_components * self.dim))
        for start in range(0, len(x), size):
            yield x[start : start + size], t[start : start + size]

    def _log_responsibilities(self, x_t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        """log p(k | x_t), [B, K]: x_t | k ~ N(sqrt(abar) m_k, (abar v_k + 1 - abar) I)."""
        log_n = _log_normal(x_t, self._flat, abar.sqrt(), _noised_variance(abar, self.variances))
        return torch.log_softmax(self.weights.log() + log_n, dim=1)

    def _reverse_components(
        self, diffusion: GaussianDiffusion, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t) = sum_k r_k N(a_k m_k + c_k x_t, var_k I): (log r, a, c, var), each
        [B, K]. With S_k = abar_prev v_k + 1 - abar_prev the variance of x_{t-1} given k, the
        product of N(x_{t-1}; sqrt(abar_prev) m_k, S_k) and N(x_t; sqrt(alpha) x_{t-1}, beta)
        gives a_k = beta sqrt(abar_prev) / (beta + alpha S_k), c_k = S_k sqrt(alpha) /
        (beta + alpha S_k) and var_k = S_k beta / (beta + alpha S_k) (0 for a point mass at
        t = 0)."""
        beta = _at(diffusion.betas, t)[:, None]
        abar_prev = _at(diffusion.alphas_cumprod_prev, t)[:, None]
        alpha = 1.0 - beta
        s = abar_prev * self.variances[None] + (1.0 - abar_prev)
        denominator = beta + alpha * s
        a = beta * abar_prev.sqrt() / denominator
        c = s * alpha.sqrt() / denominator
        var = s * beta / denominator
        log_r = self._log_responsibilities(x_t, _at(diffusion.alphas_cumprod, t))
        return log_r, a, c, var


def empirical(points: torch.Tensor, labels: torch.Tensor | None = None) -> GaussianMixture:
    """A finite data set's own distribution: a point mass of weight 1/N at each point (the model
    a network converges to if it memorises its training set), labelled with the points' labels."""
    n = len(points)
    return GaussianMixture(points.double(), torch.zeros(n), torch.ones(n), labels)


DISTRIBUTIONS = ("data", "train")


def distribution_of(datamodule: Any, which: str, key: str = "distribution") -> GaussianMixture:
    """A data module's exact distribution (`which="data"`, for data whose distribution is known)
    or the empirical distribution of its training split (`which="train"`)."""
    from ddpm.checks import check_choice

    check_choice(key, which, DISTRIBUTIONS)
    if which == "train":
        return empirical(datamodule.train_data, datamodule.labels("train"))
    known = datamodule.distribution()
    if known is None:
        name = type(datamodule).__name__.removesuffix("DataModule")
        raise ValueError(
            f"{key}=data, but {name} data have no known distribution (gmm and toy2d 8gaussians "
            f"do): set {key}=train for the empirical distribution of the training split."
        )
    return known


def _at(buffer: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """buffer[t] in float64 on t's device, [B]."""
    return buffer.to(t.device, torch.float64)[t]


def _noised_variance(abar: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    """[B, K]: the variance of x_t given a component, abar v_k + 1 - abar."""
    return abar[:, None] * variances[None] + (1.0 - abar[:, None])


def _log_normal(
    x: torch.Tensor, means: torch.Tensor, scale: torch.Tensor, variances: torch.Tensor
) -> torch.Tensor:
    """log N(x_b; scale_b m_k, var I), [B, K], var [K] or [B, K]; the squared distances by
    ||x||^2 - 2 scale x.m + scale^2 ||m||^2 (float64), so no [B, K, D] is formed."""
    d = x.shape[1]
    sq = (
        x.pow(2).sum(1, keepdim=True)
        - 2 * scale[:, None] * (x @ means.T)
        + scale[:, None] ** 2 * means.pow(2).sum(1)[None]
    ).clamp(min=0)
    return -0.5 * (d * torch.log(2 * math.pi * variances) + sq / variances)


class Oracle(nn.Module):
    """The Bayes-optimal network for data with a known distribution: at (x_t, t) it outputs what
    the diffusion's prediction stands for, computed from E[x_0 | x_t] (eps, x_0, the mean or v:
    `loss_target` of the optimal x_0 and the eps it implies), and with a learned variance the
    variance per dimension of the true reverse step (log sigma^2, or v of `learned_range`,
    which may lie outside [-1, 1]). `t` is the trained chain's step, as a network sees it, or a
    fractional step of the continuous schedule (the probability-flow ODE), where the variance is
    the nearest step's (the ODE does not use it).
    It has no weights: `backbone=oracle` in ddpm-sample, ddpm-eval and ddpm-truth.

    With `num_classes` (`conditioning=class`, a labelled mixture) it is the Bayes-optimal
    conditional network: at label y the output of the class's own distribution (`of_class`), at
    the null label (index num_classes, or y None) the whole mixture's."""

    def __init__(
        self,
        distribution: GaussianMixture,
        diffusion: GaussianDiffusion,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if num_classes is not None and distribution.num_classes != num_classes:
            raise ValueError(
                f"conditioning=class needs a labelled distribution with {num_classes} classes; "
                f"this one has {distribution.num_classes or 'no'} labels."
            )
        self.distribution = distribution
        self.diffusion = diffusion
        self.num_classes = num_classes
        self._classes: dict[int, GaussianMixture] = {}  # of_class(c), made once, on x's device

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.distribution.shape

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.distribution.means.device != x.device:
            self.distribution = self.distribution.to(x.device)
            self._classes = {}
        if y is None or self.num_classes is None:
            if y is not None:
                raise ValueError(
                    "labels were given to the unconditional oracle: set conditioning=class."
                )
            return self._output(self.distribution, x, t)
        out = None
        for label in y.unique().tolist():
            rows = y == label
            if label != self.num_classes and label not in self._classes:
                self._classes[label] = self.distribution.of_class(label)
            part = self._classes.get(label, self.distribution)
            value = self._output(part, x[rows], t[rows])
            out = x.new_empty((len(x), *value.shape[1:])) if out is None else out
            out[rows] = value
        return out

    def _output(
        self, distribution: GaussianMixture, x: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The prediction (and variance values) of the network that is optimal for
        `distribution`."""
        diffusion, x64 = self.diffusion, x.double()
        p, k = diffusion.parameterisation, diffusion.coefficients(t, x64)
        x0 = distribution.denoise(diffusion, x64, t)
        prediction = p.target(k, x0, x64, p.eps(k, x0, x64))
        if not diffusion.learned_variance:
            return prediction.to(x.dtype)
        if t.is_floating_point():
            t = diffusion.nearest_step(t)
            k = diffusion.coefficients(t, x64)
        log_variance = distribution.reverse_variance(diffusion, x64, t).log()
        values = p.values(k, log_variance)
        return torch.cat([prediction, values], dim=1).to(x.dtype)


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    """The Monte Carlo mean of `values` [n] and its standard error."""
    values = values.double()
    n = values.numel()
    stderr = values.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return values.mean().item(), stderr


def timesteps_to_evaluate(num_timesteps: int, points: int | None) -> list[int]:
    """Every step (points None), or `points` evenly spaced steps from 0 to T-1."""
    if points is None or points >= num_timesteps:
        return list(range(num_timesteps))
    return sorted({round(i * (num_timesteps - 1) / max(points - 1, 1)) for i in range(points)})


def joint_draw(
    diffusion: GaussianDiffusion,
    distribution: GaussianMixture,
    t: int,
    n: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_0, x_{t-1}, x_t) ~ q, float64 [n, *shape]: x_0 from the data, x_{t-1} from q(x_{t-1} |
    x_0), x_t from the forward kernel; x_{t-1} is then a draw of the true reverse given x_t."""
    x0 = distribution.sample(n, generator)
    tt = torch.full((n,), t, dtype=torch.long, device=x0.device)
    abar_prev = _at(diffusion.alphas_cumprod_prev, tt).reshape(n, *(1,) * (x0.ndim - 1))
    beta = _at(diffusion.betas, tt).reshape(abar_prev.shape)
    source = generator.device
    e1, e2 = (
        torch.randn(x0.shape, generator=generator, dtype=torch.float64, device=source).to(x0.device)
        for _ in range(2)
    )
    x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * e1
    x_t = (1 - beta).sqrt() * x_prev + beta.sqrt() * e2
    return x0, x_prev, x_t


def loss_floor(
    diffusion: GaussianDiffusion,
    distribution: GaussianMixture,
    num_samples: int,
    generator: torch.Generator | None = None,
    timesteps: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The minimum of the simple loss per t (mean over dimensions, weighted as the diffusion's
    `weighting` does), E || target - E[target | x_t] ||^2 (for eps: E || eps - E[eps | x_t] ||^2),
    by Monte Carlo with `num_samples` draws per t: (mean [n_t], standard error [n_t]), float64,
    for `timesteps` (default every t), computed on the diffusion's device."""
    generator = generator or torch.Generator().manual_seed(0)
    distribution = distribution.to(diffusion.betas.device)
    steps = list(range(diffusion.num_timesteps)) if timesteps is None else list(timesteps)
    means, stderrs = [], []
    for t in steps:
        x0 = distribution.sample(num_samples, generator)
        tt = torch.full((num_samples,), t, dtype=torch.long, device=x0.device)
        noise = torch.randn(
            x0.shape, generator=generator, dtype=torch.float64, device=generator.device
        ).to(x0.device)
        values = _squared_error_floor(diffusion, distribution, x0, tt, noise)
        mean, stderr = mean_and_stderr(values)
        means.append(mean)
        stderrs.append(stderr)
    return torch.tensor(means, dtype=torch.float64), torch.tensor(stderrs, dtype=torch.float64)


def conditional_loss_floor(
    diffusion: GaussianDiffusion,
    distribution: GaussianMixture,
    drop_prob: float,
    num_samples: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The simple loss's floor per t [T] of a class-conditional network trained with null labels
    at rate `drop_prob`: (1 - drop_prob) sum_c w_c floor(class c) + drop_prob floor(mixture),
    each by `loss_floor` (num_samples // classes draws per class, at least 16)."""
    generator = generator or torch.Generator().manual_seed(0)
    classes = distribution.labels.unique().tolist()
    floor = torch.zeros(diffusion.num_timesteps, dtype=torch.float64)
    for label in classes:
        share = distribution.weights[distribution.labels == label].sum().item()
        part = distribution.of_class(label)
        floor += (
            share * loss_floor(diffusion, part, max(16, num_samples // len(classes)), generator)[0]
        )
    if drop_prob > 0:
        floor = (1 - drop_prob) * floor
        floor += drop_prob * loss_floor(diffusion, distribution, num_samples, generator)[0]
    return floor


def _squared_error_floor(
    diffusion: GaussianDiffusion,
    distribution: GaussianMixture,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Per example, the weighted squared error (mean over dimensions) of the Bayes-optimal
    prediction, E[target | x_t], against the target: [B]."""
    x_t = diffusion.q_sample(x0, t, noise)
    best_x0 = distribution.denoise(diffusion, x_t, t)
    best = diffusion.loss_target(best_x0, x_t, t, diffusion.predict_eps_from_x0(x_t, t, best_x0))
    target = diffusion.loss_target(x0, x_t, t, noise)
    return (target - best).pow(2).flatten(1).mean(1) * _at(diffusion.loss_weight, t)


def gaussian_kl_full(
    mean_q: torch.Tensor,
    covariance_q: torch.Tensor,
    mean_p: torch.Tensor,
    log_variance_p: torch.Tensor,
) -> torch.Tensor:
    """KL(N(mean_q, covariance_q) || N(mean_p, diag exp(log_variance_p))), [B] (nats), inputs
    flattened: [B, D], [B, D, D], [B, D], [B, D]."""
    inverse = torch.exp(-log_variance_p)
    trace = (covariance_q.diagonal(dim1=1, dim2=2) * inverse).sum(1)
    mahalanobis = ((mean_p - mean_q).pow(2) * inverse).sum(1)
    logdet_q = torch.linalg.cholesky(covariance_q).diagonal(dim1=1, dim2=2).log().sum(1) * 2
    return 0.5 * (trace + mahalanobis - mean_q.shape[1] + log_variance_p.sum(1) - logdet_q)


def gaussian_gap(
    diffusion: GaussianDiffusion,
    distribution: GaussianMixture,
    x_prev: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (x_{t-1}, x_t) drawn from q: log q(x_{t-1} | x_t) - log g(x_{t-1}), g the
    moment-matched Gaussian of q(. | x_t). Its mean over draws is KL(q(. | x_t) || g), 0 only
    when the true step is Gaussian; the two logs move together, so a small gap is measured with
    a small standard error. Returns (those terms [B], g's mean [B, D] and covariance [B, D, D])."""
    mean, covariance = distribution.reverse_moments(diffusion, x_t, t)
    cholesky = torch.linalg.cholesky(covariance)
    logdet = cholesky.diagonal(dim1=1, dim2=2).log().sum(1) * 2
    y = x_prev.reshape(len(x_prev), -1).to(mean) - mean
    white = torch.linalg.solve_triangular(cholesky, y[:, :, None], upper=False)[:, :, 0]
    log_g = -0.5 * (mean.shape[1] * math.log(2 * math.pi) + logdet + white.pow(2).sum(1))
    log_q = distribution.reverse_log_prob(diffusion, x_prev, x_t, t)
    return log_q - log_g, mean, covariance


Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def truth_terms(
    diffusion: GaussianDiffusion,
    distribution: GaussianMixture,
    model: Model | None,
    timesteps: Sequence[int],
    num_samples: int,
    generator: torch.Generator,
    batch_size: int = 1000,
    clip_denoised: bool = False,
    device: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """Per t of `timesteps`, Monte Carlo over (x_0, x_{t-1}, x_t) ~ q with `num_samples` draws
    (means and standard errors, nats; the loss terms per dimension as the loss is):

    - `gaussian_gap`: E KL(q(x_{t-1} | x_t) || g), g the moment-matched Gaussian (the least KL
      any Gaussian reverse step can reach);
    - with a `model`: `kl`, E KL(q(x_{t-1} | x_t) || p_theta(x_{t-1} | x_t)), the KL from the
      true reverse step to the model's Gaussian (p_mean_variance with `clip_denoised`, L_0's
      Gaussian density at t = 0), as gap + KL(g || p) (exact: p is Gaussian); the model's simple
      loss `loss`, its `floor` and `excess_loss` = loss - floor on the same draws.

    Steps where x_{t-1} is the data and the data has point masses (t = 0 of `empirical`) have
    no density and are skipped.
    """
    rows = []
    distribution = distribution.to(device)
    diffusion = diffusion.to(device)
    point_masses = not bool((distribution.variances > 0).all())
    for t in timesteps:
        if t == 0 and point_masses:
            continue
        values: dict[str, list[torch.Tensor]] = {}
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            x0, x_prev, x_t = joint_draw(diffusion, distribution, t, n, generator)
            tt = torch.full((n,), t, dtype=torch.long, device=x0.device)
            gap, mean_g, covariance_g = gaussian_gap(diffusion, distribution, x_prev, x_t, tt)
            values.setdefault("gaussian_gap", []).append(gap)
            if model is None:
                continue
            dtype = input_dtype(model)
            out = model(x_t.to(dtype), diffusion.timestep_map[tt]).double()
            mean_p, _, log_variance_p, _ = diffusion.p_mean_variance(out, x_t, tt, clip_denoised)
            kl_g_p = gaussian_kl_full(
                mean_g, covariance_g, mean_p.flatten(1), log_variance_p.flatten(1)
            )
            values.setdefault("kl", []).append(gap + kl_g_p)
            abar = _at(diffusion.alphas_cumprod, tt).reshape(n, *(1,) * (x0.ndim - 1))
            noise = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
            prediction, _ = diffusion.split_output(out)
            target = diffusion.loss_target(x0, x_t, tt, noise)
            weight = _at(diffusion.loss_weight, tt)
            loss = (target - prediction).pow(2).flatten(1).mean(1) * weight
            floor = _squared_error_floor(diffusion, distribution, x0, tt, noise)
            values.setdefault("loss", []).append(loss)
            values.setdefault("floor", []).append(floor)
            values.setdefault("excess_loss", []).append(loss - floor)
        beta = float(diffusion.betas[t])
        row: dict[str, Any] = {"t": t + 1, "beta": beta}  # the paper's t = 1..T
        for name, parts in values.items():
            row[name], row[f"{name}_stderr"] = mean_and_stderr(torch.cat(parts))
        rows.append(row)
    return rows
