"""The DDPM U-Net (Ho et al., 2020, appendix B), a PixelCNN++-style wide ResNet with attention.

Per level: `num_res_blocks` residual blocks (GroupNorm, SiLU, the step embedding added after the
first conv, dropout before the second), self-attention at the listed resolutions, then a
stride-2 conv down; the decoder mirrors it with one extra block per level on the skip
connections and nearest-neighbour upsampling plus a conv. Initialisation follows the original
code: fan-average uniform everywhere, zeros for the last layer of every residual branch.
With `base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,)`
on 32x32 RGB this is the paper's 35.7M-parameter CIFAR-10 network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.backbones.embedding import LabelEmbedding, timestep_embedding, with_labels
from ddpm.checks import check_int


def _init(layer: nn.Conv2d | nn.Linear, zero: bool = False) -> nn.Module:
    """The original code's initialisation: variance scaling (fan_avg, uniform), bias 0."""
    if zero:
        nn.init.zeros_(layer.weight)
    else:
        nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _conv3x3(cin: int, cout: int, zero: bool = False, stride: int = 1) -> nn.Module:
    return _init(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), zero)


class ResBlock(nn.Module):
    def __init__(
        self, cin: int, cout: int, temb_dim: int, dropout: float, groups: int, eps: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps)
        self.conv1 = _conv3x3(cin, cout)
        self.temb_proj = _init(nn.Linear(temb_dim, cout))
        self.norm2 = nn.GroupNorm(groups, cout, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3x3(cout, cout, zero=True)
        self.skip = _init(nn.Conv2d(cin, cout, 1)) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps)
        self.qkv = _init(nn.Conv2d(channels, 3 * channels, 1))
        self.proj = _init(nn.Conv2d(channels, channels, 1), zero=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, HW, C], scale 1/sqrt(C)
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """A stride-2 3x3 conv; `padding` 1 pads each side, 0 pads only the right and bottom (as
    TensorFlow's SAME padding does at stride 2: the original DDPM code, diffusers'
    `downsample_padding=0`)."""

    def __init__(self, channels: int, padding: int = 1) -> None:
        super().__init__()
        self.padding = padding
        self.conv = _init(nn.Conv2d(channels, channels, 3, stride=2, padding=padding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """The network for images [B, C, H, W] with H = W = `image_size`: its output has
    `out_channels` channels (default C; 2C with a learned variance). With `num_classes` set
    (`conditioning=class`) a learned label embedding is added to the step embedding, as in
    guided-diffusion. `norm_eps` is every GroupNorm's epsilon and `downsample_padding` the
    stride-2 convs' padding: the original DDPM code (and its diffusers port) used 1e-6 and 0
    (TensorFlow's SAME padding), the defaults here 1e-5 and 1."""

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        num_groups: int = 32,
        out_channels: int | None = None,
        num_classes: int | None = None,
        norm_eps: float = 1e-5,
        downsample_padding: int = 1,
    ) -> None:
        super().__init__()
        if downsample_padding not in (0, 1) or isinstance(downsample_padding, bool):
            raise ValueError(
                f"backbone.downsample_padding={downsample_padding!r} is invalid: allowed are 1 "
                "(both sides) and 0 (right and bottom only, TensorFlow's SAME at stride 2)."
            )
        if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or norm_eps <= 0:
            raise ValueError(f"backbone.norm_eps={norm_eps!r} is invalid: it must be a number > 0.")
        channel_mult, attn_resolutions = tuple(channel_mult), tuple(attn_resolutions)
        out_channels = in_channels if out_channels is None else out_channels
        check_int("backbone.out_channels", out_channels)
        _check_unet(
            in_channels,
            image_size,
            base_channels,
            channel_mult,
            num_res_blocks,
            attn_resolutions,
            dropout,
            num_groups,
        )
        self.in_channels, self.image_size = in_channels, image_size
        temb_dim = 4 * base_channels
        self.base_channels = base_channels
        self.temb = nn.Sequential(
            _init(nn.Linear(base_channels, temb_dim)),
            nn.SiLU(),
            _init(nn.Linear(temb_dim, temb_dim)),
        )
        self.label_embed = None if num_classes is None else LabelEmbedding(num_classes, temb_dim)
        self.conv_in = _conv3x3(in_channels, base_channels)

        def block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, temb_dim, dropout, num_groups, norm_eps)

        self.down = nn.ModuleList()
        skip_channels, ch, res = [base_channels], base_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(block(ch, base_channels * mult))
                ch = base_channels * mult
                if res in attn_resolutions:
                    self.down.append(AttnBlock(ch, num_groups, norm_eps))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(Downsample(ch, downsample_padding))
                skip_channels.append(ch)
                res //= 2
        self.mid = nn.ModuleList(
            [block(ch, ch), AttnBlock(ch, num_groups, norm_eps), block(ch, ch)]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(ch + skip_channels.pop(), base_channels * mult))
                ch = base_channels * mult
                if res in attn_resolutions:
                    self.up.append(AttnBlock(ch, num_groups, norm_eps))
            if level != 0:
                self.up.append(Upsample(ch))
                res *= 2
        self.out = nn.Sequential(
            nn.GroupNorm(num_groups, ch, norm_eps), nn.SiLU(), _conv3x3(ch, out_channels, zero=True)
        )

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (self.in_channels, self.image_size, self.image_size)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        temb = self.temb(timestep_embedding(t, self.base_channels).to(x.dtype))
        temb = with_labels(self.label_embed, temb, y)
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
            if not isinstance(layer, AttnBlock):
                skips.append(h)
            else:
                skips[-1] = h
        for layer in self.mid:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), temb)
            else:
                h = layer(h)
        return self.out(h)


def _check_unet(
    in_channels: int,
    image_size: int,
    base_channels: int,
    channel_mult: tuple[int, ...],
    num_res_blocks: int,
    attn_resolutions: tuple[int, ...],
    dropout: float,
    num_groups: int,
) -> None:
    """Raise a one-sentence ValueError for a U-Net that cannot be built for this data."""
    for key, value in {
        "in_channels": in_channels,
        "image_size": image_size,
        "base_channels": base_channels,
        "num_res_blocks": num_res_blocks,
    }.items():
        check_int(f"backbone.{key}", value)
    if not channel_mult or any(not isinstance(m, int) or m < 1 for m in channel_mult):
        raise ValueError(
            f"backbone.channel_mult={list(channel_mult)} is invalid: it must be a non-empty list "
            "of integers >= 1."
        )
    halvings = len(channel_mult) - 1
    if image_size % 2**halvings:
        raise ValueError(
            f"data.image_size={image_size} cannot be halved {halvings} times as the "
            f"{len(channel_mult)} levels of backbone.channel_mult={list(channel_mult)} need: "
            f"use an image size divisible by {2**halvings} or fewer levels."
        )
    resolutions = [image_size // 2**i for i in range(len(channel_mult))]
    unknown = [r for r in attn_resolutions if r not in resolutions]
    if unknown:
        raise ValueError(
            f"backbone.attn_resolutions={list(attn_resolutions)} has {unknown}, which this U-Net "
            f"never reaches: allowed are its resolutions {resolutions} "
            f"(for image_size={image_size})."
        )
    widths = sorted({base_channels * m for m in channel_mult})
    if any(w % num_groups for w in widths):
        raise ValueError(
            f"backbone.num_groups={num_groups} does not divide the channel widths {widths} of "
            f"backbone.base_channels={base_channels} x channel_mult={list(channel_mult)}: "
            "choose widths that are multiples of num_groups."
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"backbone.dropout={dropout!r} is invalid: it must lie in [0, 1).")
