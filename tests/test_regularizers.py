"""The latent-space regularisers (`latentvae.training.regularizers`) against oracles: an autoencoder whose
equivariance is known in closed form (8x8 average pooling / nearest upsampling), average pooling computed directly,
a checkerboard and a constant through the low-pass, binomial bounds on the transform draws, and a hand computation
of the anchoring distance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from latentvae import AutoencoderKL
from latentvae.evaluation.latent_health import normalise_latents
from latentvae.training.autoencoding import GaussianAutoencoding
from latentvae.training.losses import AutoencoderLoss
from latentvae.training.regularizers import (
    FrozenAnchor,
    RegularizerSettings,
    Transform,
    lowpass,
    sample_transform,
)
from tests.test_diagnostics import pooling_vae


def block_images(batch: int = 2, size: int = 64, block: int = 32, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1] constant on `block` x `block` squares: every transform below maps them exactly."""
    generator = torch.Generator().manual_seed(seed)
    cells = torch.rand(batch, 3, size // block, size // block, generator=generator) * 2 - 1
    return F.interpolate(cells, scale_factor=block, mode="nearest")


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    return vae.decode(z).sample


@pytest.mark.parametrize("size, turns", [((4, 4), 0), ((4, 4), 1), ((2, 4), 3), ((4, 2), 2)])
def test_one_transform_gives_the_latent_and_the_image_one_geometry(size, turns):
    vae, x = pooling_vae(), block_images()
    z = vae.encode(x).latent_dist.mean  # (2, 3, 8, 8)
    transform = Transform(size, turns)
    target = transform(x, 8)
    expected = (size[0] * 8, size[1] * 8) if turns % 2 == 0 else (size[1] * 8, size[0] * 8)
    assert tuple(target.shape[-2:]) == expected
    # Oracle: the same downscale as plain average pooling, the same rotation by torch.rot90.
    pooled = F.avg_pool2d(x, (64 // (size[0] * 8), 64 // (size[1] * 8)))
    torch.testing.assert_close(target, torch.rot90(pooled, turns, (-2, -1)), rtol=0, atol=1e-6)
    # The pooling autoencoder commutes with T: decode(T(z)) is T(x) exactly.
    torch.testing.assert_close(decode(vae, transform(z)), target, rtol=0, atol=1e-6)
    if turns:  # the latent turned another way than the image: no match
        wrong = Transform(size, (turns + 2) % 4)
        assert (decode(vae, wrong(z)) - target).abs().max() > 0.05


def test_the_equivariance_loss_is_zero_for_an_equivariant_model_and_the_pooled_error_otherwise():
    settings = RegularizerSettings(equivariance_prob=1.0, equivariance_scales="0.5,0.5")
    model = GaussianAutoencoding(pooling_vae(), kl_weight=0.0, settings=settings)
    loss_fn = AutoencoderLoss(perceptual_weight=0.0, disc_weight=0.0)

    x = block_images()
    recon, _, _, aux = model(x, torch.Generator().manual_seed(0))
    _, logs = loss_fn.autoencoder_loss(x, recon, 0, auxiliary=aux)
    assert (
        logs["equivariance_loss"] < 1e-6
    )  # the posterior noise (std e^-15) and rounding are all that is left

    torch.manual_seed(1)
    x = torch.rand(2, 3, 64, 64) * 2 - 1  # not block-constant: decode(T(z)) is the 16x16 block mean of T(x)
    recon, _, _, aux = model(x, torch.Generator().manual_seed(0))
    loss, logs = loss_fn.autoencoder_loss(x, recon, 0, auxiliary=aux)
    target = F.avg_pool2d(x, 2)
    prediction = F.interpolate(F.avg_pool2d(x, 16), scale_factor=8, mode="nearest")
    # Summed over the 32x32 pixels per image, averaged over the batch, scaled by the 4x fewer pixels than x's.
    expected = (target - prediction).pow(2).sum() / 2 * 4
    assert logs["equivariance_loss"] == pytest.approx(expected.item(), rel=1e-4)
    main = (x - recon).pow(2).sum() / 2
    assert loss.item() == pytest.approx((main + expected).item(), rel=1e-4)


def test_transform_draws_follow_the_settings_and_the_generator():
    off = RegularizerSettings()
    assert sample_transform((32, 32), off, torch.Generator().manual_seed(0)) is None
    settings = RegularizerSettings(equivariance_prob=0.3, equivariance_scales="0.25,0.75")
    generator = torch.Generator().manual_seed(0)
    draws = [sample_transform((32, 32), settings, generator) for _ in range(2000)]
    applied = [t for t in draws if t is not None]
    # Binomial(2000, 0.3): mean 600, std 20.5; 5 std either side.
    assert 500 < len(applied) < 700
    assert all(8 <= t.size[0] <= 24 and t.size[0] == t.size[1] and t.quarter_turns == 0 for t in applied)
    assert min(t.size[0] for t in applied) <= 9 and max(t.size[0] for t in applied) >= 23
    # The same generator state gives the same transforms (what makes a resumed run exact).
    again = torch.Generator().manual_seed(0)
    assert [sample_transform((32, 32), settings, again) for _ in range(2000)] == draws

    both = RegularizerSettings(
        equivariance_prob=1.0, equivariance_anisotropic=True, equivariance_rotations=True
    )
    generator = torch.Generator().manual_seed(1)
    draws = [sample_transform((32, 32), both, generator) for _ in range(400)]
    assert any(t.size[0] != t.size[1] for t in draws)
    assert {t.quarter_turns for t in draws} == {0, 1, 2, 3}
    # A tiny latent keeps at least one position.
    assert sample_transform((1, 1), both, generator).size == (1, 1)


@pytest.mark.parametrize(
    "text", ["0,0.5", "0.5,1.0", "0.8,0.2", "a,b", "0.1,0.2,0.3"], ids=lambda t: t.replace(",", "-")
)
def test_bad_equivariance_scales_are_refused_with_the_flag_named(text):
    with pytest.raises(ValueError, match="--equivariance_scales"):
        RegularizerSettings(equivariance_scales=text).check_regularizers()


def test_the_lowpass_removes_what_lies_above_its_cutoff_and_keeps_a_constant():
    y, x = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    checkerboard = ((x + y) % 2 * 2 - 1).float().expand(1, 2, 32, 32)  # the highest frequency there is
    torch.testing.assert_close(lowpass(checkerboard, 2), torch.zeros_like(checkerboard), rtol=0, atol=1e-6)
    constant = torch.full((1, 2, 32, 32), 0.37)
    torch.testing.assert_close(lowpass(constant, 4), constant, rtol=0, atol=1e-6)
    # A slow wave (period 32 samples) passes a factor-2 low-pass almost unchanged.
    wave = torch.sin(2 * math.pi * x / 32).float().expand(1, 1, 32, 32)
    assert (lowpass(wave, 2) - wave).abs().mean() < 0.05


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_preset("tiny-kl-f8")
    vae.register_to_config(scaling_factor=0.5, shift_factor=0.2)
    return vae


def test_anchoring_is_zero_at_the_start_and_the_hand_computed_distance_after_a_change():
    vae = tiny_vae()
    settings = RegularizerSettings(latent_anchor_weight=2.0)
    model = GaussianAutoencoding(vae, kl_weight=0.0, settings=settings)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    _, reg, logs, _ = model(x, torch.Generator().manual_seed(0))
    assert logs["anchor_loss"] == 0 and reg == 0

    start = vae.encode(x).latent_dist.mean.detach()
    with torch.no_grad():
        vae.encoder.conv_out.bias.add_(0.1)
    moved = vae.encode(x).latent_dist.mean
    _, reg, logs, _ = model(x, torch.Generator().manual_seed(0))
    # Oracle: (z - shift) * scale of both, squared, summed over C, h, w, averaged over the batch.
    expected = ((moved - 0.2) * 0.5 - (start - 0.2) * 0.5).pow(2).sum() / 2
    assert logs["anchor_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert reg.item() == pytest.approx(2 * expected.item(), rel=1e-5)

    # Gradient only through the trained encoder: none into the decoder or the frozen copy.
    reg.backward()
    assert vae.encoder.conv_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in vae.decoder.parameters())
    assert all(not p.requires_grad and p.grad is None for p in model.anchor.parameters())


def test_the_frozen_start_stays_out_of_checkpoints_and_loads_strictly():
    model = GaussianAutoencoding(tiny_vae(), settings=RegularizerSettings(latent_anchor_weight=1.0))
    state = model.state_dict()
    assert state and not any(k.startswith("anchor.") for k in state)
    assert any(k.startswith("anchor.") for k, _ in model.named_parameters())
    other = GaussianAutoencoding(tiny_vae(seed=1), settings=RegularizerSettings(latent_anchor_weight=1.0))
    other.load_state_dict(state, strict=True)  # the trained weights load; the anchor keeps its own start
    assert torch.equal(other.vae.encoder.conv_in.weight, model.vae.encoder.conv_in.weight)
    assert not torch.equal(
        other.anchor.start.encoder.conv_in.weight, model.anchor.start.encoder.conv_in.weight
    )
    assert model.train().anchor.training is False


def test_the_anchor_normalises_as_the_pipeline_does():
    vae = tiny_vae()
    anchor = FrozenAnchor(vae)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(anchor(x), normalise_latents(vae, vae.encode(x).latent_dist.mean))
    assert anchor.start.decoder is None  # the copy holds no decoder


def test_a_vq_model_gets_the_image_terms_through_its_codebook():
    from latentvae import VQModel
    from latentvae.training.autoencoding import VQAutoencoding

    torch.manual_seed(0)
    vae = VQModel.from_preset("tiny-vq-f4")
    settings = RegularizerSettings(
        equivariance_prob=1.0, equivariance_scales="0.5,0.5", latent_lowpass_weight=0.5
    )
    model = VQAutoencoding(vae, settings=settings)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, _, _, aux = model(x, torch.Generator().manual_seed(0))
    prediction, target, weight = aux["equivariance"]
    assert prediction.shape == target.shape == (2, 3, 16, 16) and weight == 1.0
    torch.testing.assert_close(target, F.avg_pool2d(x, 2))
    assert aux["lowpass"][0].shape == x.shape
    loss_fn = AutoencoderLoss(perceptual_weight=0.0, disc_weight=0.0)
    loss, logs = loss_fn.autoencoder_loss(x, recon, 0, auxiliary=aux)
    loss.backward()  # gradients reach the decoder through both terms
    assert logs["equivariance_loss"] > 0 and logs["lowpass_loss"] > 0
    assert vae.decoder.conv_out.weight.grad.abs().sum() > 0


def test_small_transformed_images_are_scored_without_lpips_and_large_ones_with_it():
    from latentvae.pretrained import build_lpips

    lpips = build_lpips("squeeze", random_backbone=True)
    with_lpips = AutoencoderLoss(perceptual_loss=lpips, perceptual_weight=1.0, disc_weight=0.0)
    pixels_only = AutoencoderLoss(perceptual_weight=0.0, disc_weight=0.0)
    torch.manual_seed(0)
    x, recon = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    for size, lpips_counts in ((16, False), (32, True)):
        target, prediction = torch.rand(2, 3, size, size) * 2 - 1, torch.rand(2, 3, size, size) * 2 - 1
        aux = {"equivariance": (prediction, target, 1.0)}
        found = with_lpips.autoencoder_loss(x, recon, 0, auxiliary=aux)[1]["equivariance_loss"]
        plain = pixels_only.autoencoder_loss(x, recon, 0, auxiliary=aux)[1]["equivariance_loss"]
        assert (found != plain) == lpips_counts, size
