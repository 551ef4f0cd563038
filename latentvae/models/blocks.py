"""Building blocks of the SD autoencoder: residual blocks, resampling, self-attention, and the levels built from them.

Module and parameter names follow diffusers (`resnets`, `downsamplers.0.conv`, `attentions.0.to_q`, ...), so a
`state_dict` moves between this package and `diffusers.AutoencoderKL` without conversion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Every norm in the SD autoencoder uses this epsilon (ldm's `Normalize`); diffusers passes resnet_eps=1e-6 too.
NORM_EPS = 1e-6

_ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


def activation(name: str) -> nn.Module:
    """The activation module called `name` (the names diffusers' `get_activation` accepts)."""
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown act_fn {name!r}; choose one of {sorted(_ACTIVATIONS)}") from None


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(f"norm_num_groups={groups} does not divide a block width of {channels} channels")
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """norm -> act -> conv -> norm -> act -> conv, plus a (1x1-projected when widths differ) skip connection."""

    def __init__(
        self, in_channels: int, out_channels: int, groups: int, act_fn: str = "silu", dropout: float = 0.0
    ):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nonlinearity = activation(act_fn)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel on the right and bottom only (the SD encoder's asymmetric pad)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def _fold_upsampled_taps(weight: Tensor, dim: int) -> Tensor:
    """Along `dim`, the 3 taps (a, b, c) of a kernel applied after nearest 2x upsampling, as the 4 taps of one
    stride-2 transposed convolution: output row 2i reads input rows i-1 (a) and i (b + c), row 2i+1 reads i (a + b)
    and i+1 (c); in `conv_transpose2d`'s tap order (padding 1) that is (c, b + c, a + b, a)."""
    a, b, c = weight.unbind(dim)
    return torch.stack([c, b + c, a + b, a], dim)


def upsampled_conv_kernel(weight: Tensor) -> Tensor:
    """The (C_in, C_out, 4, 4) `conv_transpose2d` kernel (stride 2, padding 1) that computes
    `conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, padding=1)` from `x` directly.

    Each output pixel of the upsample-then-convolve reads only 2x2 distinct input pixels, so it costs 4 multiply-adds
    per input channel instead of 9 (4/9 of the FLOPs), and the 4x larger upsampled tensor is never made. The taps are
    summed in the weight's own dtype (fp32 master weights under autocast), before any cast.
    """
    return _fold_upsampled_taps(_fold_upsampled_taps(weight, 2), 3).transpose(0, 1)


def upsampled_phase_kernel(weight: Tensor) -> Tensor:
    """The (C_out, C_in, 2, 2) kernel of the even output rows and columns of `upsampled_conv_kernel`'s convolution:
    on the input padded by one row on top and one column on the left, rows (i-1, i) with taps (a, b + c)."""

    def fold(w: Tensor, dim: int) -> Tensor:
        a, b, c = w.unbind(dim)
        return torch.stack([a, b + c], dim)

    return fold(fold(weight, 2), 3)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv, computed as one stride-2 transposed convolution
    (`upsampled_conv_kernel`): the same function as diffusers' `Upsample2D` (equal up to float rounding), with 4/9
    of its multiply-adds. The weights stay a 3x3 `conv`, so checkpoints are unchanged."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        conv = self.conv
        if "forward" in conv.__dict__ or conv._forward_pre_hooks or conv._forward_hooks:
            # A hook owns the conv (accelerate's sequential offload moves its weights in; an adapter changes them):
            # call the module itself, as diffusers does.
            return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return F.conv_transpose2d(x, upsampled_conv_kernel(conv.weight), conv.bias, stride=2, padding=1)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection.

    Linear q/k/v/out projections (diffusers layout; the original SD file stores them as 1x1 convs) and
    `F.scaled_dot_product_attention`, which picks a fused flash / memory-efficient kernel where one exists.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        # A ModuleList (projection, dropout) only so the keys read `to_out.0.*` as in diffusers.
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        # One head: (B, 1, HW, C), softmax(q k^T / sqrt(C)) v
        q, k, v = (
            proj(tokens).view(b, h * w, 1, c).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v)
        )
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        for layer in self.to_out:
            out = layer(out)
        # attention output first, as diffusers adds them: the sum takes its memory format and rounding order
        return out.transpose(1, 2).reshape(b, c, h, w) + x


class _Level(nn.Module):
    """`num_layers` residual blocks, then (except at the last level) a 2x resampling layer.

    The resampler sits in a one-element ModuleList named `downsamplers` or `upsamplers`, as in diffusers' keys.
    """

    resampler_name: str
    resampler_class: type[nn.Module]

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str, resample: bool
    ):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_layers
        self.resnets = nn.ModuleList(
            ResnetBlock(i, o, groups, act_fn) for i, o in zip(widths[:-1], widths[1:])
        )
        resampler = nn.ModuleList([self.resampler_class(out_channels)]) if resample else None
        setattr(self, self.resampler_name, resampler)

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        resampler = getattr(self, self.resampler_name)
        return x if resampler is None else resampler[0](x)


