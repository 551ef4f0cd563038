"""Our AutoencoderKL is a drop-in `vae` for diffusers' Stable Diffusion pipelines, checked fully offline.

The oracle is diffusers itself: the same tiny pipeline, seed and weights, once with `diffusers.AutoencoderKL`
and once with ours, must give the same images; and a pipeline saved with our VAE must load back, both with our
class and with stock diffusers loading.
"""

import os

# Nothing below may reach a model hub; huggingface_hub reads this once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess
import sys
import textwrap
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from sd_offline import (
    TINY_SD_VAE_CONFIG,
    image_to_image,
    perturb_weights_,
    shared_sd_components,
    text_to_image,
)

from latentvae.models.autoencoder_kl import AutoencoderKL

# fp32 on CPU, identical weights: the pipelines differ only in our VAE's arithmetic order.
IMAGE_ATOL = 1e-4


def build(
    pipeline_class: type[DiffusionPipeline], vae: torch.nn.Module, components: dict
) -> DiffusionPipeline:
    pipe = pipeline_class(vae=vae, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_images_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape == (1, 64, 64, 3)
    max_diff = np.abs(actual - expected).max()
    assert max_diff < IMAGE_ATOL, f"images differ by up to {max_diff:.3g} (allowed {IMAGE_ATOL})"


@pytest.fixture(scope="module")
def components(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return shared_sd_components(tmp_path_factory.mktemp("sd_parts"))


@pytest.fixture(scope="module")
def vaes() -> tuple[AutoencoderKL, diffusers.AutoencoderKL]:
    """Our VAE with perturbed weights, and diffusers' VAE holding exactly those weights."""
    ours = perturb_weights_(AutoencoderKL(**TINY_SD_VAE_CONFIG), seed=1).eval()
    reference = diffusers.AutoencoderKL(**TINY_SD_VAE_CONFIG).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    return ours, reference


@pytest.fixture(scope="module")
def reference_images(vaes, components) -> dict[str, np.ndarray]:
    """What diffusers' own VAE gives: the expected output of every test below."""
    reference = vaes[1]
    return {
        "text": text_to_image(build(StableDiffusionPipeline, reference, components)),
        "image": image_to_image(build(StableDiffusionImg2ImgPipeline, reference, components)),
    }


@pytest.fixture(scope="module")
def saved_pipeline(vaes, components, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A text-to-image pipeline with our VAE, written by `save_pretrained`."""
    directory = tmp_path_factory.mktemp("saved_pipeline")
    build(StableDiffusionPipeline, vaes[0], components).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def portable_pipeline(vaes, components, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same pipeline saved after `pipe.vae = pipe.vae.to_diffusers()`, as the README tells users to do:
    model_index.json then names diffusers, not latentvae, for the vae."""
    directory = tmp_path_factory.mktemp("portable_pipeline")
    pipe = build(StableDiffusionPipeline, vaes[0], components)
    pipe.vae = pipe.vae.to_diffusers()
    pipe.save_pretrained(directory)
    return directory


def test_reference_images_are_not_degenerate(reference_images):
    # Equality of two black (or fully clipped) images would prove nothing.
    for name, images in reference_images.items():
        unclipped = ((images > 0.01) & (images < 0.99)).mean()
        assert images.std() > 0.05 and unclipped > 0.5, (
            f"{name}: std {images.std():.3f}, unclipped {unclipped:.2f}"
        )


def test_vae_weights_reach_the_images(components, reference_images):
    # The comparisons below are sensitive: a VAE with other weights gives visibly other images.
    other = perturb_weights_(diffusers.AutoencoderKL(**TINY_SD_VAE_CONFIG), seed=2).eval()
    images = text_to_image(build(StableDiffusionPipeline, other, components))
    assert np.abs(images - reference_images["text"]).max() > 1e-2


def test_text_to_image_matches_diffusers_vae(vaes, components, reference_images):
    images = text_to_image(build(StableDiffusionPipeline, vaes[0], components))
    assert_images_close(images, reference_images["text"])


def test_image_to_image_matches_diffusers_vae(vaes, components, reference_images):
    # img2img encodes the init image with latent_dist.sample(generator) and then draws the noise from the same
    # generator, so this also checks that our sampling consumes the generator exactly as diffusers' does.
    images = image_to_image(build(StableDiffusionImg2ImgPipeline, vaes[0], components))
    assert_images_close(images, reference_images["image"])


def test_save_pretrained_reloads_with_our_class(saved_pipeline, reference_images):
    vae = AutoencoderKL.from_pretrained(saved_pipeline / "vae", local_files_only=True)
    pipe = StableDiffusionPipeline.from_pretrained(saved_pipeline, vae=vae, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.vae) is AutoencoderKL
    assert_images_close(text_to_image(pipe), reference_images["text"])


def test_saved_vae_folder_loads_in_diffusers_class(saved_pipeline, reference_images):
    # diffusers' own class reads the saved vae/ folder strictly (a missing or extra key is an error).
    vae = diffusers.AutoencoderKL.from_pretrained(saved_pipeline / "vae", local_files_only=True)
    pipe = DiffusionPipeline.from_pretrained(saved_pipeline, vae=vae, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.vae) is diffusers.AutoencoderKL
    assert_images_close(text_to_image(pipe), reference_images["text"])


def test_saved_pipeline_loads_with_stock_from_pretrained(saved_pipeline, reference_images):
    pipe = DiffusionPipeline.from_pretrained(saved_pipeline, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert_images_close(text_to_image(pipe), reference_images["text"])


def test_saved_pipeline_loads_without_latentvae(portable_pipeline, reference_images, tmp_path):
    # The user who receives the saved pipeline may not have latentvae: in a fresh process that never imports
    # it, stock diffusers must load the folder (building diffusers.AutoencoderKL) and give the same images.
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import diffusers, numpy as np
        from sd_offline import text_to_image
        pipe = diffusers.DiffusionPipeline.from_pretrained({str(portable_pipeline)!r}, local_files_only=True)
        assert type(pipe.vae) is diffusers.AutoencoderKL, type(pipe.vae)
        assert "latentvae" not in sys.modules
        pipe.set_progress_bar_config(disable=True)
        np.save({str(tmp_path / "images.npy")!r}, text_to_image(pipe))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_images_close(np.load(tmp_path / "images.npy"), reference_images["text"])


def test_a_pipeline_saved_with_the_old_module_path_still_loads(saved_pipeline, reference_images, tmp_path):
    """latentvae 0.1 wrote `["latentvae.autoencoder_kl", "AutoencoderKL"]` into model_index.json; that path stays.
    (diffusers loads a custom component only from a module already imported, as its error message says.)"""
    import json
    import shutil

    import latentvae.autoencoder_kl  # noqa: F401

    old = shutil.copytree(saved_pipeline, tmp_path / "old_pipeline")
    index = json.loads((old / "model_index.json").read_text())
    assert index["vae"] == [
        "latentvae.models.autoencoder_kl",
        "AutoencoderKL",
    ]  # what save_pretrained writes now
    index["vae"] = ["latentvae.autoencoder_kl", "AutoencoderKL"]
    (old / "model_index.json").write_text(json.dumps(index))
    pipe = DiffusionPipeline.from_pretrained(old, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.vae) is AutoencoderKL
    assert_images_close(text_to_image(pipe), reference_images["text"])
