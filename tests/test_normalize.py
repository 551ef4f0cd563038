"""`latentvae normalize` on tiny exported VAEs and generated images.

Oracles: stock diffusers encoding the same images (preprocessed by torchvision) with the same generator and batches,
the statistics then computed with numpy; the files written, read back by diffusers and `load_vae`; the model card read
back by huggingface_hub."""

from __future__ import annotations

import json
import logging

import diffusers
import numpy as np
import pytest
import test_train
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_normalization import numpy_patchify
from test_train import RESOLUTION, training_images_by_torchvision

from latentvae import AutoencoderKL, AutoencoderKLFlux2, export_vae, load_vae
from latentvae.cli import main
from latentvae.files.card import CardInfo, TrainingRecord
from latentvae.files.convert import diffusers_to_ldm

image_dirs = test_train.image_dirs  # 16 generated training images (and 2 validation ones)
SEED, BATCH = 5, 4


def normalize(image_dirs, path, *flags: str) -> int:
    argv = ["normalize", str(path), "--data_dir", str(image_dirs[0]), "--resolution", str(RESOLUTION)]
    return main([*argv, "--batch_size", str(BATCH), "--seed", str(SEED), *map(str, flags)])


def diffusers_samples(vae, image_dirs, sample_posterior: bool = True) -> np.ndarray:
    """Posterior samples of the training images by stock diffusers: the command's generator, batches and order."""
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        dists = [vae.encode(b).latent_dist for b in training_images_by_torchvision(image_dirs).split(BATCH)]
    return (
        torch.cat([d.sample(generator=generator) if sample_posterior else d.mode() for d in dists])
        .double()
        .numpy()
    )


def tiny_flux1() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL.from_preset("tiny-flux1-kl-f8c16").eval()


def test_shift_scale_constants_equal_numpy_and_the_export_reloads_with_them(image_dirs, tmp_path, capsys):
    folder = tmp_path / "flux1-vae"
    export_vae(tiny_flux1(), folder)
    assert normalize(image_dirs, folder) == 0  # the family's mode: shift_scale (16 channels, no quant convs)
    out = capsys.readouterr().out
    assert "shift_scale normalisation (the latent family's)" in out and "over 16 images" in out

    config = json.loads((folder / "config.json").read_text())
    stock = diffusers.AutoencoderKL.from_pretrained(folder).eval()
    z = diffusers_samples(stock, image_dirs)
    assert config["shift_factor"] == pytest.approx(z.mean(), rel=1e-5)
    assert config["scaling_factor"] == pytest.approx(1 / (z - z.mean()).std(), rel=1e-5)
    assert config["latents_mean"] is None and config["latents_std"] is None
    assert stock.config.shift_factor == config["shift_factor"]
    # The measured set, normalised as FLUX.1 pipelines do: mean 0 and std 1.
    normalised = (z - config["shift_factor"]) * config["scaling_factor"]
    assert normalised.mean() == pytest.approx(0.0, abs=1e-5) and normalised.std() == pytest.approx(
        1.0, abs=1e-5
    )
    # ... and other posterior samples of the same images: to sampling error.
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        fresh = stock.encode(training_images_by_torchvision(image_dirs)).latent_dist.sample(
            generator=generator
        )
    fresh = (fresh.double().numpy() - config["shift_factor"]) * config["scaling_factor"]
    assert abs(fresh.mean()) < 0.05 and fresh.std() == pytest.approx(1.0, abs=0.05)

    # Both layouts the source had were rewritten: the ldm single file's config holds the same constants.
    single = load_vae(folder / "flux1-vae.safetensors")
    assert single.config.shift_factor == config["shift_factor"]
    with safe_open(folder / "flux1-vae.safetensors", "pt") as f:
        metadata = f.metadata()
    assert "shift_scale" in metadata["latent_normalization"]
    np.testing.assert_allclose(json.loads(metadata["latent_channel_mean"]), z.mean(axis=(0, 2, 3)), rtol=1e-4)
    card = ModelCard.load(folder / "README.md").text
    assert (
        f"| shift_factor | {config['shift_factor']!r} |" in card
        and "measured by `latentvae normalize`" in card
    )


