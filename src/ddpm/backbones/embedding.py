"""The sinusoidal time-step embedding of the DDPM networks (Transformer positional encoding)."""

import math

import torch


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] integer steps -> [B, dim] features: sin and cos at geometric frequencies 1..1/10000."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1)
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class LabelEmbedding(torch.nn.Module):
    """A learned vector per class and one more for the null label (index `num_classes`), added to
    the step embedding of a conditional network (`conditioning=class`); y None is the null
    label for every example."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(
                f"backbone.num_classes={num_classes!r} is invalid: it must be an integer >= 1 "
                "(the data's classes) or null (an unconditional network)."
            )
        self.num_classes = num_classes
        self.table = torch.nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
        if y is None:
            y = torch.full((n,), self.num_classes, dtype=torch.long, device=device)
        return self.table(y)


def with_labels(
    embedding: LabelEmbedding | None, emb: torch.Tensor, y: torch.Tensor | None
) -> torch.Tensor:
    """The step embedding `emb` plus the labels' vectors (the null label's for y None) for a
    conditional network; `emb` itself, with no work, for an unconditional one, which refuses
    labels."""
    if embedding is None:
        if y is not None:
            raise ValueError(
                "labels were given to an unconditional network (backbone.num_classes=null): "
                "train with conditioning=class to condition on them."
            )
        return emb
    return emb + embedding(y, emb.shape[0], emb.device)
