"""Tiled encode/decode: exact blending for local operations, exact whole-image GroupNorm statistics, tiled close to
untiled on the model (far closer than diffusers' tiling), lower peak memory (measured in child processes)."""

import json
import subprocess
import sys
import textwrap

import diffusers
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from latentvae import AutoencoderKL
from latentvae.models.groupnorm_stats import Moments, SharedStatistics
from latentvae.models.tiling import (
    activation_peak_bytes,
    owned_ranges,
    ramp_weights,
    tile_grid,
    tile_starts,
    tiled_apply,
)


def smooth_image(height: int, width: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.stack([0.8 * torch.sin(2 * yy), 0.8 * torch.cos(1.5 * xx), 0.5 * yy * xx])[None]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_tile_starts_cover_the_whole_length():
    assert tile_starts(64, 64, 48) == [0]
    assert tile_starts(200, 64, 48) == [0, 48, 96, 136]  # the last tile ends exactly at 200
    assert tile_starts(200, 64, 48, align=8) == [0, 48, 96, 136]
    with pytest.raises(ValueError, match="multiple of 8"):
        tile_starts(201, 64, 48, align=8)


@pytest.mark.parametrize("length, tile, stride, align", [(200, 64, 48, 1), (200, 64, 48, 8), (77, 20, 5, 1)])
def test_owned_ranges_partition_the_length_inside_their_tiles(length, tile, stride, align):
    starts = tile_starts(length, tile, stride, align)
    ranges = owned_ranges(starts, tile, length, align)
    assert ranges[0][0] == 0 and ranges[-1][1] == length
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, no overlap
    assert all(start <= lo < hi <= start + tile for start, (lo, hi) in zip(starts, ranges))
    assert all(lo % align == 0 for lo, _ in ranges)


def test_tile_regions_are_fractions_of_the_tile():
    grid = tile_grid(136, 200, 64, 0.25, align=8)
    covered = torch.zeros(136, 200, dtype=torch.int)
    for t in grid:
        top, bottom, left, right = t.region
        y0, y1 = round(t.top + top * t.height), round(t.top + bottom * t.height)
        x0, x1 = round(t.left + left * t.width), round(t.left + right * t.width)
        covered[y0:y1, x0:x1] += 1
    assert torch.all(covered == 1)  # the owned regions partition the image


def test_ramp_weights_rise_only_towards_neighbours():
    w = ramp_weights(8, 8, blend=4, top=True, left=False, bottom=False, right=True)
    assert torch.all(w > 0) and w.max() == 1
    assert torch.all(w[:, 0] == w[:, 3]) and torch.all(w[:4, 3].diff() > 0)  # rises from the top edge
    assert torch.all(w[4:, :4] == 1) and torch.all(w[4, 4:].diff() < 0)  # falls towards the right edge


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_blending_reproduces_a_local_operation_exactly(overlap):
    """For operations without global statistics, tiles blended by any partition of unity equal the whole."""
    x = torch.randn(2, 3, 136, 200)
    up = tiled_apply(lambda t: F.interpolate(t, scale_factor=8, mode="nearest"), x, 48, overlap, scale=8)
    torch.testing.assert_close(up, F.interpolate(x, scale_factor=8, mode="nearest"))
    down = tiled_apply(lambda t: F.avg_pool2d(t, 8), x, 64, overlap, scale=1 / 8, align=8)
    torch.testing.assert_close(down, F.avg_pool2d(x, 8))


def test_moments_merge_to_those_of_the_whole():
    """Oracle: torch.var_mean in float64 over the whole tensor, per sample and channel."""
    x = torch.randn(2, 6, 40, 24, dtype=torch.float64) * 3 + 5
    var, mean = torch.var_mean(x, dim=(2, 3), correction=0)
    parts = [Moments.of(x[..., :, :10].float()), Moments.of(x[..., :, 10:].float())]
    merged = Moments.combine(parts)
    torch.testing.assert_close(merged.mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merged.m2.double() / merged.count, var, rtol=1e-5, atol=1e-6)
    group_var, group_mean = torch.var_mean(x.unflatten(1, (3, 2)), dim=(2, 3, 4), correction=0)
    g_mean, g_var = merged.group_mean_var(3)
    torch.testing.assert_close(g_mean.double(), group_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_var.double(), group_var, rtol=1e-5, atol=1e-6)


def _conv_gn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 3, 1),
    ).eval()  # fmt: skip


