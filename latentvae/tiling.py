"""Run an image-to-image network on overlapping tiles and blend them, so memory stays flat as images grow."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


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
    fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: float, scale: float, align: int = 1
):
    """Apply `fn` to overlapping `tile` x `tile` crops of `x` and blend the results with linear ramps.

    Args:
        fn: maps a (B, C, h, w) crop to (B, C', h * scale, w * scale).
        x: (B, C, H, W) input.
        tile: tile size in input pixels.
        overlap: fraction of a tile shared with each neighbour (0 <= overlap < 1).
        scale: output size / input size (8 for an f8 decoder, 1/8 for its encoder).
        align: tile offsets are multiples of this (the encoder's downsampling factor, so tiles map onto latents).

    Returns:
        The blended (B, C', H * scale, W * scale) output, a weighted mean of the tiles where they overlap.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    height, width = x.shape[-2:]
    stride = max(align, int(tile * (1 - overlap)) // align * align)
    rows, cols = tile_starts(height, tile, stride, align), tile_starts(width, tile, stride, align)
    blend = int(tile * overlap * scale)
    out = weight = None
    for y in rows:
        for x0 in cols:
            piece = fn(x[..., y : y + tile, x0 : x0 + tile])
            if out is None:
                out_shape = (*piece.shape[:2], round(height * scale), round(width * scale))
                out = torch.zeros(out_shape, device=piece.device, dtype=torch.float32)
                weight = torch.zeros(out_shape[-2:], device=piece.device, dtype=torch.float32)
            ph, pw = piece.shape[-2:]
            w = ramp_weights(ph, pw, blend, y > 0, x0 > 0, y + tile < height, x0 + tile < width).to(
                out.device
            )
            oy, ox = round(y * scale), round(x0 * scale)
            out[..., oy : oy + ph, ox : ox + pw] += piece.float() * w
            weight[oy : oy + ph, ox : ox + pw] += w
    return (out / weight).to(piece.dtype)
