"""Latent normalisation (latentvae.evaluation.normalization) against oracles: numpy statistics of the same posterior
samples, diffusers' own pipeline code that reads the constants (FLUX.1 img2img's `_encode_vae_image`, FLUX.2's
patchify and BN normalisation), and the normalise -> denormalise round trip."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux_img2img import FluxImg2ImgPipeline
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from test_model import _config, images

from latentvae import AutoencoderKL, AutoencoderKLFlux2, VQModel
from latentvae.evaluation.latent_stats import measure_latent_stats, patchify, unpatchify
from latentvae.evaluation.normalization import (
    apply_normalization,
    check_mode,
    default_mode,
    denormalize_latents,
    held_constants,
    normalize_latents,
    suggestions,
)

SEED = 3
BATCHES = [images(3, 32, seed=1), images(2, 32, seed=2)]  # 5 images, latents 8x8 at f4


def kl_model(**extra) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(**_config((8, 16, 16), latent_channels=4, **extra)).eval()


def flux2_model() -> AutoencoderKLFlux2:
    torch.manual_seed(0)
    return AutoencoderKLFlux2(**_config((8, 16, 16), latent_channels=4)).eval()


def samples(vae, sample_posterior: bool = True) -> torch.Tensor:
    """The latents the measurement sees: the same generator drawn batch after batch, concatenated."""
    generator = torch.Generator().manual_seed(SEED)
    out = []
    with torch.no_grad():
        for batch in BATCHES:
            posterior = vae.encode(batch).latent_dist
            out.append(posterior.sample(generator=generator) if sample_posterior else posterior.mode())
    return torch.cat(out)


def measure(vae, sample_posterior: bool = True, batches=BATCHES, reduce=None):
    generator = torch.Generator().manual_seed(SEED)
    return measure_latent_stats(vae, batches, generator, sample_posterior=sample_posterior, reduce=reduce)


def numpy_patchify(z: np.ndarray) -> np.ndarray:
    """(B, C, h, w) -> (B, 4C, h/2, w/2), channel 4c + 2i + j holding z[:, c, 2y + i, 2x + j]."""
    b, c, h, w = z.shape
    out = np.empty((b, 4 * c, h // 2, w // 2))
    for ch in range(c):
        for i in range(2):
            for j in range(2):
                out[:, 4 * ch + 2 * i + j] = z[:, ch, i::2, j::2]
    return out


def test_statistics_of_each_mode_equal_numpy_over_the_same_samples():
    vae = kl_model()
    z = samples(vae).double().numpy()
    stats = measure(vae)
    found = suggestions(vae, stats)
    assert set(found) == {"scale", "shift_scale", "per_channel"}  # no bn: no batchnorm
    assert found["scale"]["scaling_factor"] == pytest.approx(1 / z.std(), rel=1e-12)
    assert found["scale"]["shift_factor"] is None
    assert found["shift_scale"]["shift_factor"] == pytest.approx(z.mean(), rel=1e-12)
    assert found["shift_scale"]["scaling_factor"] == pytest.approx(1 / (z - z.mean()).std(), rel=1e-12)
    np.testing.assert_allclose(found["per_channel"]["latents_mean"], z.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(found["per_channel"]["latents_std"], z.std(axis=(0, 2, 3)), rtol=1e-12)
    assert found["per_channel"]["scaling_factor"] == 1.0
    patches = numpy_patchify(z)
    np.testing.assert_allclose(stats.patch_mean, patches.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(stats.patch_var, patches.var(axis=(0, 2, 3)), rtol=1e-10)
    assert stats.num_images == 5 and stats.posterior == "sample"


def test_sums_from_two_processes_add_up_to_the_whole_set():
    vae = kl_model()  # posterior modes: the noise drawn would differ between one pass and two shares
    whole = measure(vae, sample_posterior=False, batches=[torch.cat(BATCHES)])
    other = {}  # "process 1" measures the second batch; "process 0" the first, and reduces by adding the two sums
    measure(vae, sample_posterior=False, batches=BATCHES[1:], reduce=lambda t: other.setdefault("sums", t))
    both = measure(vae, sample_posterior=False, batches=BATCHES[:1], reduce=lambda t: t + other["sums"])
    assert both.num_images == whole.num_images == 5
    for field in ("mean", "std", "channel_mean", "channel_std", "patch_mean", "patch_var"):
        np.testing.assert_allclose(getattr(both, field), getattr(whole, field), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("mode", ["scale", "shift_scale", "per_channel"])
def test_pipeline_style_normalise_then_denormalise_round_trips(mode):
    vae = kl_model()
    apply_normalization(vae, mode, measure(vae))
    z = samples(vae)
    normalised = normalize_latents(vae, z)
    torch.testing.assert_close(denormalize_latents(vae, normalised), z, rtol=1e-5, atol=1e-5)
    if mode != "scale":  # the measured set, normalised: mean 0 and std 1 (per channel for per_channel)
        dims = (0, 2, 3) if mode == "per_channel" else None
        mean = normalised.double().mean(dims) if dims else normalised.double().mean()
        std = normalised.double().std(dims, correction=0) if dims else normalised.double().std(correction=0)
        torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
        torch.testing.assert_close(std, torch.ones_like(std), atol=1e-5, rtol=0)
    else:
        assert normalised.double().std().item() == pytest.approx(1.0, abs=1e-3)


def test_shift_scale_through_the_flux_img2img_pipeline_code_gives_mean_0_std_1():
    vae = kl_model(
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611
    )
    assert default_mode(vae) == "shift_scale"
    written = apply_normalization(vae, "shift_scale", measure(vae))
    assert held_constants(vae)["shift_factor"] == written["shift_factor"]
    # diffusers' FluxImg2ImgPipeline._encode_vae_image: retrieve_latents(sample), then (z - shift) * scale
    pipe = SimpleNamespace(vae=vae)
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        latents = torch.cat(
            [FluxImg2ImgPipeline._encode_vae_image(pipe, b, generator) for b in BATCHES]
        ).double()
    assert latents.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert latents.std(correction=0).item() == pytest.approx(1.0, abs=1e-5)


def test_per_channel_warns_that_sdxl_pipelines_change(caplog):
    vae = kl_model()
    with caplog.at_level(logging.WARNING, logger="latentvae.evaluation.normalization"):
        apply_normalization(vae, "per_channel", measure(vae))
    assert "SDXL" in caplog.text
    assert vae.config.scaling_factor == 1.0 and len(vae.config.latents_mean) == 4


def test_batchnorm_sets_the_bn_to_the_patchified_statistics_the_flux2_pipeline_normalises_with():
    vae = flux2_model()
    assert default_mode(vae) == "batchnorm"
    stats = measure(vae, sample_posterior=False)  # FLUX.2 pipelines encode images with the posterior mode
    apply_normalization(vae, "batchnorm", stats)
    z = samples(vae, sample_posterior=False)
    patches = numpy_patchify(z.double().numpy())
    np.testing.assert_allclose(
        vae.bn.running_mean.numpy(), patches.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(vae.bn.running_var.numpy(), patches.var(axis=(0, 2, 3)), rtol=1e-5)
    # our patchify is diffusers' reshape, and unpatchify its inverse
    torch.testing.assert_close(patchify(z), Flux2Pipeline._patchify_latents(z), rtol=0, atol=0)
    torch.testing.assert_close(unpatchify(patchify(z)), z, rtol=0, atol=0)
    # diffusers' Flux2Pipeline._encode_vae_image: argmax latents, patchified, then (z - bn mean) / sqrt(var + eps)
    pipe = SimpleNamespace(vae=vae, _patchify_latents=Flux2Pipeline._patchify_latents)
    with torch.no_grad():
        latents = torch.cat([Flux2Pipeline._encode_vae_image(pipe, b, None) for b in BATCHES]).double()
    mean, std = latents.mean((0, 2, 3)), latents.std((0, 2, 3), correction=0)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-4, rtol=0)
    var = torch.tensor(stats.patch_var, dtype=torch.float64)
    torch.testing.assert_close(std, (var / (var + vae.config.batch_norm_eps)).sqrt(), atol=1e-4, rtol=0)
    torch.testing.assert_close(normalize_latents(vae, z).double(), latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(denormalize_latents(vae, normalize_latents(vae, z)), z, atol=1e-5, rtol=1e-5)


def test_modes_a_model_cannot_hold_are_refused_by_name():
    with pytest.raises(ValueError, match="AutoencoderKL has no bn"):
        check_mode(kl_model(), "batchnorm")
    with pytest.raises(ValueError, match="writes scaling_factor into the config; AutoencoderKLFlux2"):
        check_mode(flux2_model(), "scale")
    vq = VQModel(**_config((8, 16), num_vq_embeddings=16))
    assert default_mode(vq) == "scale"
    with pytest.raises(ValueError, match="no shift_factor"):
        check_mode(vq, "shift_scale")
    assert measure(flux2_model(), batches=[images(2, 20)]).patch_mean is None  # 5x5 latents: no 2x2 patches
    with pytest.raises(ValueError, match="even height and width"):
        apply_normalization(flux2_model(), "batchnorm", measure(flux2_model(), batches=[images(2, 20)]))