def test_batchnorm_on_tiny_flux2_sets_the_bn_to_the_patchified_statistics(image_dirs, tmp_path, capsys):
    torch.manual_seed(0)
    export_vae(AutoencoderKLFlux2.from_preset("tiny-flux2-kl-f8c32"), tmp_path / "flux2")
    assert normalize(image_dirs, tmp_path / "flux2", "--output", tmp_path / "normalised") == 0
    assert "batchnorm normalisation (the latent family's)" in capsys.readouterr().out

    stock = diffusers.AutoencoderKLFlux2.from_pretrained(tmp_path / "normalised").eval()
    patches = numpy_patchify(diffusers_samples(stock, image_dirs))
    np.testing.assert_allclose(
        stock.bn.running_mean.numpy(), patches.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(stock.bn.running_var.numpy(), patches.var(axis=(0, 2, 3)), rtol=1e-4)
    assert [p.name for p in (tmp_path / "normalised").glob("*.safetensors")] == [
        "diffusion_pytorch_model.safetensors"
    ]
    untouched = load_file(tmp_path / "flux2" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(untouched["bn.running_mean"], torch.zeros(128))  # --output leaves the source as it was


def test_per_channel_rewrites_an_ldm_file_in_place_keeping_its_layout_dtype_and_metadata(
    image_dirs, tmp_path, caplog
):
    vae = tiny_flux1()
    path = tmp_path / "ae.safetensors"  # as FLUX.1's ae.safetensors: ldm keys, fp16 here, no config
    ldm = {k: v.half() for k, v in diffusers_to_ldm(vae.state_dict(), 4).items()}
    save_file(ldm, path, metadata={"format": "pt", "origin": "a test"})
    with caplog.at_level(logging.WARNING, logger="latentvae.evaluation.normalization"):
        assert normalize(image_dirs, path, "--mode", "per_channel") == 0
    assert "SDXL" in caplog.text

    rewritten = load_file(path)
    assert rewritten.keys() == ldm.keys() and all(v.dtype == torch.float16 for v in rewritten.values())
    assert all(torch.equal(rewritten[k], ldm[k]) for k in ldm)  # the weights are untouched
    with safe_open(path, "pt") as f:
        assert f.metadata()["origin"] == "a test"
    loaded = load_vae(path)
    z = diffusers_samples(loaded, image_dirs)
    np.testing.assert_allclose(loaded.config.latents_mean, z.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(loaded.config.latents_std, z.std(axis=(0, 2, 3)), rtol=1e-4)
    assert loaded.config.scaling_factor == 1.0 and loaded.config.shift_factor is None


def test_a_diffusers_folder_keeps_its_files_and_its_card_keeps_the_training(image_dirs, tmp_path):
    folder = tmp_path / "sd-vae"
    torch.manual_seed(0)
    record = TrainingRecord(recipe="quickstart", steps=7, images_per_step=2, resolution=32, data="generated")
    export_vae(AutoencoderKL.from_preset("tiny-kl-f8"), folder, card=CardInfo(training=record))
    (folder / "sd-vae.safetensors").unlink()  # a diffusers folder alone, as on the Hub
    assert normalize(image_dirs, folder, "--max_images", "8") == 0
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    config = json.loads((folder / "config.json").read_text())
    z = diffusers_samples(diffusers.AutoencoderKL.from_pretrained(folder), image_dirs)[:8]
    assert config["scaling_factor"] == pytest.approx(1 / z.std(), rel=1e-5) and config["shift_factor"] is None
    card = ModelCard.load(folder / "README.md").text
    assert "## Training" in card and "7 optimizer steps" in card and "over 8 images" in card
    assert f"| scaling_factor | {config['scaling_factor']!r} |" in card


def test_clear_errors(image_dirs, tmp_path, capsys):
    export_vae(tiny_flux1(), tmp_path / "vae")
    (tmp_path / "empty").mkdir()
    whole = {f"first_stage_model.{k}": v for k, v in diffusers_to_ldm(tiny_flux1().state_dict(), 4).items()}
    save_file(whole, tmp_path / "sd.safetensors")
    cases = [
        (["normalize", tmp_path / "nothing", "--data_dir", image_dirs[0]], "No such VAE file or folder"),
        (["normalize", tmp_path / "vae", "--data_dir", tmp_path / "empty"], "no image files in folder"),
        (["normalize", tmp_path / "vae"], "--data_dir DIR or --dataset_name"),
        (
            ["normalize", tmp_path / "vae", "--data_dir", image_dirs[0], "--mode", "batchnorm"],
            "AutoencoderKL has no bn",
        ),
        (
            ["normalize", tmp_path / "vae", "--data_dir", image_dirs[0], "--mode", "sideways"],
            "choose one of scale",
        ),
        (["normalize", tmp_path / "vae", "--data_dir", image_dirs[0], "--resolution", "36"], "multiple of 8"),
        (["normalize", tmp_path / "sd.safetensors", "--data_dir", image_dirs[0]], "give --output"),
    ]
    for argv, message in cases:
        assert main([str(a) for a in argv]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert (
        json.loads((tmp_path / "vae" / "config.json").read_text())["shift_factor"] == 0.1159
    )  # nothing written
