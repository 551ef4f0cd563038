"""training/train.py --model flux2 end to end on generated images: the tiny FLUX.2 VAE, two steps, CPU.

Oracles: stock diffusers.AutoencoderKLFlux2 (loading the export, and encoding the training images again for the BN
statistics, computed with numpy), the BN statistics given to a decoder-only run (kept), the initial weights (moved by
training).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is first imported

import json

import numpy as np
import pytest
import test_train
import torch
from safetensors.torch import load_file
from test_normalization import numpy_patchify
from test_train import train

from latentvae import AutoencoderKLFlux2, export_vae
from latentvae.training.config import parse_config

# The training tests' fixtures: generated images, and a clean Accelerate state after each test.
image_dirs, clean_accelerate_state = test_train.image_dirs, test_train.clean_accelerate_state
FLUX2 = ["--model", "flux2", "--model_preset", "tiny-flux2-kl-f8c32", "--max_train_steps", "2"]


def flux2_start(folder) -> AutoencoderKLFlux2:
    """The tiny FLUX.2 VAE with BN statistics that are not the init's (as a released FLUX.2 VAE's are not)."""
    torch.manual_seed(0)
    start = AutoencoderKLFlux2.from_preset("tiny-flux2-kl-f8c32")
    with torch.no_grad():
        start.bn.running_mean.normal_()
        start.bn.running_var.uniform_(0.5, 2.0)
    export_vae(start, folder)
    return start


def test_a_flux2_run_exports_a_diffusers_flux2_vae_with_the_measured_bn_statistics(
    image_dirs, tmp_path, capsys
):
    import diffusers

    start = flux2_start(tmp_path / "start")
    final = train(
        image_dirs, tmp_path / "run", *FLUX2, "--pretrained_model_name_or_path", str(tmp_path / "start")
    )

    config = json.loads((final / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLFlux2" and config["latent_channels"] == 32
    assert "scaling_factor" not in config  # FLUX.2 pipelines normalise with the BN statistics instead
    stock = diffusers.AutoencoderKLFlux2.from_pretrained(final).eval()
    trained, initial = stock.state_dict(), start.state_dict()
    moved = [k for k in initial if not k.startswith("bn.") and not torch.equal(trained[k], initial[k])]
    assert "decoder.conv_out.weight" in moved and "encoder.conv_in.weight" in moved
    # The family's normalisation (batchnorm): the BN statistics of the run's posterior samples, patchified 2x2,
    # computed exactly (no momentum); the samples drawn again by stock diffusers, the statistics by numpy.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        batches = test_train.training_images_by_torchvision(image_dirs).split(2)
        z = torch.cat([stock.encode(b).latent_dist.sample(generator=generator) for b in batches])
    patches = numpy_patchify(z.double().numpy())
    np.testing.assert_allclose(trained["bn.running_mean"], patches.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(trained["bn.running_var"], patches.var(axis=(0, 2, 3)), rtol=1e-4)
    assert "latent normalisation: batchnorm: bn.running_mean" in capsys.readouterr().out


def test_a_decoder_only_flux2_fine_tune_keeps_its_bn_statistics(image_dirs, tmp_path):
    start = flux2_start(tmp_path / "start")
    final = train(
        image_dirs, tmp_path / "run", *FLUX2, "--pretrained_model_name_or_path", str(tmp_path / "start"),
        "--decoder_only",
    )  # fmt: skip
    trained, initial = load_file(final / "diffusion_pytorch_model.safetensors"), start.state_dict()
    for key in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(trained[key], initial[key]), key
    assert all(torch.equal(trained[k], initial[k]) for k in initial if k.startswith("encoder."))


def test_the_model_kind_must_fit_the_pretrained_file(image_dirs, tmp_path):
    from training.train import build_vae

    export_vae(AutoencoderKLFlux2.from_preset("tiny-flux2-kl-f8c32"), tmp_path / "flux2")
    cfg, _ = parse_config(["--pretrained_model_name_or_path", str(tmp_path / "flux2")])
    with pytest.raises(ValueError, match="--model flux2"):
        build_vae(cfg)
    cfg, _ = parse_config(["--model", "flux2"])
    assert cfg.model_preset == "flux2-kl-f8c32"  # `--model flux2` alone: the FLUX.2 VAE's shape
    with pytest.raises(
        SystemExit, match="tiny-flux2-kl-f8c32.*got 'tiny-kl-f8' \\(from --recipe quickstart\\)"
    ):
        parse_config(["--recipe", "quickstart", "--model", "flux2"])
