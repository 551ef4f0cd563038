"""Fine-tuning the 16-channel FLUX.1 / SD3 VAEs and the FLUX.2 VAE with training/train.py --decoder_only, from the
files people have: a diffusers folder, BFL's FLUX.1 `ae.safetensors` layout (original-SD key names, no quant convs),
a whole SD3 checkpoint (the VAE under `first_stage_model.`). Tiny shapes, two steps, CPU.

Oracles: models built by stock diffusers (the starting weights), diffusers' own ldm -> diffusers converter
(`convert_ldm_vae_checkpoint`, that the files written here are what its single-file loader reads), the encoder's
outputs before training (bit-identical after a decoder-only run), the released constants (kept).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is first imported

import json
from pathlib import Path

import pytest
import test_train
import torch
from safetensors.torch import save_file
from test_train import train

from latentvae import load_vae
from latentvae.files.convert import FAMILY_MARKS, diffusers_to_ldm
from latentvae.files.loading import read_vae
from latentvae.training.config import parse_config

# The training tests' fixtures: generated images, and a clean Accelerate state after each test.
image_dirs, clean_accelerate_state = test_train.image_dirs, test_train.clean_accelerate_state
STEPS = ["--max_train_steps", "2", "--learning_rate", "1e-3"]
# The released models' constants (their diffusers configs: black-forest-labs/FLUX.1-dev and
# stabilityai/stable-diffusion-3-medium-diffusers, vae/config.json).
FLUX1 = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
SD3 = {"scaling_factor": 1.5305, "shift_factor": 0.0609}


def tiny_16_channel_vae(seed: int = 0, latent_channels: int = 16, **constants):
    """A FLUX.1 / SD3-shaped diffusers.AutoencoderKL, tiny: 16 latent channels, no quant convs, mid attention; 32
    norm groups, which the shapes alone imply (as they do for the released 128..512-wide models)."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **constants,
    ).eval()


