"""training/train.py --model vq end to end on generated images: tiny VQ model, a few steps, CPU.

Oracles: stock diffusers.VQModel (loading the export, encoding for the scaling factor), a second run of the script
(resume equality, the codebook tracker included), the flags' validation.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is first imported

import functools
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_train import (
    NUM_TRAIN,
    NUM_VAL,
    base_flags,
    checkpoint_tensors,
    probe_state,
    train,
    train_two_processes,
    training_images_by_torchvision,
    write_images,
)
from train_helpers import assert_identical, reset_accelerate

# Restarts at every step: each one draws random numbers, which a resumed run must draw alike.
VQ = ["--recipe", "vq-quickstart", "--codebook_restart_steps", "1"]


@pytest.fixture(scope="module")
def image_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_images(root / "train", NUM_TRAIN, seed=1)
    write_images(root / "val", NUM_VAL, seed=2)
    return root / "train", root / "val"


@pytest.fixture(autouse=True)
def clean_accelerate_state():
    yield
    reset_accelerate()


def test_a_vq_run_exports_a_diffusers_vqmodel_with_the_measured_scaling_factor(image_dirs, tmp_path):
    import diffusers

    final = train(image_dirs, tmp_path, *VQ, "--max_train_steps", "3", "--codebook_ema_decay", "0.9")
    config = json.loads((final / "config.json").read_text())
    assert config["_class_name"] == "VQModel" and config["num_vq_embeddings"] == 512
    vae = diffusers.VQModel.from_pretrained(final).eval()
    images = training_images_by_torchvision(image_dirs)
    with torch.no_grad():
        latents = torch.cat([vae.encode(batch).latents for batch in images.split(2)])
    assert config["scaling_factor"] == pytest.approx(
        1 / latents.double().std(unbiased=False).item(), rel=1e-4
    )
    # the codebook tracker is checkpointed beside the model, its state out of the model's weights
    tracker = torch.load(tmp_path / "checkpoint-3" / "custom_checkpoint_1.pkl", weights_only=True)
    assert tracker["step"] == 3 and tracker["embed_sum"].shape == (512, 3)


@pytest.mark.parametrize(
    "extra", [[], ["--codebook_ema_decay", "0.9", "--disc_start", "0"]], ids=["loss", "ema-gan"]
)
def test_a_resumed_vq_run_gives_the_same_weights_and_codebook_state(extra, image_dirs, tmp_path):
    flags = [*VQ, *extra, "--train_batch_size", "4", "--max_train_steps", "4", "--checkpointing_steps", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(image_dirs, straight, *flags)
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    train(image_dirs, resumed, *flags, "--resume_from_checkpoint", "latest")
    assert_identical(
        checkpoint_tensors(resumed / "checkpoint-4"), checkpoint_tensors(straight / "checkpoint-4")
    )
    assert_identical(
        load_file(resumed / "final" / "diffusion_pytorch_model.safetensors"),
        load_file(straight / "final" / "diffusion_pytorch_model.safetensors"),
    )


def test_flags_of_the_other_model_kind_are_refused():
    from latentvae.training.config import parse_config

    with pytest.raises(SystemExit, match="only --model vq uses --codebook_ema_decay"):
        parse_config(["--codebook_ema_decay", "0.99"])
    with pytest.raises(SystemExit, match="only --model kl uses --kl_weight"):
        parse_config(["--model", "vq", "--kl_weight", "1e-6"])
    cfg, _ = parse_config(["--model", "vq", "--preset", "vq-f4"])
    assert (cfg.model, cfg.model_preset, cfg.recon_loss) == ("vq", "vq-f4", "l1")
    assert parse_config(["--model", "vq"])[0].model_preset == "vq-f4"  # not the default recipe's KL shape


def test_a_saved_config_is_accepted_back_for_either_kind(tmp_path):
    from latentvae.training.config import TrainConfig, parse_config

    for model in ("kl", "vq"):
        saved = TrainConfig(model=model, model_preset="tiny-vq-f4" if model == "vq" else "tiny-kl-f8")
        (tmp_path / "config.json").write_text(json.dumps(saved.to_dict()))  # every field, as checkpoints hold
        assert parse_config(["--config", str(tmp_path / "config.json")])[0] == saved
    (tmp_path / "config.json").write_text(json.dumps({**saved.to_dict(), "kl_weight": 0.1}))
    with pytest.raises(SystemExit, match="only --model kl uses --kl_weight"):
        parse_config(["--config", str(tmp_path / "config.json")])


def test_a_kl_file_is_not_trained_as_vq(image_dirs, tmp_path):
    kl = train(image_dirs, tmp_path / "kl", "--max_train_steps", "1")
    with pytest.raises(ValueError, match="AutoencoderKL-type model: train it with --model kl"):
        train(image_dirs, tmp_path / "vq", *VQ, "--init_from", str(kl), "--max_train_steps", "1")


def test_two_processes_keep_one_codebook(image_dirs, tmp_path):
    """EMA codebook statistics are all-reduced and restarted codes broadcast: the processes' states stay equal."""
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    flags = base_flags(image_dirs, tmp_path / "run") + VQ + [
        "--max_train_steps", "2", "--checkpointing_steps", "1", "--codebook_ema_decay", "0.9", "--disc_start", "0",
    ]  # fmt: skip
    train_two_processes(probe_dir, flags)
    state = functools.partial(probe_state, probe_dir)

    codebook = "models.0.vae.quantize.embedding.weight"
    for step in (1, 2):
        rank0, rank1 = state(0, step), state(1, step)
        assert any(k.endswith("embed_sum") for k in rank0)  # the codebook tracker
        assert_identical(rank0, rank1)
    assert not torch.equal(state(0, 1)[codebook], state(0, 2)[codebook])
