"""Run an image-to-image network on overlapping tiles and blend them, so that peak memory is a fraction of an
untiled run's (about 0.2 at 1024-2048 px for the SD shape: eval/results/benchmark.md).

Blending alone cannot hide a network's global statistics: each tile of a GroupNorm network normalises with its
own mean and variance, so tone shifts from tile to tile (diffusers' tiling). With `statistics`, measuring passes
come first: each runs the tiles up to the next GroupNorm and pools the moments of the regions the tiles own into
whole-image statistics (see `SharedStatistics`); the last pass normalises every tile with those, exactly as an
untiled run would. What remains is the zero padding at tile borders, which the overlap and the blending weights
keep away from the output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from latentvae.models.groupnorm_stats import SharedStatistics, StopTile


def tile_starts(length: int, tile: int, stride: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length); the last tile ends exactly at `length`."""
    if length <= tile:
        return [0]
    if (length - tile) % align:
        raise ValueError(
            f"a size of {length} cannot be tiled on a grid of {align}; pad it to a multiple of {align}"
        )
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def owned_ranges(starts: list[int], tile: int, length: int, align: int = 1) -> list[tuple[int, int]]:
    """The part of [0, length) each tile owns: neighbours split their overlap in the middle (on the `align` grid)."""
    cuts = [(start + previous + tile) // 2 // align * align for previous, start in zip(starts, starts[1:])]
    bounds = [0, *cuts, length]
    return list(zip(bounds[:-1], bounds[1:]))


@dataclass(frozen=True)
class Tile:
    """One tile: its (top, left) corner and size in input pixels, and the (top, bottom, left, right) box it owns."""

    top: int
    left: int
    height: int
    width: int
    owned: tuple[int, int, int, int]

    @property
    def region(self) -> tuple[float, float, float, float]:
        """The owned box relative to the tile, as fractions of its height and width (valid at any resolution)."""
        top, bottom, left, right = self.owned
        return (
            (top - self.top) / self.height,
            (bottom - self.top) / self.height,
            (left - self.left) / self.width,
            (right - self.left) / self.width,
        )


def tile_grid(height: int, width: int, tile: int, overlap: float, align: int = 1) -> list[Tile]:
    """Overlapping `tile` x `tile` tiles covering a `height` x `width` input, row by row.

    Args:
        tile: tile side in input pixels.
        overlap: fraction of a tile shared with each neighbour (0 <= overlap < 1).
        align: tile offsets are multiples of this (an encoder's downsampling factor, so tiles map onto latents).
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    stride = max(align, int(tile * (1 - overlap)) // align * align)
    rows, cols = tile_starts(height, tile, stride, align), tile_starts(width, tile, stride, align)
    row_owned = owned_ranges(rows, tile, height, align)
    col_owned = owned_ranges(cols, tile, width, align)
    return [
        Tile(y, x, min(tile, height), min(tile, width), (*row_range, *col_range))
        for y, row_range in zip(rows, row_owned)
        for x, col_range in zip(cols, col_owned)
    ]


def ramp_weights(
    height: int, width: int, blend: int, top: bool, left: bool, bottom: bool, right: bool
) -> Tensor:
    """A (height, width) weight map: 1 inside, rising linearly over `blend` pixels on edges that have a neighbour."""

    def ramp(n: int, start: bool, end: bool) -> Tensor:
        w = torch.ones(n)
        k = min(blend, n)
        if k > 0:
            rise = (torch.arange(k) + 0.5) / k  # strictly positive, so every pixel keeps some weight
            if start:
                w[:k] = torch.minimum(w[:k], rise)
            if end:
                w[n - k :] = torch.minimum(w[n - k :], rise.flip(0))
        return w

    return ramp(height, top, bottom)[:, None] * ramp(width, left, right)[None, :]


def tiled_apply(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    tile: int,
    overlap: float,
    scale: float,
    align: int = 1,
    statistics: SharedStatistics | None = None,
) -> Tensor:
    """Apply `fn` to overlapping `tile` x `tile` crops of `x` and blend the results with linear ramps.

    Args:
        fn: maps a (B, C, h, w) crop to (B, C', h * scale, w * scale).
        x: (B, C, H, W) input.
        tile: tile size in input pixels.
        overlap: fraction of a tile shared with each neighbour (0 <= overlap < 1).
        scale: output size / input size (8 for an f8 decoder, 1/8 for its encoder).
        align: tile offsets are multiples of this (the encoder's downsampling factor, so tiles map onto latents).
        statistics: the entered `SharedStatistics` of the network `fn` runs: its GroupNorms then use whole-image
            statistics, measured in one pass per GroupNorm (each stopping at that GroupNorm) before the output pass.

    Returns:
        The blended (B, C', H * scale, W * scale) output, a weighted mean of the tiles where they overlap.
    """
    height, width = x.shape[-2:]
    grid = tile_grid(height, width, tile, overlap, align)

    def crop(t: Tile) -> Tensor:
        return x[..., t.top : t.top + t.height, t.left : t.left + t.width]

    if statistics is not None:
        while not statistics.complete:
            for t in grid:
                statistics.region = t.region
                try:
                    fn(crop(t))
                except StopTile:
                    pass
            statistics.end_pass()
        statistics.region = None

    blend = int(tile * overlap * scale)
    out = weight = None
    for t in grid:
        piece = fn(crop(t))
        if out is None:
            out_shape = (*piece.shape[:2], round(height * scale), round(width * scale))
            out = torch.zeros(out_shape, device=piece.device, dtype=torch.float32)
            weight = torch.zeros(out_shape[-2:], device=piece.device, dtype=torch.float32)
        ph, pw = piece.shape[-2:]
        neighbours = (t.top > 0, t.left > 0, t.top + t.height < height, t.left + t.width < width)
        w = ramp_weights(ph, pw, blend, *neighbours).to(out.device)
        oy, ox = round(t.top * scale), round(t.left * scale)
        out[..., oy : oy + ph, ox : ox + pw] += piece.float() * w
        weight[oy : oy + ph, ox : ox + pw] += w
    return (out / weight).to(piece.dtype)


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
