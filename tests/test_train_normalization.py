"""training/train.py --latent_normalization end to end: tiny models, two steps, CPU.

Oracles: stock diffusers encoding the training images (preprocessed by torchvision) with the run's generator and
batches, the statistics computed with numpy; the constants and weights the run was started from (kept by a
decoder-only fine-tune); the files the run writes, read back.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is first imported

import json

import diffusers
import numpy as np
import pytest
import test_train
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import train, training_images_by_torchvision

from latentvae import AutoencoderKL, export_vae

# The training tests' fixtures: generated images, and a clean Accelerate state after each test.
image_dirs, clean_accelerate_state = test_train.image_dirs, test_train.clean_accelerate_state
STEPS = ["--max_train_steps", "2"]


def run_samples(final, image_dirs) -> np.ndarray:
    """What the run measured, by stock diffusers: posterior samples of every training image in name order, in the
    run's batches (2) with its generator (seed 0, one process)."""
    vae = diffusers.AutoencoderKL.from_pretrained(final).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        batches = training_images_by_torchvision(image_dirs).split(2)
        return (
            torch.cat([vae.encode(b).latent_dist.sample(generator=generator) for b in batches])
            .double()
            .numpy()
        )


def test_shift_scale_writes_the_measured_shift_and_scale(image_dirs, tmp_path, capsys):
    final = train(image_dirs, tmp_path / "run", *STEPS, "--latent_normalization", "shift_scale")
    config = json.loads((final / "config.json").read_text())
    z = run_samples(final, image_dirs)
    assert config["shift_factor"] == pytest.approx(z.mean(), rel=1e-4, abs=1e-7)
    assert config["scaling_factor"] == pytest.approx(1 / z.std(), rel=1e-4)
    normalised = (z - config["shift_factor"]) * config["scaling_factor"]
    assert normalised.mean() == pytest.approx(0.0, abs=1e-4) and normalised.std() == pytest.approx(
        1.0, abs=1e-4
    )

    summary = capsys.readouterr().out
    assert "latent normalisation: shift_scale: scaling_factor" in summary and "over 16 images" in summary
    card = ModelCard.load(final / "README.md").text
    assert f"| shift_factor | {config['shift_factor']!r} |" in card and "at the end of training" in card
    (single,) = [p for p in final.glob("*.safetensors") if p.name != "diffusion_pytorch_model.safetensors"]
    with safe_open(single, "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["config"])["shift_factor"] == config["shift_factor"]
    assert metadata["latent_normalization"].startswith("shift_scale:")
    np.testing.assert_allclose(json.loads(metadata["latent_channel_std"]), z.std(axis=(0, 2, 3)), rtol=1e-4)


def test_a_decoder_only_fine_tune_keeps_the_constants_unless_asked(image_dirs, tmp_path, capsys):
    torch.manual_seed(0)
    start = AutoencoderKL.from_preset("tiny-flux1-kl-f8c16")  # the released FLUX.1 constants
    export_vae(start, tmp_path / "start")
    tuned = ["--pretrained_model_name_or_path", str(tmp_path / "start"), "--decoder_only", *STEPS]
    final = train(image_dirs, tmp_path / "kept", *tuned)
    config = json.loads((final / "config.json").read_text())
    assert (config["shift_factor"], config["scaling_factor"]) == (0.1159, 0.3611)
    assert (
        "latent normalisation: kept as loaded (scaling_factor 0.3611, shift_factor 0.1159)"
        in capsys.readouterr().out
    )
    weights, initial = load_file(final / "diffusion_pytorch_model.safetensors"), start.state_dict()
    assert all(torch.equal(weights[k], initial[k]) for k in initial if k.startswith("encoder."))
    assert not torch.equal(weights["decoder.conv_out.weight"], initial["decoder.conv_out.weight"])

    final = train(image_dirs, tmp_path / "measured", *tuned, "--latent_normalization", "auto")  # the family's
    config = json.loads((final / "config.json").read_text())
    z = run_samples(final, image_dirs)
    assert config["shift_factor"] == pytest.approx(z.mean(), rel=1e-4, abs=1e-7)
    assert config["scaling_factor"] == pytest.approx(1 / z.std(), rel=1e-4)


def test_a_mode_the_model_cannot_hold_stops_the_run_before_training(image_dirs, tmp_path):
    with pytest.raises(ValueError, match="AutoencoderKL has no bn"):
        train(image_dirs, tmp_path / "run", *STEPS, "--latent_normalization", "batchnorm")
    assert not list((tmp_path / "run").glob("checkpoint-*"))