@torch.no_grad()
def test_shared_statistics_are_those_of_the_untiled_run():
    """Receptive field 2 px, tiles 32 px with overlap 0.5: the owned regions are 8 px from any tile border, so the
    pooled statistics must equal the untiled ones (to fp32 rounding); the blended output then differs only where the
    tiles' zero padding reaches (under low blending weight), far less than with per-tile statistics."""
    net, x = _conv_gn_net(), torch.randn(1, 3, 96, 80) + torch.linspace(-2, 2, 80)  # a trend: tiles differ
    expected = {}
    hooks = [
        norm.register_forward_pre_hook(lambda m, a: expected.__setitem__(m, Moments.of(a[0]).group_mean_var(m.num_groups)))
        for norm in net.modules()
        if isinstance(norm, nn.GroupNorm)
    ]  # fmt: skip
    untiled = net(x)
    for hook in hooks:
        hook.remove()
    with SharedStatistics(net) as shared:
        tiled = tiled_apply(net, x, 32, 0.5, scale=1, statistics=shared)
    assert shared.statistics.keys() == expected.keys()
    for norm, (mean, var) in expected.items():
        torch.testing.assert_close(shared.statistics[norm][0], mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(shared.statistics[norm][1], var, rtol=1e-5, atol=1e-6)
    assert relative_error(tiled, untiled) < 0.02
    independent = tiled_apply(net, x, 32, 0.5, scale=1)  # per-tile statistics, as diffusers' tiling
    assert relative_error(independent, untiled) > 5 * relative_error(tiled, untiled)


@torch.no_grad()
def test_model_tiles_only_above_the_tile_size_and_keeps_shapes():
    torch.manual_seed(0)
    model = AutoencoderKL.from_preset("tiny-kl-f8", sample_size=64).eval()
    small = smooth_image(64, 64)
    reference = model(small).sample
    model.enable_tiling()
    torch.testing.assert_close(model(small).sample, reference, rtol=0, atol=0)  # not tiled: no change at all
    large = smooth_image(128, 192)
    assert model.encode(large).latent_dist.mean.shape == (1, 4, 16, 24)
    assert model.decode(torch.zeros(1, 4, 16, 24)).sample.shape == (1, 3, 128, 192)
    with pytest.raises(ValueError, match="multiple of"):
        model.enable_tiling(tile_size=60)
    with pytest.raises(ValueError, match="overlap"):
        model.enable_tiling(overlap=1.0)


@torch.no_grad()
def test_tiled_model_is_close_to_untiled_and_far_closer_than_diffusers_tiling():
    """Smooth input, random weights, same tile size and overlap for both implementations. Stated tolerance:
    relative L2 error of tiled vs untiled below 5 % for encode and decode with shared GroupNorm statistics (what
    remains is zero padding at tile borders, amplified by untrained weights; a trained model gives > 60 dB, see
    eval/results/benchmark.md), and at least 10x below diffusers' per-tile statistics (~100 % here)."""
    torch.manual_seed(0)
    ours = AutoencoderKL.from_preset("tiny-kl-f8", sample_size=128).eval()
    ours.tile_memory_budget = None
    theirs = diffusers.AutoencoderKL.from_config(ours.config).eval()
    theirs.load_state_dict(ours.state_dict())
    x = smooth_image(256, 256)
    z = ours.encode(x).latent_dist.mean
    image = ours.decode(z).sample
    ours.enable_tiling()
    theirs.enable_tiling()
    for tiled_ours, tiled_theirs, untiled in (
        (ours.encode(x).latent_dist.mean, theirs.encode(x).latent_dist.mean, z),
        (ours.decode(z).sample, theirs.decode(z).sample, image),
    ):
        assert relative_error(tiled_ours, untiled) < 0.05
        assert relative_error(tiled_theirs, untiled) > 10 * relative_error(tiled_ours, untiled)


@torch.no_grad()
def test_memory_budget_switches_tiling_on():
    torch.manual_seed(0)
    model = AutoencoderKL.from_preset("tiny-kl-f8", sample_size=64).eval()
    z = torch.randn(1, 4, 16, 16)
    model.tile_memory_budget = None
    untiled = model.decode(z).sample
    model.enable_tiling()
    tiled = model.decode(z).sample
    model.disable_tiling()
    estimate = model.untiled_peak_bytes((1, 3, 128, 128))
    model.tile_memory_budget = estimate - 1  # just too little: tiles, without enable_tiling
    torch.testing.assert_close(model.decode(z).sample, tiled, rtol=0, atol=0)
    model.tile_memory_budget = estimate  # enough: untiled
    torch.testing.assert_close(model.decode(z).sample, untiled, rtol=0, atol=0)
    model.tile_memory_budget = "auto"  # half the free memory: a 128 px decode fits anywhere this test runs
    torch.testing.assert_close(model.decode(z).sample, untiled, rtol=0, atol=0)


@torch.no_grad()
def test_a_memory_budget_never_tiles_an_image_the_tile_grid_cannot_take():
    """66 px is not a multiple of 8: the budget must leave the encode untiled (as called), not fail."""
    torch.manual_seed(0)
    model = AutoencoderKL.from_preset("tiny-kl-f8", sample_size=32).eval()
    x = torch.rand(1, 3, 66, 66) * 2 - 1
    model.tile_memory_budget = None
    expected = model.encode(x).latent_dist.mean
    model.tile_memory_budget = 1  # every call over budget
    torch.testing.assert_close(model.encode(x).latent_dist.mean, expected, rtol=0, atol=0)
    with pytest.raises(
        ValueError, match="divisible by 8, got 66x66"
    ):  # asked for explicitly: the clear error stays
        model.enable_tiling()
        model.encode(x)


def test_untiled_estimate_follows_the_widest_level():
    """SD decoder: its widest activation is the 256-channel upsampler output at full resolution."""
    sd = (128, 256, 512, 512)
    one = activation_peak_bytes(sd, (1, 3, 512, 512), 4)
    assert activation_peak_bytes(sd, (2, 3, 1024, 1024), 4) == 8 * one  # linear in batch and pixels
    assert activation_peak_bytes(sd, (1, 3, 512, 512), 2) == one // 2
    widest = 256 * 512 * 512 * 4
    assert one / widest == pytest.approx(
        activation_peak_bytes((8,), (1, 3, 512, 512), 4) / (8 * 512 * 512 * 4)
    )
    encoder = activation_peak_bytes(sd, (1, 3, 512, 512), 4, decoder=False)  # 128 channels at full resolution
    assert encoder == one // 2


_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from latentvae import AutoencoderKL
    from latentvae.evaluation.profiling import PeakMemory
    torch.manual_seed(0)
    model = AutoencoderKL.from_preset("tiny-kl-f8", sample_size=128).eval()
    model.tile_memory_budget = None
    if sys.argv[1] == "tiled":
        model.enable_tiling()
    z = torch.randn(1, 4, 64, 64)
    memory = PeakMemory(torch.device("cpu"), 0)
    with torch.no_grad(), memory.track():
        model.decode(z)
    estimate = model.untiled_peak_bytes((1, 3, 512, 512))
    print(json.dumps({"kind": memory.kind, "growth": memory.growth, "estimate": estimate}))
    """
)


def test_tiled_decode_needs_less_memory_in_a_fresh_process():
    """512 px decode, 128 px tiles: each case in its own process, peak resident set growth during the decode; the
    untiled decode's measured peak also checks the estimate that memory-triggered tiling relies on."""
    results = {}
    for mode in ("untiled", "tiled"):
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True
        )
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    if results["untiled"]["kind"] is None:
        pytest.skip("peak memory is not measurable on this platform")
    assert results["tiled"]["growth"] < 0.5 * results["untiled"]["growth"]
    # The estimate against the measured peak (1.3x here: allocator and kernel scratch come on top): a budget set
    # from it must not be off by more than a factor of two either way.
    untiled = results["untiled"]
    assert 0.5 <= untiled["growth"] / untiled["estimate"] <= 2.0, untiled


def test_shared_statistics_put_back_an_existing_forward_override():
    """accelerate's hooks replace a module's forward on the instance; tiling must leave such a hook in place."""
    net = _conv_gn_net()
    norm = net[1]
    calls = []

    def hooked(x):
        calls.append(1)
        return nn.GroupNorm.forward(norm, x)

    norm.forward = hooked
    with SharedStatistics(net) as shared:
        tiled_apply(net, torch.randn(1, 3, 40, 40), 24, 0.5, scale=1, statistics=shared)
    assert norm.forward is hooked and not calls  # inside: whole-image statistics; after: the hook again
    net(torch.randn(1, 3, 8, 8))
    assert calls == [1]
