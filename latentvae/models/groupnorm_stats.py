"""GroupNorm with its statistics computed in fp32, or supplied from outside (the whole image, for tiling).

Two users:
- the fast inference path: torch's CPU GroupNorm kernel for channels_last bf16 input loses the statistics when a
  group's mean is large against its spread (a group with mean 1000 and std 4 came out wrong by ~2e4, where the
  NCHW kernel is exact to bf16 rounding), so `Fp32StatsGroupNorm` computes per-channel moments in fp32 itself;
- seam-free tiling: `SharedStatistics` merges the moments of every tile's own region into statistics of the whole
  image and then normalises every tile with those, so tiles no longer differ in tone.

Normalising with given statistics goes through `F.batch_norm`'s inference kernel: it takes bf16/fp16 input with
fp32 mean, variance, weight and bias, does the arithmetic in fp32 and rounds once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentvae.models.blocks import ResnetBlock, Upsample, upsampled_phase_kernel

# Elements per fp32 chunk while computing moments: small enough to stay in cache between the two passes over it.
_CHUNK_ELEMENTS = 1 << 18


@dataclass
class Moments:
    """Per-(sample, channel) statistics of a set of positions, mergeable across chunks and tiles.

    Args:
        count: positions per channel.
        mean: `(N, C)` fp32 means.
        m2: `(N, C)` fp32 sums of squared deviations from the mean.
    """

    count: int
    mean: Tensor
    m2: Tensor

    @classmethod
    @torch.no_grad()
    def of(cls, x: Tensor) -> Moments:
        """Exact two-pass moments of `x` `(N, C, *spatial)` over the spatial dims, in fp32 chunks of rows (any dtype,
        any memory layout)."""
        if x.dim() != 4:  # e.g. (N, C, H*W) tokens in diffusers' attention: one column of rows
            x = x.flatten(2).unsqueeze(-1)
        rows = max(1, _CHUNK_ELEMENTS // max(1, x.shape[0] * x.shape[1] * x.shape[3]))
        parts = []
        for part in x.split(rows, dim=2):
            chunk = part.to(torch.float32, copy=True)  # a copy even for fp32 input: it is modified in place
            mean = chunk.mean((2, 3))
            m2 = chunk.sub_(mean[..., None, None]).square_().sum((2, 3))  # sum (x - mean)^2
            parts.append(cls(part.shape[2] * part.shape[3], mean, m2))
        return cls.combine(parts)

    @classmethod
    def combine(cls, parts: list[Moments]) -> Moments:
        """The moments of the union of disjoint sets (Chan, Golub & LeVeque's pairwise update, all at once)."""
        if len(parts) == 1:
            return parts[0]
        counts = torch.tensor([p.count for p in parts], dtype=torch.float32, device=parts[0].mean.device)
        counts = counts[:, None, None]  # (K, 1, 1) against (K, N, C)
        total = int(sum(p.count for p in parts))
        means = torch.stack([p.mean for p in parts])
        mean = (counts * means).sum(0) / total
        # M2 = sum_k M2_k + sum_k n_k (mean_k - mean)^2
        m2 = torch.stack([p.m2 for p in parts]).sum(0) + (counts * (means - mean).square()).sum(0)
        return cls(total, mean, m2)

    def group_mean_var(self, groups: int) -> tuple[Tensor, Tensor]:
        """`(N, G)` mean and biased variance of each group of C / G channels, as GroupNorm normalises with."""
        mean = self.mean.unflatten(1, (groups, -1))  # (N, G, C/G)
        group_mean = mean.mean(-1)
        # Channels of a group have equal counts: M2_g = sum_c M2_c + count * sum_c (mean_c - mean_g)^2
        m2 = self.m2.unflatten(1, (groups, -1)).sum(-1)
        m2 = m2 + self.count * (mean - group_mean[..., None]).square().sum(-1)
        return group_mean, m2 / (self.count * mean.shape[-1])


def normalize(x: Tensor, mean: Tensor, var: Tensor, norm: nn.GroupNorm) -> Tensor:
    """What `norm` outputs for `x` when its groups have the given `(N, G)` statistics: (x - mean) / sqrt(var + eps)
    * weight + bias, computed in fp32 and rounded once to `x`'s dtype."""
    per_group = norm.num_channels // norm.num_groups
    weight = norm.weight.float() if norm.weight is not None else None
    bias = norm.bias.float() if norm.bias is not None else None
    outputs = [
        # batch_norm's statistics are per channel and shared by the batch: one call per sample.
        F.batch_norm(
            sample,
            mean[i].repeat_interleave(per_group),
            var[i].repeat_interleave(per_group),
            weight,
            bias,
            training=False,
            eps=norm.eps,
        )
        for i, sample in enumerate(x.split(1))
    ]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


class Fp32StatsGroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` whose statistics and affine transform are computed in fp32 whatever the input dtype.

    For inference: the statistics are computed without autograd, so no gradient flows through them.
    """

    def forward(self, x: Tensor) -> Tensor:
        return normalize(x, *Moments.of(x).group_mean_var(self.num_groups), self)


def use_fp32_statistics(module: nn.Module) -> int:
    """Make every `nn.GroupNorm` in `module` an `Fp32StatsGroupNorm`; returns how many were changed.

    The subclass only overrides `forward`, so the class is swapped in place: parameters, their names in
    `state_dict()` and any hooks stay as they are.
    """
    changed = 0
    for child in module.modules():
        if type(child) is nn.GroupNorm:
            child.__class__ = Fp32StatsGroupNorm
            changed += 1
    return changed


class StopTile(Exception):
    """Raised inside a tile by a GroupNorm whose whole-image statistics are being measured: nothing after it can be
    computed before every tile has contributed, so the rest of the tile is skipped in this pass."""


class SharedStatistics:
    """Inside `with SharedStatistics(module) as shared:`, the GroupNorms of `module` use whole-image statistics.

    They are measured one GroupNorm per pass over the tiles, in the order the network runs them: in a pass, every
    tile runs up to the first GroupNorm still without statistics, adds the moments of the region it owns
    (`shared.region`; the regions partition the image) and stops (`StopTile`); `end_pass()` then fixes that
    GroupNorm's statistics. Everything before it already used exact whole-image statistics, so after one pass per
    GroupNorm every one of them normalises exactly as in an untiled run.

    With `sample_stride` s > 1 (the fast, approximate mode), a GroupNorm fed directly by a convolution (a residual
    block's `norm2`, after `conv1`) or by an upsampler (`norm1` of the block after it) is measured on every s-th row
    and column only: in its pass that layer computes just those outputs (1/s^2 of its work) and the moments are
    those of the samples. Everything else stays exact; the error is the sampling error of the statistics (at s = 2,
    57-59 dB PSNR against an untiled decode: eval/results/benchmark.md).

    Args:
        module: the network run on tiles; an `nn.Sequential` of layers when `sample_stride` > 1.
        sample_stride: 1 (exact) or the sampling stride of the fast mode.
    """

    def __init__(self, module: nn.Module, sample_stride: int = 1):
        if sample_stride < 1:
            raise ValueError(f"sample_stride must be >= 1, got {sample_stride}")
        self.norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
        self.sample_stride = sample_stride
        self.feeders = sampled_feeders(module) if sample_stride > 1 else {}
        # (top, bottom, left, right) as fractions of the tile's height and width, while measuring.
        self.region: tuple[float, float, float, float] | None = None
        self.statistics: dict[nn.Module, tuple[Tensor, Tensor]] = {}
        self._measuring: nn.GroupNorm | None = None
        self._next: nn.GroupNorm | None = None
        self._sampling: tuple[nn.Module, object] | None = None  # (feeder, its previous instance forward)
        self._parts: list[Moments] = []
        self._replaced: dict[nn.Module, object] = {}

    def __enter__(self) -> SharedStatistics:
        for norm in self.norms:
            # An instance attribute shadows the class's forward for this object only (as accelerate's hooks do);
            # one that is already there (such a hook) is put back on exit.
            self._replaced[norm] = norm.__dict__.get("forward")
            norm.forward = functools.partial(self._forward, norm)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop_sampling()
        for norm, previous in self._replaced.items():
            _restore_forward(norm, previous)

    def begin_pass(self) -> None:
        """Before a measuring pass: in the fast mode, the layer feeding the GroupNorm this pass measures (the first
        without statistics, as the network runs them) computes only the sampled rows and columns."""
        self._next = next((norm for norm in self.norms if norm not in self.statistics), None)
        feeder = self.feeders.get(self._next)
        if feeder is not None:
            previous, stride = feeder.__dict__.get("forward"), self.sample_stride
            self._sampling = (feeder, previous)
            if previous is None:
                feeder.forward = functools.partial(_sampled_forward, feeder, stride)
            else:  # a hook's forward (e.g. accelerate's offload) stays in charge: run it whole, then sample
                feeder.forward = lambda x: previous(x)[..., ::stride, ::stride]

    def _stop_sampling(self) -> None:
        if self._sampling is not None:
            _restore_forward(*self._sampling)
            self._sampling = None

    @property
    def complete(self) -> bool:
        return len(self.statistics) == len(self.norms)

    def end_pass(self) -> None:
        """Fix the statistics of the GroupNorm measured in this pass from the moments of all tiles."""
        self._stop_sampling()
        if self._measuring is None:
            if not self.complete:
                raise RuntimeError(
                    f"{len(self.norms) - len(self.statistics)} GroupNorm(s) never ran in a pass"
                )
            return
        moments = Moments.combine(self._parts)
        self.statistics[self._measuring] = moments.group_mean_var(self._measuring.num_groups)
        self._measuring, self._next, self._parts = None, None, []

    def _forward(self, norm: nn.GroupNorm, x: Tensor) -> Tensor:
        if norm in self.statistics:
            return normalize(x, *self.statistics[norm], norm)
        if self.region is None:
            raise RuntimeError("a GroupNorm without whole-image statistics ran outside a measuring pass")
        if self._sampling is not None and norm is not self._next:
            raise RuntimeError(
                "GroupNorms ran in another order than the module's: cannot sample their statistics"
            )
        top, bottom, left, right = self.region
        height, width = x.shape[-2:]
        own = x[..., round(top * height) : round(bottom * height), round(left * width) : round(right * width)]
        self._measuring = norm
        self._parts.append(Moments.of(own))
        raise StopTile


def sampled_feeders(stage: nn.Module) -> dict[nn.Module, nn.Module]:
    """GroupNorm -> the layer whose output it normalises, in an `nn.Sequential` of layers: each residual block's
    `norm2` is fed by its `conv1` (through a dropout, the identity in inference), and its `norm1` by the layer
    before the block when that is a convolution or an upsampler."""
    feeders: dict[nn.Module, nn.Module] = {}
    previous = None
    for layer in stage.children():
        if isinstance(layer, ResnetBlock):
            feeders[layer.norm2] = layer.conv1
            if isinstance(previous, (nn.Conv2d, Upsample)):
                feeders[layer.norm1] = previous
        previous = layer
    return feeders


def _sampled_forward(layer: nn.Module, stride: int, x: Tensor) -> Tensor:
    """`layer(x)[..., ::stride, ::stride]`, computing only those outputs."""
    if isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros":
        return F.conv2d(
            x,
            layer.weight,
            layer.bias,
            stride=tuple(stride * s for s in layer.stride),
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
        )
    if isinstance(layer, Upsample) and stride % 2 == 0:
        # Even output rows and columns of nearest-2x-then-3x3 read input rows (i-1, i) with taps (a, b + c).
        kernel = upsampled_phase_kernel(layer.conv.weight)
        return F.conv2d(F.pad(x, (1, 0, 1, 0)), kernel, layer.conv.bias, stride=stride // 2)
    return type(layer).forward(layer, x)[..., ::stride, ::stride]


def _restore_forward(module: nn.Module, previous: object) -> None:
    if previous is None:
        del module.forward
    else:
        module.forward = previous
