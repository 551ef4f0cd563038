"""The end of training for others: `final/README.md` (the model card) and `--push_to_hub` (CPU, a tiny 2-step run).

Oracles: huggingface_hub reading the card back, the configuration the run saved in its checkpoint, the exported
config.json, the files on disk, and the arguments that reach `huggingface_hub.HfApi` (the `hub` fixture of
conftest.py: the upload itself cannot be reached from the tests).
"""

from __future__ import annotations

import json
import re

import pytest
from huggingface_hub import ModelCard
from test_train import image_dirs, train  # noqa: F401 (image_dirs is a fixture)

from latentvae.files.hub import PushError

PUSH_FLAGS = (
    "--max_train_steps", "2",
    "--checkpointing_steps", "1",
    "--push_to_hub",
    "--hub_model_id", "me/faces-vae",
    "--hub_token", "hf_secret_token",
    "--push_checkpoints",
    "--license", "apache-2.0",
)  # fmt: skip


def row(text: str, name: str) -> str:
    """The value cell of the table row named `name`."""
    return re.search(rf"^\| {re.escape(name)} \| (.*) \|$", text, re.MULTILINE).group(1)


@pytest.fixture
def pushed(image_dirs, tmp_path, hub):  # noqa: F811
    output_dir = tmp_path / "run"
    final = train(image_dirs, output_dir, *PUSH_FLAGS)
    return output_dir, final, hub


def test_the_card_states_the_runs_configuration(pushed):
    output_dir, final, _ = pushed
    card = ModelCard.load(final / "README.md")
    metadata = card.data.to_dict()
    assert metadata["library_name"] == "diffusers" and metadata["license"] == "apache-2.0"
    assert "latentvae" in metadata["tags"] and "base_model" not in metadata and "pipeline_tag" not in metadata

    saved = json.loads((output_dir / "checkpoint-2" / "training_state.json").read_text())["config"]
    assert saved["recipe"] == "quickstart"
    assert "recipe `quickstart`: 2 optimizer steps of 2 images at 32 px" in card.text
    for name in (
        "recon_loss",
        "perceptual_weight",
        "perceptual_net",
        "kl_weight",
        "disc_weight",
        "disc_start",
    ):
        assert row(card.text, name) == str(saved[name]), name
    for name in ("learning_rate", "adam_beta1", "adam_beta2", "lr_scheduler", "ema_decay"):
        assert row(card.text, name) == str(saved[name]), name  # the quickstart does not scale its lr
    config = json.loads((final / "config.json").read_text())
    assert float(row(card.text, "scaling_factor")) == config["scaling_factor"]
    assert f"over {saved['scaling_factor_images']} images" not in card.text  # only 16 images exist
    assert "scale: scaling_factor" in card.text and "over 16 images" in card.text
    assert float(row(card.text, "PSNR (dB)")) > 0 and "2 held-out images" in card.text
    assert float(row(card.text, "LPIPS (squeeze)")) > 0  # the training loss's LPIPS
    assert card.text.startswith("\n# me/faces-vae\n")
    assert "](validation.png)" in card.text and (final / "validation.png").is_file()
    assert 'AutoencoderKL.from_pretrained("me/faces-vae")' in card.text


def test_push_to_hub_uploads_final_and_the_checkpoints_once_trained(pushed):
    output_dir, final, calls = pushed
    assert [c["call"] for c in calls] == ["create_repo", "upload_folder"] * 2
    assert all(c["repo_id"] == "me/faces-vae" and c["token"] == "hf_secret_token" for c in calls)
    upload_final, upload_checkpoints = calls[1], calls[3]
    assert upload_final["folder"] == final and upload_final["path_in_repo"] is None
    assert upload_final["commit_message"] == "End of training (step 2)"
    assert upload_final["files"] == sorted(
        [
            "README.md",
            "config.json",
            "diffusion_pytorch_model.safetensors",
            "final.safetensors",
            "validation.png",
        ]
    )
    assert upload_checkpoints["folder"] == output_dir and upload_checkpoints["path_in_repo"] == "checkpoints"
    on_disk = sorted(
        p.relative_to(output_dir).as_posix() for p in output_dir.glob("checkpoint-*/**/*") if p.is_file()
    )
    assert upload_checkpoints["files"] == on_disk and {f.split("/")[0] for f in on_disk} == {
        "checkpoint-1",
        "checkpoint-2",
    }
    # The token is in no file the run wrote (checkpoints, card, logs).
    assert not [p for p in output_dir.rglob("*") if p.is_file() and b"hf_secret_token" in p.read_bytes()]


def test_push_to_hub_offline_stops_before_training(image_dirs, tmp_path, hub, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PushError, match="offline"):
        train(image_dirs, tmp_path / "run", *PUSH_FLAGS)
    assert hub == [] and not (tmp_path / "run" / "checkpoint-1").exists()


def test_a_failed_upload_says_how_to_push_again(tmp_path, hub, monkeypatch):
    from huggingface_hub import HfApi

    from latentvae.training.config import parse_config
    from latentvae.training.publish import push_training, repo_id

    def no_network(self, **kwargs):
        raise ConnectionError("the network went away")

    monkeypatch.setattr(HfApi, "upload_folder", no_network)
    cfg, _ = parse_config(
        ["--output_dir", str(tmp_path / "run"), "--push_to_hub", "--hub_model_id", "me/vae"]
    )
    final = tmp_path / "run" / "final"
    with pytest.raises(PushError, match="network went away") as info:
        push_training(cfg, final, step=7)
    assert f"latentvae push {final} me/vae" in str(info.value)
    cfg, _ = parse_config(["--output_dir", str(tmp_path / "faces-vae"), "--push_to_hub"])
    assert repo_id(cfg) == "faces-vae"  # as the diffusers examples: the output folder's name