def ldm_state_dict(vae) -> dict[str, torch.Tensor]:
    """`vae`'s tensors with original-SD (ldm) key names, checked against diffusers' own single-file converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ldm = {k: v.contiguous() for k, v in diffusers_to_ldm(vae.state_dict()).items()}
    back = convert_ldm_vae_checkpoint(dict(ldm), dict(vae.config))
    assert sorted(back) == sorted(vae.state_dict())
    assert all(torch.equal(back[k].reshape(v.shape), v) for k, v in vae.state_dict().items())
    return ldm


def encoder_moments(vae, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.encode(images).latent_dist.parameters


def probe_images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1


def check_decoder_only_export(final: Path, start, constants: dict[str, float]) -> None:
    """The export of a decoder-only run: stock diffusers loads it, its encoder gives bit-identical outputs, its
    decoder moved, and its config holds `constants` exactly."""
    import diffusers

    config = json.loads((final / "config.json").read_text())
    for key, value in constants.items():
        assert config[key] == value, key
    assert config["latent_channels"] == 16 and config["use_quant_conv"] is False
    trained = diffusers.AutoencoderKL.from_pretrained(final).eval()
    assert torch.equal(encoder_moments(trained, probe_images()), encoder_moments(start, probe_images()))
    before, after = start.state_dict(), trained.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("encoder."))
    assert not torch.equal(after["decoder.conv_out.weight"], before["decoder.conv_out.weight"])
    assert "Latent normalisation: kept as loaded" in (final / "README.md").read_text()


def test_the_family_marks_are_the_keys_diffusers_tells_checkpoints_apart_by():
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    known = {
        "SD3": CHECKPOINT_KEY_NAMES["sd3"] + CHECKPOINT_KEY_NAMES["sd35_large"],
        "FLUX.1": CHECKPOINT_KEY_NAMES["flux"],
    }
    for family, marks in FAMILY_MARKS.items():
        for mark in marks:
            assert mark in known[family] and f"model.diffusion_model.{mark}" in known[family]


def test_a_file_without_config_gets_its_familys_released_constants(tmp_path):
    vae = tiny_16_channel_vae()
    save_file(ldm_state_dict(vae), tmp_path / "ae.safetensors")  # BFL's layout
    save_file(
        vae.state_dict(), tmp_path / "diffusers-keys.safetensors"
    )  # a loose diffusers file: no family known
    flux1 = read_vae(tmp_path / "ae.safetensors")
    assert {k: flux1.config[k] for k in FLUX1} == FLUX1 and "FLUX.1's released" in flux1.config_source
    assert load_vae(tmp_path / "ae.safetensors").config.shift_factor == FLUX1["shift_factor"]
    loose = read_vae(tmp_path / "diffusers-keys.safetensors")
    assert "shift_factor" not in loose.config and loose.config_source == "inferred from tensor shapes"
    # A 4-channel VAE in the ldm layout is no FLUX.1 VAE: the SD defaults stay.
    sd = tiny_16_channel_vae(latent_channels=4)
    save_file(ldm_state_dict(sd), tmp_path / "sd.safetensors")
    assert "shift_factor" not in read_vae(tmp_path / "sd.safetensors").config


@pytest.mark.parametrize("layout", ["diffusers folder", "flux1 ae.safetensors"])
def test_a_decoder_only_run_keeps_a_flux1_vaes_latent_space_and_constants(layout, image_dirs, tmp_path):
    start = tiny_16_channel_vae(**FLUX1)
    if layout == "diffusers folder":
        start.save_pretrained(tmp_path / "flux1")
        source = tmp_path / "flux1"
    else:  # BFL's file: ldm key names, no config, no quant convs, nothing else
        source = tmp_path / "ae.safetensors"
        save_file(ldm_state_dict(start), source)
    final = train(
        image_dirs, tmp_path / "run", *STEPS, "--pretrained_model_name_or_path", str(source), "--decoder_only"
    )
    check_decoder_only_export(final, start, FLUX1)


def test_an_sd3_checkpoints_vae_is_fine_tuned_with_sd3s_constants(image_dirs, tmp_path):
    # A whole SD3 checkpoint: the VAE under first_stage_model. (ldm keys), beside the transformer, whose keys tell
    # the family (one of them suffices here; the VAE's shape is FLUX.1's too).
    start = tiny_16_channel_vae(seed=1, **SD3)
    whole = {f"first_stage_model.{k}": v for k, v in ldm_state_dict(start).items()}
    whole["model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias"] = torch.zeros(8)
    save_file(whole, tmp_path / "sd3_medium.safetensors")
    final = train(
        image_dirs, tmp_path / "run", *STEPS, "--decoder_only",
        "--pretrained_model_name_or_path", str(tmp_path / "sd3_medium.safetensors"),
    )  # fmt: skip
    check_decoder_only_export(final, start, SD3)


def test_remeasuring_a_decoder_only_run_writes_the_familys_measured_constants(image_dirs, tmp_path, capsys):
    start = tiny_16_channel_vae(**FLUX1)
    save_file(ldm_state_dict(start), tmp_path / "ae.safetensors")
    final = train(
        image_dirs, tmp_path / "run", *STEPS, "--decoder_only", "--remeasure_latent_normalization",
        "--pretrained_model_name_or_path", str(tmp_path / "ae.safetensors"),
    )  # fmt: skip
    # The same training images and posterior noise as the run's measurement, through the starting encoder (frozen).
    images = test_train.training_images_by_torchvision(image_dirs)
    generator = torch.Generator().manual_seed(0)  # the run's --seed
    with torch.no_grad():
        latents = [start.encode(batch).latent_dist.sample(generator=generator) for batch in images.split(2)]
    latents = torch.cat(latents).double()
    config = json.loads((final / "config.json").read_text())
    # FLUX.1's convention, shift_scale: shift_factor = mean, scaling_factor = 1 / std (about that mean).
    assert config["shift_factor"] == pytest.approx(latents.mean().item(), rel=1e-4, abs=1e-6)
    assert config["scaling_factor"] == pytest.approx(1 / latents.std(unbiased=False).item(), rel=1e-4)
    assert "latent normalisation: shift_scale: " in capsys.readouterr().out
    with pytest.raises(SystemExit, match="is for --decoder_only runs"):
        parse_config(["--remeasure_latent_normalization"])


def tiny_flux2_vae():
    """A diffusers.AutoencoderKLFlux2, tiny, with BN statistics that are not the init's (as a released one's)."""
    import diffusers

    torch.manual_seed(0)
    start = diffusers.AutoencoderKLFlux2(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=32,
    ).eval()
    with torch.no_grad():
        start.bn.running_mean.normal_()
        start.bn.running_var.uniform_(0.5, 2.0)
    return start


def test_a_decoder_only_flux2_run_keeps_its_encoder_and_bn_statistics(image_dirs, tmp_path, capsys):
    import diffusers

    start = tiny_flux2_vae()
    start.save_pretrained(tmp_path / "flux2")
    final = train(
        image_dirs, tmp_path / "run", *STEPS, "--model", "flux2", "--decoder_only",
        "--pretrained_model_name_or_path", str(tmp_path / "flux2"),
    )  # fmt: skip
    trained = diffusers.AutoencoderKLFlux2.from_pretrained(final).eval()
    assert torch.equal(encoder_moments(trained, probe_images()), encoder_moments(start, probe_images()))
    before, after = start.state_dict(), trained.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv.", "bn."))]
    assert all(torch.equal(after[k], before[k]) for k in frozen)
    assert not torch.equal(after["decoder.conv_out.weight"], before["decoder.conv_out.weight"])
    assert "latent normalisation: kept as loaded" in capsys.readouterr().out


def test_remeasuring_a_decoder_only_flux2_run_writes_the_patchified_statistics(image_dirs, tmp_path):
    import diffusers

    start = tiny_flux2_vae()
    start.save_pretrained(tmp_path / "flux2")
    final = train(
        image_dirs, tmp_path / "run", *STEPS, "--model", "flux2", "--decoder_only",
        "--remeasure_latent_normalization", "--pretrained_model_name_or_path", str(tmp_path / "flux2"),
    )  # fmt: skip
    # The run's posterior samples through the starting (frozen) encoder, patchified by the FLUX.2 pipeline's code.
    images = test_train.training_images_by_torchvision(image_dirs)
    generator = torch.Generator().manual_seed(0)  # the run's --seed
    with torch.no_grad():
        z = torch.cat([start.encode(b).latent_dist.sample(generator=generator) for b in images.split(2)])
    patches = diffusers.Flux2KleinPipeline._patchify_latents(z).double().transpose(0, 1).flatten(1)  # (4C, N)
    bn = diffusers.AutoencoderKLFlux2.from_pretrained(final).bn
    torch.testing.assert_close(bn.running_mean.double(), patches.mean(1), rtol=0, atol=1e-5)
    torch.testing.assert_close(bn.running_var.double(), patches.var(1, unbiased=False), rtol=1e-4, atol=1e-6)
