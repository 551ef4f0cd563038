"""Run an image-to-image network on tiles, so that peak memory is a fraction of an untiled run's (0.18-0.32 at
2048 px for the quickstart VAE, by memory budget: eval/results/benchmark.md), with the untiled result.

The image is cut into a grid of boxes; each box runs with a margin of its neighbours' input around it (its halo),
as wide as the network's receptive field (`receptive_margin`), and keeps only its own box of the output. A
convolution's zero padding at a tile border then never reaches the kept output, so tiles need no blending and
local operations come out exactly as untiled. What a margin cannot give is a network's global statistics: each tile
of a GroupNorm network would normalise with its own mean and variance, and tone would shift from tile to tile
(diffusers' tiling). With `statistics`, measuring passes come first: each runs the tiles up to the next GroupNorm
and pools the moments of the boxes into whole-image statistics (see `SharedStatistics`); the last pass normalises
every tile with those, exactly as an untiled run would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from latentvae.models.blocks import Upsample
from latentvae.models.groupnorm_stats import SharedStatistics, StopTile


def split(length: int, tile: int, align: int = 1) -> list[tuple[int, int]]:
    """[0, length) cut into ceil(length / tile) nearly equal parts, at multiples of `align`."""
    if length % align:
        raise ValueError(
            f"a size of {length} cannot be tiled on a grid of {align}; pad it to a multiple of {align}"
        )
    units, parts = length // align, max(1, -(-length // tile))
    parts = min(parts, units)
    cuts = [round(i * units / parts) * align for i in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


@dataclass(frozen=True)
class Tile:
    """One tile: the (top, bottom, left, right) box of the input it owns, and the larger box it runs on (the owned
    box and its margin, within the image)."""

    owned: tuple[int, int, int, int]
    crop: tuple[int, int, int, int]

    @property
    def region(self) -> tuple[float, float, float, float]:
        """The owned box relative to the crop, as fractions of its height and width (valid at any resolution)."""
        top, bottom, left, right = self.owned
        crop_top, crop_bottom, crop_left, crop_right = self.crop
        height, width = crop_bottom - crop_top, crop_right - crop_left
        return (
            (top - crop_top) / height,
            (bottom - crop_top) / height,
            (left - crop_left) / width,
            (right - crop_left) / width,
        )


def tile_grid(height: int, width: int, tile: int, margin: int, align: int = 1) -> list[Tile]:
    """Boxes of at most `tile` x `tile` partitioning a `height` x `width` input, row by row, each with its crop: a
    window of one size for all tiles (the largest box and `margin` on every side, within the input) that holds its
    box with at least `margin` to spare on every side that is not the input's border. One crop size means one set of
    convolution kernels (oneDNN and cuDNN build one per input shape) and one size of temporaries.

    Args:
        tile: largest side of an owned box, in input pixels.
        margin: halo width in input pixels; rounded up to a multiple of `align`.
        align: box and crop offsets are multiples of this (a stride-2 downsampler needs even offsets).
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    margin = -(-margin // align) * align
    rows, cols = split(height, tile, align), split(width, tile, align)

    def window(lo: int, hi: int, length: int, parts: list[tuple[int, int]]) -> tuple[int, int]:
        size = min(length, max(b - a for a, b in parts) + 2 * margin)
        start = min(max(0, lo - margin), length - size)
        return start, start + size

    return [
        Tile(
            (top, bottom, left, right),
            (*window(top, bottom, height, rows), *window(left, right, width, cols)),
        )
        for top, bottom in rows
        for left, right in cols
    ]


def receptive_margin(fn: nn.Module, channels: int, align: int = 1) -> int:
    """How far, in input pixels, an output pixel of `fn` can see: a halo at least this wide makes a tile's kept
    output exactly the untiled one.

    Measured on a small input: every convolution reaches half its kernel extent (its whole extent if strided, which
    covers asymmetric padding) at its own resolution, converted to input pixels; each resolution the network runs
    at adds one pixel for the rounding of nearest-neighbour and strided resampling. A bound, not the tight value.
    Global operations (attention) have no finite margin: `fn` must not contain any.
    """
    size = 4 * align
    reaches: list[tuple[int, int]] = []  # (reach in pixels of its input, side of its input)

    def record(conv: nn.Conv2d, args: tuple) -> None:
        extent = (conv.kernel_size[0] - 1) * conv.dilation[0]
        reaches.append((extent if conv.stride[0] > 1 else extent // 2, args[0].shape[-2]))

    def record_upsample(upsample: Upsample, args: tuple) -> None:
        # Its 3x3 conv runs folded into a transposed convolution (not through the conv module): an output pixel
        # reads the input pixel under it and one neighbour.
        reaches.append((1, args[0].shape[-2]))

    upsamplers = [m for m in fn.modules() if isinstance(m, Upsample)]
    folded = {id(m.conv) for m in upsamplers}
    convs = [m for m in fn.modules() if isinstance(m, nn.Conv2d) and id(m) not in folded]
    handles = [conv.register_forward_pre_hook(record) for conv in convs]
    handles += [upsample.register_forward_pre_hook(record_upsample) for upsample in upsamplers]
    parameter = next(fn.parameters())
    try:
        with torch.no_grad():
            fn(torch.zeros(1, channels, size, size, device=parameter.device, dtype=parameter.dtype))
    finally:
        for handle in handles:
            handle.remove()
    # A padded input is a pixel or two larger than its resolution's side: the resolution is the nearest power of 2.
    ratios = [2.0 ** round(math.log2(side / size)) for _, side in reaches]
    reach = sum(pixels / ratio for (pixels, _), ratio in zip(reaches, ratios))
    return math.ceil(reach) + len(set(ratios))


def tiled_apply(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    tile: int,
    margin: int,
    scale: float,
    align: int = 1,
    statistics: SharedStatistics | None = None,
) -> Tensor:
    """Apply `fn` to tiles of `x`, each with a halo of `margin` input pixels, and assemble their owned outputs.

    Args:
        fn: maps a (B, C, h, w) crop to (B, C', h * scale, w * scale).
        x: (B, C, H, W) input.
        tile: largest side of a tile's owned box, in input pixels.
        margin: halo width in input pixels; at least `receptive_margin(fn)` for an exact result.
        scale: output size / input size (2 for an upsampling stage, 1/2 for a downsampling one).
        align: tile offsets are multiples of this (`1 / scale` for a downsampling stage).
        statistics: the entered `SharedStatistics` of the network `fn` runs: its GroupNorms then use whole-image
            statistics, measured in one pass per GroupNorm (each stopping at that GroupNorm) before the output pass.

    Returns:
        The (B, C', H * scale, W * scale) output, every pixel from the tile that owns it.
    """
    height, width = x.shape[-2:]
    grid = tile_grid(height, width, tile, margin, align)

    def crop(t: Tile) -> Tensor:
        top, bottom, left, right = t.crop
        return x[..., top:bottom, left:right]

    if statistics is not None:
        while not statistics.complete:
            statistics.begin_pass()
            for t in grid:
                statistics.region = t.region
                try:
                    fn(crop(t))
                except StopTile:
                    pass
            statistics.end_pass()
        statistics.region = None

    out = None
    for t in grid:
        piece = fn(crop(t))
        if out is None:
            layout = torch.channels_last if _is_channels_last(piece) else torch.contiguous_format
            shape = (*piece.shape[:2], round(height * scale), round(width * scale))
            out = torch.empty(shape, device=piece.device, dtype=piece.dtype, memory_format=layout)
        top, bottom, left, right = (round(v * scale) for v in t.owned)
        dy, dx = round(t.crop[0] * scale), round(t.crop[2] * scale)
        out[..., top:bottom, left:right] = piece[..., top - dy : bottom - dy, left - dx : right - dx]
    return out


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


# Peak activation memory of an untiled pass, in units of its largest single activation (weights not included).
# Measured on CPU (peak RSS growth of a fresh process, eval/benchmark.py tiling mode): 3.7 at 1024 px, 3.55 at 2048 px.
PEAK_PER_LARGEST_ACTIVATION = 3.5


def activation_peak_bytes(
    block_out_channels: tuple[int, ...], shape: tuple[int, ...], element_size: int, decoder: bool = True
) -> int:
    """Estimated peak activation memory of an untiled decoder (or encoder) pass for images of `shape` (B, C, H, W).

    The largest activation is the widest level at its resolution, counting the resampler's output, which has the
    level's channels at the neighbouring resolution (in the SD decoder: 256 channels at full resolution, twice the
    final level's 128). A residual block holds about three tensors of its size at once.
    """
    batch, pixels = shape[0], shape[-2] * shape[-1]
    widths = list(reversed(block_out_channels)) if decoder else list(block_out_channels)
    levels = len(widths)
    largest = 0
    for i, width in enumerate(widths):
        # Downsampling 4^k in area: level i of the decoder runs at 1 / 4^(levels-1-i) of the image, of the encoder at 1 / 4^i.
        k = levels - 1 - i if decoder else i
        previous = widths[i - 1] if i > 0 else width
        resampled = k - 1 if decoder else k + 1  # resolution of the resampler's output
        candidates = [max(width, previous) * pixels / 4**k]
        if i < levels - 1:
            candidates.append(width * pixels / 4**resampled)
        largest = max(largest, *candidates)
    return int(PEAK_PER_LARGEST_ACTIVATION * batch * largest * element_size)


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device`: CUDA free memory, Linux `MemAvailable` on CPU, else None."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as file:
                for line in file:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024  # reported in kB
        except OSError:
            return None
    return None
