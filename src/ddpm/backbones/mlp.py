"""A residual MLP network for low-dimensional (toy 2-D) data."""

from __future__ import annotations

import torch
from torch import nn

from ddpm.backbones.embedding import LabelEmbedding, timestep_embedding, with_labels


class MLP(nn.Module):
    """The network for vectors [B, dim]: residual SiLU blocks, each conditioned on the step
    embedding (plus a learned label embedding when `num_classes` is set: `conditioning=class`);
    its output has `out_dim` entries (default dim; 2 dim with a learned variance)."""

    def __init__(
        self,
        dim: int = 2,
        hidden_dim: int = 256,
        num_layers: int = 4,
        time_embed_dim: int = 128,
        out_dim: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        out_dim = dim if out_dim is None else out_dim
        sizes = {"dim": dim, "hidden_dim": hidden_dim, "num_layers": num_layers, "out_dim": out_dim}
        for key, value in sizes.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"backbone.{key}={value!r} is invalid: it must be an integer >= 1."
                )
        self.dim = dim
        self.time_embed_dim = time_embed_dim
        self.time_embed = nn.Sequential(
            nn.Linear(time_embed_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim)
        )
        self.label_embed = None if num_classes is None else LabelEmbedding(num_classes, hidden_dim)
        self.input = nn.Linear(dim, hidden_dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.SiLU(),
                nn.Linear(hidden_dim, hidden_dim),
                nn.SiLU(),
                nn.Linear(hidden_dim, hidden_dim),
            )
            for _ in range(num_layers)
        )
        self.output = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, out_dim))

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.time_embed_dim).to(x.dtype))
        emb = with_labels(self.label_embed, emb, y)
        h = self.input(x)
        for block in self.blocks:
            h = h + block(h + emb)
        return self.output(h)
