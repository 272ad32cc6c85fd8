"""The eps-networks: shapes, the paper's parameter count, and the errors for impossible shapes."""

import math
import re

import pytest
import torch

from ddpm.backbones import MLP, UNet
from ddpm.backbones.embedding import timestep_embedding


def test_unet_output_shape_and_data_shape() -> None:
    net = UNet(
        in_channels=1,
        image_size=8,
        base_channels=16,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        num_groups=8,
    )
    x = torch.randn(3, 1, 8, 8)
    assert net(x, torch.tensor([0, 5, 999])).shape == x.shape
    assert net.data_shape == (1, 8, 8)


def test_unet_starts_at_zero_and_depends_on_t() -> None:
    net = UNet(
        in_channels=1,
        image_size=8,
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        num_groups=8,
    )
    # The output conv starts at zero (as in the original code), so the net starts at eps = 0.
    x = torch.randn(2, 1, 8, 8)
    assert net(x, torch.tensor([1, 2])).abs().max().item() == 0.0
    # The residual branches also end in zero-initialised convs; randomise every weight.
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    a, b = net(x, torch.tensor([1, 1])), net(x, torch.tensor([1, 900]))
    assert not torch.allclose(a[1], b[1])


def test_paper_cifar10_unet_has_35_7m_parameters() -> None:
    net = UNet(
        in_channels=3,
        image_size=32,
        base_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.1,
    )
    n = sum(p.numel() for p in net.parameters())
    assert round(n / 1e6, 1) == 35.7
    with torch.no_grad():
        assert net(torch.randn(1, 3, 32, 32), torch.tensor([10])).shape == (1, 3, 32, 32)


def test_mlp_output_shape() -> None:
    net = MLP(dim=2, hidden_dim=32, num_layers=2, time_embed_dim=16)
    x = torch.randn(5, 2)
    assert net(x, torch.arange(5)).shape == (5, 2)
    assert net.data_shape == (2,)


def test_timestep_embedding_is_sin_cos_at_geometric_frequencies() -> None:
    t = torch.tensor([0, 7])
    emb = timestep_embedding(t, 8)
    freqs = [10000 ** (-i / 3) for i in range(4)]
    expected = [[math.sin(s * f) for f in freqs] + [math.cos(s * f) for f in freqs] for s in (0, 7)]
    torch.testing.assert_close(emb, torch.tensor(expected))


def test_image_size_that_cannot_be_halved_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"data.image_size=12 cannot be halved 3 times.*divisible by 8"
    ):
        UNet(in_channels=3, image_size=12, channel_mult=(1, 2, 2, 2), attn_resolutions=())


def test_attention_resolution_not_reached_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"backbone.attn_resolutions=\[16\].*allowed are.*\[8, 4, 2\]"
    ):
        UNet(in_channels=1, image_size=8, channel_mult=(1, 2, 2), attn_resolutions=(16,))


def test_group_norm_groups_must_divide_widths() -> None:
    with pytest.raises(ValueError, match=r"backbone.num_groups=32 does not divide"):
        UNet(
            in_channels=1, image_size=8, base_channels=16, channel_mult=(1, 2), attn_resolutions=()
        )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("norm_eps", 0, "backbone.norm_eps=0 is invalid: it must be a number > 0."),
        ("downsample_padding", 2, "backbone.downsample_padding=2 is invalid: allowed are 1"),
    ],
)
def test_norm_eps_and_downsample_padding_are_checked(key: str, value: int, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        UNet(in_channels=1, image_size=8, base_channels=16, channel_mult=(1, 2), num_groups=8,
             attn_resolutions=(), **{key: value})  # fmt: skip
