"""Class conditioning and classifier-free guidance (Ho & Salimans, 2022). torch only.

A conditional network is called model(x, t, y): y int64 labels [B] in [0, num_classes], where
the index num_classes is the null label (the unconditional model; y=None means it too). Training
replaces a label by the null label with probability `drop_prob`, so that one network learns the
conditional and the unconditional model. Guidance, in diffusers' convention:

    eps_guided = eps(x, t, null) + s * (eps(x, t, y) - eps(x, t, null)),  s = guidance_scale

s = 1 is the conditional model, s = 0 the unconditional one (Ho & Salimans' w is s - 1). Every
prediction (eps, x_0, the mean, v) is an affine function of eps at a given (x_t, t) -- out =
a_t x_t + b_t eps -- and the weights 1 - s and s sum to 1, so combining the outputs themselves is
exactly combining in eps and converting back; `Guided` does that, without the round trip through
eps (ill-conditioned for the mean prediction near t = 0). With a learned variance the variance
values are the conditional ones (as GLIDE's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

CONDITIONINGS = ("none", "class")


def null_labels(num_classes: int, n: int, device: torch.device | str) -> torch.Tensor:
    """[n] null labels (the index num_classes): the unconditional model."""
    return torch.full((n,), num_classes, dtype=torch.long, device=device)


def drop_labels(
    y: torch.Tensor, num_classes: int, drop_prob: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """y with each label replaced by the null label with probability `drop_prob` (one uniform
    draw per example from `generator`, the global random state when None; none when 0)."""
    if drop_prob <= 0:
        return y
    drop = torch.rand(y.shape, generator=generator, device=y.device) < drop_prob
    return torch.where(drop, torch.full_like(y, num_classes), y)


def check_drop_prob(drop_prob: Any) -> float:
    """`conditioning.drop_prob`: a number in [0, 1]."""
    if isinstance(drop_prob, bool) or not isinstance(drop_prob, (int, float)):
        ok = False
    else:
        ok = 0.0 <= drop_prob <= 1.0
    if not ok:
        raise ValueError(
            f"conditioning.drop_prob={drop_prob!r} is invalid: it must be a number in [0, 1]."
        )
    return float(drop_prob)


def check_guidance_scale(scale: Any) -> float:
    """`guidance_scale`: a finite number >= 0."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale < math.inf:
        raise ValueError(
            f"guidance_scale={scale!r} is invalid: it must be a number >= 0 (1: the conditional "
            "model, 0: the unconditional one, above 1: guided)."
        )
    return float(scale)


def check_labels(labels: Any, num_classes: int, key: str = "labels") -> list[int]:
    """`labels`: `all` (every class) or a list of classes in [0, num_classes)."""
    if labels == "all":
        return list(range(num_classes))
    if isinstance(labels, int) and not isinstance(labels, bool):
        labels = [labels]
    ok = isinstance(labels, Sequence) and not isinstance(labels, str) and len(labels) > 0
    bad = [v for v in labels if isinstance(v, bool) or not isinstance(v, int)] if ok else []
    outside = [v for v in labels if not bad and not 0 <= v < num_classes] if ok else []
    if not ok or bad or outside:
        raise ValueError(
            f"{key}={labels!r} is invalid: it must be all or a list of classes in "
            f"[0, {num_classes}) (0..{num_classes - 1})."
        )
    return list(labels)


def label_rows(classes: list[int], per_class: int) -> torch.Tensor:
    """[len(classes) * per_class] labels, class-major: `per_class` samples of each class in turn
    (a grid with one row per class)."""
    return torch.tensor(classes, dtype=torch.long).repeat_interleave(per_class)


def batch_labels(
    labels: torch.Tensor | None, index: int, batch_size: int, device: str
) -> dict[str, torch.Tensor]:
    """The network's keyword arguments for batch `index`: {y: its labels} or none."""
    if labels is None:
        return {}
    return {"y": labels[index * batch_size : (index + 1) * batch_size].to(device)}


class Guided(nn.Module):
    """A conditional network with classifier-free guidance at `scale`: forward(x, t, y) is the
    guided output, one batched call on [x; x] with [y; null] (a single call with y at s = 1, with
    the null label at s = 0 or when y is None). `channels` are the prediction's (the data's); any
    further output channels (a learned variance) are the conditional ones."""

    def __init__(self, model: nn.Module, scale: float, num_classes: int, channels: int) -> None:
        super().__init__()
        self.model, self.scale = model, check_guidance_scale(scale)
        self.num_classes, self.channels = num_classes, channels

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        if y is not None and self.scale == 1:
            return self.model(x, t, y=y)
        null = null_labels(self.num_classes, x.shape[0], x.device)
        if y is None or self.scale == 0:
            return self.model(x, t, y=null)
        both = self.model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]))
        cond, uncond = both.chunk(2)
        c = self.channels
        guided = uncond[:, :c] + self.scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([guided, cond[:, c:]], dim=1) if cond.shape[1] > c else guided


def conditioning_of(run_config: dict[str, Any] | None) -> tuple[int | None, float]:
    """(num_classes, drop_prob) of a run's config: (None, 0.0) for conditioning=none and for
    configs from before conditioning existed."""
    node = (run_config or {}).get("conditioning") or {}
    if node.get("name", "none") != "class":
        return None, 0.0
    return node["num_classes"], float(node.get("drop_prob", 0.0))


class AtLabel(nn.Module):
    """model(x, t) of a conditional network at the one class `label` (for code that calls a
    network without labels, e.g. `ddpm.truth.truth_terms`)."""

    def __init__(self, model: nn.Module, label: int) -> None:
        super().__init__()
        self.model, self.label = model, label

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = torch.full((x.shape[0],), self.label, dtype=torch.long, device=x.device)
        return self.model(x, t, y=y)
