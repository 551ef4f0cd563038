"""Our 16-channel AutoencoderKL (FLUX.1 / SD3 shape) and our AutoencoderKLFlux2 are drop-in `vae`s for diffusers'
FluxPipeline, FluxImg2ImgPipeline, StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline and Flux2KleinPipeline,
checked offline with tiny randomly initialised pipelines (`flux_offline`).

Oracles: diffusers' own VAE classes holding the same weights (read by `from_pretrained` from our export), in the same
pipeline with the same seed: the images must agree; and the pipelines' own latent (de)normalisation (FLUX.2's
`_encode_vae_image` with its bn statistics, FLUX.1's unpacking and `shift_factor` / `scaling_factor`) against
`latentvae.evaluation.normalization`.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is first imported

import diffusers
import numpy as np
import pytest
import torch
from diffusers import (
    Flux2KleinPipeline,
    FluxImg2ImgPipeline,
    FluxPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
)
from flux_offline import (
    IMAGE_SIZE,
    MAX_SEQUENCE_LENGTH,
    QWEN_LAYERS,
    flux2_klein_components,
    flux_components,
    generate,
    image_to_image,
    sd3_components,
)
from sd_offline import perturb_weights_

from latentvae import AutoencoderKL, AutoencoderKLFlux2, export_vae
from latentvae.evaluation.normalization import denormalize_latents, normalize_latents

# fp32 on CPU, identical weights: the pipelines differ only in our VAE's arithmetic order.
IMAGE_ATOL = 1e-4
FLUX = {"max_sequence_length": MAX_SEQUENCE_LENGTH, "guidance_scale": 3.5}
SD3 = {"max_sequence_length": MAX_SEQUENCE_LENGTH, "guidance_scale": 5.0}
KLEIN = {"max_sequence_length": MAX_SEQUENCE_LENGTH, "text_encoder_out_layers": QWEN_LAYERS}


def build(pipeline_class: type, vae: torch.nn.Module, components: dict) -> diffusers.DiffusionPipeline:
    pipe = pipeline_class(vae=vae, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def max_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    assert actual.shape == expected.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    # Equality of two flat (or fully clipped) images would prove nothing.
    assert expected.std() > 0.05 and ((expected > 0.01) & (expected < 0.99)).mean() > 0.5
    difference = float(np.abs(actual - expected).max())
    print(f"max abs image difference: {difference:.3g}")  # for the record (pytest -rP shows it)
    return difference


def twins(ours: torch.nn.Module, diffusers_class: type, folder) -> tuple[torch.nn.Module, torch.nn.Module]:
    """`ours` with perturbed weights, and `diffusers_class` reading them from our export (`export_vae`)."""
    perturb_weights_(ours, seed=1).eval()
    export_vae(ours, folder)
    return ours, diffusers_class.from_pretrained(folder, local_files_only=True).eval()


@pytest.fixture(scope="module")
def flux1_vaes(tmp_path_factory):
    return twins(
        AutoencoderKL.from_preset("tiny-flux1-kl-f8c16"),
        diffusers.AutoencoderKL,
        tmp_path_factory.mktemp("f1"),
    )


@pytest.fixture(scope="module")
def flux1_parts(tmp_path_factory):
    return flux_components(tmp_path_factory.mktemp("flux_parts"))


@pytest.mark.parametrize("pipeline_class", [FluxPipeline, FluxImg2ImgPipeline])
def test_flux_pipelines_give_the_same_images_with_our_vae(pipeline_class, flux1_vaes, flux1_parts):
    # img2img encodes the image with latent_dist.sample(generator), then (z - shift_factor) * scaling_factor.
    extra = image_to_image() if pipeline_class is FluxImg2ImgPipeline else {}
    ours, reference = flux1_vaes
    expected = generate(build(pipeline_class, reference, flux1_parts), **FLUX, **extra)
    assert (
        max_difference(generate(build(pipeline_class, ours, flux1_parts), **FLUX, **extra), expected)
        < IMAGE_ATOL
    )


def test_the_flux_pipeline_reads_our_shift_factor(flux1_vaes, flux1_parts):
    # The comparison above is sensitive to the normalisation: another shift_factor gives other images.
    ours, _ = flux1_vaes
    expected = generate(build(FluxPipeline, ours, flux1_parts), **FLUX)
    shifted = AutoencoderKL.from_config({**ours.config, "shift_factor": 0.0}).eval()
    shifted.load_state_dict(ours.state_dict())
    assert np.abs(generate(build(FluxPipeline, shifted, flux1_parts), **FLUX) - expected).max() > 1e-2


def test_the_flux_pipelines_latents_decode_with_our_denormalisation(flux1_vaes, flux1_parts):
    ours, _ = flux1_vaes
    pipe = build(FluxPipeline, ours, flux1_parts)
    image = generate(pipe, **FLUX)
    packed = generate(pipe, **FLUX, output_type="latent")  # (1, tokens, 4C): before the pipeline denormalises
    z = FluxPipeline._unpack_latents(torch.as_tensor(packed), IMAGE_SIZE, IMAGE_SIZE, pipe.vae_scale_factor)
    with torch.no_grad():
        decoded = ours.decode(denormalize_latents(ours, z, "shift_scale")).sample
    ours_image = (
        (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    )  # VaeImageProcessor's postprocess
    assert max_difference(ours_image, image) < IMAGE_ATOL


@pytest.fixture(scope="module")
def sd3_vaes(tmp_path_factory):
    return twins(
        AutoencoderKL.from_preset("tiny-sd3-kl-f8c16"),
        diffusers.AutoencoderKL,
        tmp_path_factory.mktemp("sd3"),
    )


@pytest.mark.parametrize("pipeline_class", [StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline])
def test_sd3_pipelines_give_the_same_images_with_our_vae(pipeline_class, sd3_vaes, tmp_path):
    parts = sd3_components(tmp_path)
    extra = image_to_image() if pipeline_class is StableDiffusion3Img2ImgPipeline else {}
    ours, reference = sd3_vaes
    expected = generate(build(pipeline_class, reference, parts), **SD3, **extra)
    assert max_difference(generate(build(pipeline_class, ours, parts), **SD3, **extra), expected) < IMAGE_ATOL


@pytest.fixture(scope="module")
def flux2_vaes(tmp_path_factory):
    ours = AutoencoderKLFlux2.from_preset("tiny-flux2-kl-f8c32")
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # released statistics, not the init's mean 0, variance 1
        ours.bn.running_mean.copy_(torch.randn(ours.bn.num_features, generator=generator) * 0.5)
        ours.bn.running_var.copy_(torch.rand(ours.bn.num_features, generator=generator) + 0.5)
    return twins(ours, diffusers.AutoencoderKLFlux2, tmp_path_factory.mktemp("f2"))


@pytest.mark.parametrize("reference_image", [False, True], ids=["text", "reference image"])
def test_the_flux2_klein_pipeline_gives_the_same_images_with_our_vae(reference_image, flux2_vaes):
    # A reference image is encoded (posterior mode), patchified and normalised with the bn statistics.
    parts = flux2_klein_components()
    extra = {"image": image_to_image()["image"]} if reference_image else {}
    ours, reference = flux2_vaes
    expected = generate(build(Flux2KleinPipeline, reference, parts), **KLEIN, **extra)
    assert (
        max_difference(generate(build(Flux2KleinPipeline, ours, parts), **KLEIN, **extra), expected)
        < IMAGE_ATOL
    )


def test_the_flux2_pipelines_bn_normalisation_is_ours(flux2_vaes):
    ours, reference = flux2_vaes
    pipe = build(Flux2KleinPipeline, reference, flux2_klein_components())
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        theirs = pipe._encode_vae_image(images, generator=None)  # posterior mode, patchified, bn-normalised
        z = ours.encode(images).latent_dist.mode()
    mine = normalize_latents(ours, z, "batchnorm")
    assert mine.shape == theirs.shape == (2, 4 * 32, IMAGE_SIZE // 16, IMAGE_SIZE // 16)
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)
    # And back: the decoder gets what the pipeline gives it (its unpatchify after `latents * std + mean`).
    torch.testing.assert_close(denormalize_latents(ours, theirs, "batchnorm"), z, rtol=0, atol=1e-5)


def test_the_flux2_pipelines_latents_are_denormalised_as_ours(flux2_vaes):
    ours, _ = flux2_vaes
    pipe = build(Flux2KleinPipeline, ours, flux2_klein_components())
    last = {}

    def keep(pipe, step, timestep, tensors):  # the packed, normalised latents after each step
        last["latents"] = tensors["latents"]
        return tensors

    latents = generate(pipe, **KLEIN, output_type="latent", callback_on_step_end=keep)  # what it decodes
    side = IMAGE_SIZE // (pipe.vae_scale_factor * 2)  # tokens: 2x2 patches of the latent, row-major
    normalised = last["latents"].permute(0, 2, 1).reshape(1, 4 * 32, side, side)
    torch.testing.assert_close(denormalize_latents(ours, normalised, "batchnorm"), latents, rtol=0, atol=1e-5)