class DownEncoderBlock(_Level):
    """One encoder level, ending in a 2x downsample."""

    resampler_name, resampler_class = "downsamplers", Downsample


class UpDecoderBlock(_Level):
    """One decoder level, ending in a 2x upsample."""

    resampler_name, resampler_class = "upsamplers", Upsample


class MidBlock(nn.Module):
    """The bottleneck: resnet -> (attention) -> resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool = True):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups, act_fn) for _ in range(2)])
        self.attentions = nn.ModuleList([AttentionBlock(channels, groups)] if add_attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


def check_block_types(
    down_block_types: tuple[str, ...], up_block_types: tuple[str, ...], levels: int
) -> None:
    """Refuse block types other than the plain levels built here (diffusers' DownEncoderBlock2D / UpDecoderBlock2D),
    one per entry of `block_out_channels`."""
    for name, types, kind in (
        ("down", down_block_types, "DownEncoderBlock2D"),
        ("up", up_block_types, "UpDecoderBlock2D"),
    ):
        if len(types) != levels or any(t != kind for t in types):
            raise ValueError(
                f"{name}_block_types must be {levels} x {kind!r} (one per level), got {tuple(types)}"
            )


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2 * latent_channels, H / f, W / f), f = 2^(levels - 1)."""

    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        groups: int,
        act_fn: str,
        mid_block_add_attention: bool,
        double_z: bool = True,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        widths = [block_out_channels[0], *block_out_channels]
        last = len(block_out_channels) - 1
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock(widths[i], widths[i + 1], layers_per_block, groups, act_fn, resample=i < last)
            for i in range(len(block_out_channels))
        )
        self.mid_block = MidBlock(block_out_channels[-1], groups, act_fn, mid_block_add_attention)
        self.conv_norm_out = group_norm(block_out_channels[-1], groups)
        self.conv_act = nn.SiLU()  # SiLU whatever act_fn is, as in ldm and diffusers
        out_channels = 2 * latent_channels if double_z else latent_channels
        self.conv_out = nn.Conv2d(block_out_channels[-1], out_channels, 3, padding=1)
        self.gradient_checkpointing = False  # toggled by ModelMixin.enable_gradient_checkpointing()

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in [*self.down_blocks, self.mid_block]:
            x = _run(self, block, x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, out_channels, h * f, w * f); levels mirror the encoder."""

    def __init__(
        self,
        latent_channels: int,
        out_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        groups: int,
        act_fn: str,
        mid_block_add_attention: bool,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(latent_channels, block_out_channels[-1], 3, padding=1)
        self.mid_block = MidBlock(block_out_channels[-1], groups, act_fn, mid_block_add_attention)
        widths = [block_out_channels[-1], *reversed(block_out_channels)]
        last = len(block_out_channels) - 1
        # The decoder has one more resnet per level than the encoder (ldm's num_res_blocks + 1).
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock(widths[i], widths[i + 1], layers_per_block + 1, groups, act_fn, resample=i < last)
            for i in range(len(block_out_channels))
        )
        self.conv_norm_out = group_norm(block_out_channels[0], groups)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, z: Tensor) -> Tensor:
        x = self.conv_in(z)
        for block in [self.mid_block, *self.up_blocks]:
            x = _run(self, block, x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


def _run(owner: nn.Module, block: nn.Module, x: Tensor) -> Tensor:
    """Call `block`, through activation checkpointing when the owner has it switched on and grads are needed."""
    if owner.gradient_checkpointing and torch.is_grad_enabled():
        return owner._gradient_checkpointing_func(block, x)
    return block(x)
