"""training/train.py with every latent-space regulariser on (equivariance with rotations, low-pass, anchoring,
alignment to a randomly initialised tiny DINOv2 saved as a local folder): trains, validates, keeps the frozen
models out of checkpoints, stays identical across two processes, and resumes exactly.

Oracles: a second process (DDP, observed by `train_probe.py`), a second run of the script (resume equality), the
checkpoint files read back, stock diffusers loading the export."""

from __future__ import annotations

import functools
import shutil

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import assert_identical

from latentvae import AutoencoderKL, export_vae
from tests.test_train import (
    NUM_TRAIN,
    NUM_VAL,
    base_flags,
    checkpoint_tensors,
    probe_state,
    train,
    train_two_processes,
    write_images,
)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_images(root / "train", NUM_TRAIN, seed=1)
    write_images(root / "val", NUM_VAL, seed=2)
    return root / "train", root / "val"


@pytest.fixture(scope="module")
def start_and_dino(tmp_path_factory):
    """A VAE to fine-tune (tiny-kl-f8, seeded) and a random tiny DINOv2 folder for --align_model."""
    from transformers import Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("regularizers")
    torch.manual_seed(0)
    export_vae(AutoencoderKL.from_preset("tiny-kl-f8"), root / "start")
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=56,
    )
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(root / "dino")
    return root / "start", root / "dino"


def every_term(start_and_dino) -> list[str]:
    start, dino = start_and_dino
    return [
        "--pretrained_model_name_or_path", str(start),
        "--equivariance_prob", "0.5", "--equivariance_rotations", "--equivariance_anisotropic",
        "--latent_lowpass_weight", "0.5",
        "--latent_anchor_weight", "1.0",
        "--align_model", str(dino), "--align_resolution", "56",
    ]  # fmt: skip


def test_every_regulariser_trains_validates_and_stays_out_of_checkpoints(
    images, start_and_dino, tmp_path, caplog
):
    with caplog.at_level("INFO"):
        final = train(
            images, tmp_path / "run", *every_term(start_and_dino), "--max_train_steps", "2",
            "--validation_steps", "1", "--checkpointing_steps", "2",
        )  # fmt: skip
    # Validation reports the equivariance PSNRs and the latent drift of the fine-tune.
    assert "equivariance downscale_2x" in caplog.text and "latent_drift_psnr" in caplog.text
    model_state = load_file(tmp_path / "run" / "checkpoint-2" / "model.safetensors")
    assert "align_projection.proj.weight" in model_state  # the projection trains and is resumed
    assert not any(k.startswith(("anchor.", "align_features.")) for k in model_state)  # frozen: rebuilt
    import diffusers

    vae = diffusers.AutoencoderKL.from_pretrained(final)  # the export is the VAE alone
    assert vae.config.latent_channels == 4
    start = load_file(start_and_dino[0] / "diffusion_pytorch_model.safetensors")
    trained = load_file(final / "diffusion_pytorch_model.safetensors")
    assert not torch.equal(start["encoder.conv_in.weight"], trained["encoder.conv_in.weight"])


def test_the_regularisers_refuse_runs_they_cannot_act_on(start_and_dino):
    from latentvae.training.config import parse_config

    start, dino = (str(p) for p in start_and_dino)
    cases = {
        "--pretrained_model_name_or_path": ["--latent_anchor_weight", "1"],
        "--decoder_only freezes": [
            "--pretrained_model_name_or_path",
            start,
            "--decoder_only",
            "--align_model",
            dino,
        ],
        "Gaussian latent": ["--recipe", "vq-quickstart", "--align_model", dino],
        "--equivariance_prob": ["--equivariance_prob", "1.5"],
        "eq-finetune": ["--recipe", "eq-finetune"],
    }
    for message, flags in cases.items():
        with pytest.raises(SystemExit, match=message):
            parse_config(flags)


def test_two_processes_with_every_regulariser_stay_identical(images, start_and_dino, tmp_path):
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    flags = base_flags(images, tmp_path / "run") + every_term(start_and_dino) + [
        "--max_train_steps", "2", "--checkpointing_steps", "1", "--equivariance_prob", "1",
    ]  # fmt: skip
    train_two_processes(probe_dir, flags)
    state = functools.partial(probe_state, probe_dir)
    for step in (1, 2):
        rank0, rank1 = state(0, step), state(1, step)
        assert any("align_projection" in k for k in rank0)
        assert_identical(rank0, rank1)
    name = "models.0.align_projection.proj.weight"
    assert not torch.equal(state(0, 1)[name], state(0, 2)[name])


def test_resume_with_every_regulariser_is_exact(images, start_and_dino, tmp_path):
    flags = every_term(start_and_dino) + [
        "--train_batch_size", "4", "--max_train_steps", "4", "--checkpointing_steps", "2", "--validation_steps", "2",
    ]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(images, straight, *flags)
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    train(images, resumed, *flags, "--resume_from_checkpoint", "latest")
    assert_identical(
        checkpoint_tensors(resumed / "checkpoint-4"), checkpoint_tensors(straight / "checkpoint-4")
    )
