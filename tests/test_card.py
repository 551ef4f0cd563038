"""Model cards and `latentvae push`. Oracles: huggingface_hub reading the card back (`ModelCard.load`), stock diffusers
(the exported config, parameter count and latent shape), and the arguments that reach the `huggingface_hub.HfApi`
boundary (the upload itself cannot be reached from the tests)."""

from __future__ import annotations

import json
import re

import diffusers
import pytest
import torch
from huggingface_hub import ModelCard

from latentvae.cli import main
from latentvae.files.card import (
    CARD_NAME,
    EVALUATION_BEGIN,
    CardInfo,
    known_base_model,
    model_card,
)
from latentvae.files.export import export_vae, model_config, update_card_evaluation
from latentvae.models.autoencoder_kl import AutoencoderKL

CONFIG = {
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [8, 16, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "scaling_factor": 0.3125,
    "shift_factor": 0.0625,
}


def tiny() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(**CONFIG).eval()


def row(text: str, name: str) -> str:
    """The value cell of the table row named `name`."""
    return re.search(rf"^\| {re.escape(name)} \| (.*) \|$", text, re.MULTILINE).group(1)


def test_export_writes_a_card_that_the_hub_library_reads(tmp_path):
    folder = tmp_path / "my-vae"
    export_vae(tiny(), folder, card=CardInfo(license="apache-2.0", base_model="stabilityai/sd-vae-ft-mse"))
    card = ModelCard.load(folder / CARD_NAME)
    metadata = card.data.to_dict()
    assert metadata["library_name"] == "diffusers"
    assert {"latentvae", "vae", "autoencoderkl"} <= set(metadata["tags"])
    assert "stable-diffusion" not in metadata["tags"]  # not the SD architecture
    assert metadata["license"] == "apache-2.0" and metadata["base_model"] == "stabilityai/sd-vae-ft-mse"
    assert "pipeline_tag" not in metadata

    config = json.loads((folder / "config.json").read_text())
    stock = diffusers.AutoencoderKL.from_pretrained(folder)
    assert float(row(card.text, "scaling_factor")) == config["scaling_factor"] == 0.3125
    assert float(row(card.text, "shift_factor")) == config["shift_factor"]
    assert row(card.text, "block_out_channels") == ", ".join(map(str, config["block_out_channels"]))
    assert f"total {stock.num_parameters() / 1e6:.2f} M" in row(card.text, "parameters")
    latent = stock.encode(torch.zeros(1, 3, 256, 256)).latent_dist.mode().shape[1:]
    assert f"-> {'x'.join(map(str, latent))} " in row(card.text, "latent")
    assert 'AutoencoderKL.from_pretrained("path/to/my-vae")' in card.text
    assert "`my-vae.safetensors`" in card.text and "ComfyUI/models/vae" not in card.text


def test_a_card_without_card_info_has_no_license_or_base_model(tmp_path):
    export_vae(tiny(), tmp_path / "plain")
    metadata = ModelCard.load(tmp_path / "plain" / CARD_NAME).data.to_dict()
    assert "license" not in metadata and "base_model" not in metadata and "pipeline_tag" not in metadata
    assert metadata["library_name"] == "diffusers"


def test_an_sd_shaped_vae_points_comfyui_and_automatic1111_at_its_single_file():
    with torch.device("meta"):  # the 84 M-parameter shape, without its memory
        model = AutoencoderKL.from_preset("sd-kl-f8")
        stock = diffusers.AutoencoderKL(
            **{k: v for k, v in model_config(model).items() if not k.startswith("_")}
        )
    card = model_card(
        model, model_config(model), "faces-vae", "faces-vae.safetensors", CardInfo(repo_id="me/faces")
    )
    assert "stable-diffusion" in card.data.tags
    assert "`faces-vae.safetensors`" in card.text and "ComfyUI/models/vae/" in card.text
    assert "stable-diffusion-webui/models/VAE/" in card.text
    assert 'AutoencoderKL.from_pretrained("me/faces"' in card.text and "StableDiffusionPipeline" in card.text
    assert f"total {stock.num_parameters() / 1e6:.2f} M" in row(card.text, "parameters")
    assert "-> 4x32x32 " in row(card.text, "latent")
    without_file = model_card(
        model, model_config(model), "faces-vae", None, CardInfo()
    ).text  # `convert` writes it
    assert "`latentvae convert faces-vae faces-vae.safetensors --to ldm`" in without_file


def test_reexport_replaces_our_card_and_leaves_a_users_readme(tmp_path):
    ours, users = tmp_path / "ours", tmp_path / "users"
    export_vae(tiny(), ours, card=CardInfo(license="mit"))
    update_card_evaluation(ours / CARD_NAME, "old numbers")
    export_vae(tiny(), ours)  # new weights: the old evaluation and license no longer apply
    text = (ours / CARD_NAME).read_text()
    assert "old numbers" not in text and "license" not in ModelCard.load(ours / CARD_NAME).data.to_dict()
    users.mkdir()
    (users / CARD_NAME).write_text("# My own notes\n")
    export_vae(tiny(), users)
    assert (users / CARD_NAME).read_text() == "# My own notes\n"


def test_an_evaluation_is_attached_once_and_replaced(tmp_path):
    folder = tmp_path / "vae"
    export_vae(tiny(), folder, card=CardInfo(license="mit"))
    before = ModelCard.load(folder / CARD_NAME)
    update_card_evaluation(folder / CARD_NAME, "| Model | PSNR |\n| --- | --- |\n| vae | 20.00 |")
    update_card_evaluation(folder / CARD_NAME, "| Model | PSNR |\n| --- | --- |\n| vae | 21.50 |")
    after = ModelCard.load(folder / CARD_NAME)
    assert after.data.to_dict() == before.data.to_dict()
    assert after.text.count(EVALUATION_BEGIN) == 1 and after.text.count("## Evaluation") == 1
    assert "| vae | 21.50 |" in after.text and "20.00" not in after.text
    assert after.text.index("## Evaluation") < after.text.index("## Use")


def test_known_base_models_from_local_paths(tmp_path):
    snapshot = tmp_path / "hub" / "models--stabilityai--sd-vae-ft-mse" / "snapshots" / "31f26fdeee" / "x"
    assert known_base_model(str(snapshot)) == "stabilityai/sd-vae-ft-mse"
    assert (
        known_base_model("/data/vae-ft-mse-840000-ema-pruned.safetensors")
        == "stabilityai/sd-vae-ft-mse-original"
    )
    assert known_base_model("/data/my-own-vae.safetensors") is None and known_base_model(None) is None


# ----- the Hub boundary (the `hub` fixture is in conftest.py) -----


def test_push_uploads_the_export_folder(tmp_path, hub, capsys):
    folder = tmp_path / "my-vae"
    export_vae(tiny(), folder)
    (folder / ".README.md.123.tmp").write_text("an interrupted write")  # hidden: never uploaded
    code = main(["push", str(folder), "me/my-vae", "--token", "hf_secret", "--private"])
    assert code == 0, capsys.readouterr().err
    create, upload = hub
    assert create["repo_id"] == "me/my-vae" and create["private"] is True and create["exist_ok"] is True
    assert upload["folder"] == folder and upload["repo_id"] == "me/my-vae" and upload["token"] == "hf_secret"
    assert upload["commit_message"] == "Upload VAE" and upload["path_in_repo"] is None
    assert upload["files"] == sorted(
        ["README.md", "config.json", "diffusion_pytorch_model.safetensors", "my-vae.safetensors"]
    )
    assert "me/my-vae/commit/" in capsys.readouterr().out


def test_push_writes_a_card_into_an_export_that_has_none(tmp_path, hub):
    folder = tmp_path / "old-export"
    export_vae(tiny(), folder)
    (folder / CARD_NAME).unlink()  # as exports were before they had cards
    assert main(["push", str(folder), "me/old", "--commit_message", "first"]) == 0
    assert 'from_pretrained("me/old")' in (folder / CARD_NAME).read_text()
    assert hub[1]["files"][0] == CARD_NAME and hub[1]["commit_message"] == "first"


@pytest.mark.parametrize("case", ["offline", "not an export"])
def test_push_refuses_before_any_hub_call(tmp_path, hub, monkeypatch, capsys, case):
    folder = tmp_path / "vae"
    if case == "offline":
        export_vae(tiny(), folder)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        folder.mkdir()
    assert main(["push", str(folder), "me/vae"]) == 2
    assert ("offline" if case == "offline" else "not an export folder") in capsys.readouterr().err
    assert hub == []


def test_evaluate_update_card_attaches_the_comparison_table(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    folder, single = tmp_path / "vae", tmp_path / "vae" / "vae.safetensors"
    export_vae(tiny(), folder)
    flags = ["--data_dir", images, "--resolution", "32", "--no_lpips", "--no_fid", "--update_card"]
    for run_dir in ("eval1", "eval2"):  # the second evaluation replaces the first
        command = [
            "evaluate",
            "--model",
            folder,
            "--model",
            f"file={single}",
            "--output_dir",
            tmp_path / run_dir,
        ]
        assert main([str(a) for a in command + flags]) == 0
    out = capsys.readouterr().out
    assert f"{single} is not a folder" in out and f"the evaluation is in {folder / CARD_NAME}" in out
    card = ModelCard.load(folder / CARD_NAME)
    assert card.text.count(EVALUATION_BEGIN) == 1 and "eval2" in card.text and "eval1" not in card.text
    summary = json.loads((tmp_path / "eval2" / "summary.json").read_text())
    psnr = {m["name"]: m["psnr"] for m in summary["models"]}
    for name in ("vae", "file"):
        (table_row,) = re.findall(rf"^\| {name} \| 2 \| (.*)$", card.text, re.MULTILINE)
        assert table_row.lstrip("*").startswith(f"{psnr[name]:.2f}")  # bold when best
