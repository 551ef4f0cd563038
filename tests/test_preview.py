"""The preview decoder (`latentvae distill-preview`): a diffusers.AutoencoderTiny distilled from a VAE.

Oracles: stock diffusers (AutoencoderTiny.from_pretrained, a StableDiffusionPipeline with each decoder), an
untrained AutoencoderTiny of the same shape (what distillation must beat), the pipelines' latent formulas written
out here, a second run (resume equality), a second process (DDP), the files read back.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sd_offline import TINY_SD_VAE_CONFIG, perturb_weights_, shared_sd_components, text_to_image
from test_train import checkpoint_tensors, free_port, write_images
from train_helpers import assert_identical, reset_accelerate, tensors_in

from latentvae import AutoencoderKL
from latentvae.cli import main as cli_main
from latentvae.files.export import export_vae
from latentvae.models.preview import (
    build_preview,
    normalise_latents,
    preview_config,
    raw_latents,
    set_latent_range,
)

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 32


@pytest.fixture(autouse=True)
def clean_accelerate_state():
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def image_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("images")
    write_images(root / "train", 16, seed=1)
    write_images(root / "val", 4, seed=2)
    return root / "train", root / "val"


@pytest.fixture(scope="module")
def teacher(image_dirs, tmp_path_factory) -> Path:
    """An SD-shaped test VAE (2 levels: the tiny SD pipeline's), its scaling factor 1 / std of its latents on the
    training images, as training measures it."""
    vae = perturb_weights_(AutoencoderKL(**TINY_SD_VAE_CONFIG), seed=1).eval()
    from PIL import Image

    images = torch.stack(
        [
            torch.from_numpy(np.array(Image.open(p).convert("RGB").crop((0, 0, 32, 32)))).permute(2, 0, 1)
            for p in sorted(image_dirs[0].glob("*.png"))
        ]
    )
    with torch.no_grad():
        z = vae.encode(images.float() / 127.5 - 1).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / z.std()))
    folder = tmp_path_factory.mktemp("teacher") / "vae"
    export_vae(vae, folder)
    return folder


def flags(teacher: Path, image_dirs, output_dir: Path, *extra: str) -> list[str]:
    return [
        str(teacher), "--data_dir", str(image_dirs[0]), "--val_data_dir", str(image_dirs[1]),
        "--output_dir", str(output_dir), "--resolution", str(RESOLUTION), "--train_batch_size", "4",
        "--report_to", "none", "--dataloader_num_workers", "0", "--perceptual_random_backbone",
        "--preview_channels", "16", "--validation_steps", "1000", "--checkpointing_steps", "1000", *extra,
    ]  # fmt: skip


def distil(argv: list[str]) -> Path:
    from latentvae.training.distill import main
    from latentvae.training.preview import parse_preview_config

    try:
        return main(*parse_preview_config(argv))
    finally:
        reset_accelerate()


@pytest.fixture(scope="module")
def distilled(teacher, image_dirs, tmp_path_factory) -> Path:
    """A finished 30-step distillation (output_dir)."""
    output_dir = tmp_path_factory.mktemp("distil")
    distil(flags(teacher, image_dirs, output_dir, "--max_train_steps", "30", "--checkpointing_steps", "30"))
    reset_accelerate()
    return output_dir


# -- the latent convention ------------------------------------------------------------------------------------------


def test_latent_conventions_are_the_pipelines():
    z = torch.randn(2, 4, 3, 3)
    sd = AutoencoderKL(**{**TINY_SD_VAE_CONFIG, "scaling_factor": 0.18215}).config
    sd3 = AutoencoderKL(**{**TINY_SD_VAE_CONFIG, "scaling_factor": 1.5305, "shift_factor": 0.0609}).config
    mean, std = [0.1, -0.2, 0.3, 0.0], [0.5, 1.0, 2.0, 4.0]
    sdxl = AutoencoderKL(**{**TINY_SD_VAE_CONFIG, "latents_mean": mean, "latents_std": std}).config
    # What the pipelines do before decoding: SD `z_n / sf`; SD3 / FLUX `z_n / sf + shift`; SDXL with mean / std
    # `z_n * std / sf + mean` (diffusers' pipeline_stable_diffusion_xl.py).
    m, s = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    for config, decode_input in (
        (sd, z / 0.18215),
        (sd3, z / 1.5305 + 0.0609),
        (sdxl, z * s / sdxl.scaling_factor + m),
    ):
        torch.testing.assert_close(raw_latents(config, z), decode_input)
        torch.testing.assert_close(normalise_latents(config, raw_latents(config, z)), z)


def test_the_preview_has_the_vaes_latent_shape_and_pipeline_scale():
    for config in (TINY_SD_VAE_CONFIG, {**TINY_SD_VAE_CONFIG, "block_out_channels": (8, 8, 8, 8), "latent_channels": 16,
                                        "norm_num_groups": 8, "down_block_types": ("DownEncoderBlock2D",) * 4,
                                        "up_block_types": ("UpDecoderBlock2D",) * 4}):  # fmt: skip
        vae = AutoencoderKL(**config)
        tiny = build_preview(vae, "8")
        x = torch.rand(1, 3, 32, 32) * 2 - 1
        with torch.no_grad():
            expected = vae.encode(x).latent_dist.mean.shape
            assert tiny.encode(x).latents.shape == expected
            assert tiny.decode(torch.zeros(expected)).sample.shape == x.shape
        # diffusers pipelines: vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        assert len(tiny.config.block_out_channels) == len(vae.config.block_out_channels)
    assert preview_config(AutoencoderKL(**TINY_SD_VAE_CONFIG), "8,8")["decoder_block_out_channels"] == (8, 8)
    # diffusers' AutoencoderTiny cannot run two widths (the conv between levels keeps the width): refused upfront.
    uneven = diffusers.AutoencoderTiny(encoder_block_out_channels=(8, 16), decoder_block_out_channels=(16, 8),
                             num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)  # fmt: skip
    with pytest.raises(RuntimeError):
        uneven.encode(torch.rand(1, 3, 8, 8))
    for text in ("8,16", "0", "wide"):
        with pytest.raises(ValueError, match="--preview_channels"):
            preview_config(AutoencoderKL(**TINY_SD_VAE_CONFIG), text)


def test_the_latent_byte_range_fits_the_measured_latent():
    tiny = build_preview(AutoencoderKL(**TINY_SD_VAE_CONFIG), "8")
    z_n = torch.randn(4, 4, 16, 16) * 0.7 + 0.4
    set_latent_range(tiny, float(z_n.mean()), float(z_n.std()))
    scaled = tiny.scale_latents(z_n)  # diffusers' own mapping to [0, 1]
    assert abs(float(scaled.mean()) - 0.5) < 0.01
    assert float((scaled == 0).float().mean() + (scaled == 1).float().mean()) < 0.01  # +-3 std fit
    reloaded = diffusers.AutoencoderTiny.from_config(tiny.config)
    torch.testing.assert_close(reloaded.scale_latents(z_n), scaled)


# -- distillation, export, pipeline ---------------------------------------------------------------------------------


def test_export_reloads_bit_identically_with_its_card(distilled, teacher):
    final = distilled / "final"
    tiny = diffusers.AutoencoderTiny.from_pretrained(final).eval()
    trained = {
        k.removeprefix("vae."): v
        for k, v in load_file(distilled / "checkpoint-30" / "model.safetensors").items()
    }
    assert_identical(tiny.state_dict(), trained)
    assert tiny.config.scaling_factor == 1.0 and tiny.config.shift_factor == 0.0
    card = (final / "README.md").read_text()
    assert (
        "library_name: diffusers" in card
        and str(teacher) in card
        and "AutoencoderTiny.from_pretrained" in card
    )


def test_preview_drops_into_a_pipeline_and_approaches_the_full_vae(distilled, teacher, tmp_path):
    components = shared_sd_components(tmp_path)
    full = diffusers.AutoencoderKL.from_pretrained(teacher).eval()
    distilled_tiny = diffusers.AutoencoderTiny.from_pretrained(distilled / "final").eval()
    untrained = diffusers.AutoencoderTiny.from_config(distilled_tiny.config).eval()

    def run(vae) -> np.ndarray:
        pipe = diffusers.StableDiffusionPipeline(vae=vae, **components)
        pipe.set_progress_bar_config(disable=True)
        return text_to_image(pipe)

    reference, preview, baseline = run(full), run(distilled_tiny), run(untrained)
    assert preview.shape == reference.shape == (1, 64, 64, 3)
    error, baseline_error = np.abs(preview - reference).mean(), np.abs(baseline - reference).mean()
    print(f"mean |preview - full| {error:.4f}, untrained {baseline_error:.4f}")
    assert error < 0.6 * baseline_error


# -- resume, two processes, command line ----------------------------------------------------------------------------


def test_resume_gives_the_same_weights_as_a_straight_run(teacher, image_dirs, tmp_path, caplog):
    extra = [
        "--max_train_steps",
        "6",
        "--checkpointing_steps",
        "3",
        "--ema_decay",
        "0.9",
        "--disc_weight",
        "0.5",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    distil(flags(teacher, image_dirs, straight, *extra))  # 4 steps an epoch: the resumed half crosses one
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    with caplog.at_level("INFO"):
        distil(flags(teacher, image_dirs, resumed, *extra, "--resume_from_checkpoint", "latest"))
    assert "at step 3" in caplog.text
    assert_identical(
        checkpoint_tensors(resumed / "checkpoint-6"), checkpoint_tensors(straight / "checkpoint-6")
    )
    assert_identical(
        load_file(resumed / "final" / "diffusion_pytorch_model.safetensors"),
        load_file(straight / "final" / "diffusion_pytorch_model.safetensors"),
    )


@pytest.mark.slow
def test_two_processes_stay_identical(teacher, image_dirs, tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(ROOT / "tests" / "preview_probe.py"), str(probe),
        *flags(teacher, image_dirs, tmp_path / "run", "--max_train_steps", "2", "--checkpointing_steps", "1",
               "--train_batch_size", "2", "--ema_decay", "0.9", "--disc_weight", "0.5"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-5000:]

    def state(rank: int, step: int) -> dict[str, torch.Tensor]:
        path = probe / f"state-rank{rank}-checkpoint-{step}.tmp.pt"
        return tensors_in(torch.load(path, map_location="cpu", weights_only=True))

    for step in (1, 2):
        assert_identical(state(0, step), state(1, step))
    name = "models.0.vae.decoder.layers.0.weight"  # the preview's decoder trained between the checkpoints
    assert not torch.equal(state(0, 1)[name], state(0, 2)[name])


def test_the_command_line_refuses_a_vq_model(image_dirs, tmp_path, capsys):
    from latentvae import VQModel

    export_vae(VQModel.from_preset("tiny-vq-f4"), tmp_path / "vq")
    argv = [
        "distill-preview",
        *flags(tmp_path / "vq", image_dirs, tmp_path / "run", "--max_train_steps", "1"),
    ]
    assert cli_main(argv) == 2
    assert "the preview decoder is distilled from an AutoencoderKL" in capsys.readouterr().err
