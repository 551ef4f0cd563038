"""The `latentvae` command line: info, convert, reconstruct, and its error handling."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file, save_file

from latentvae.cli import SUBCOMMANDS, main
from latentvae.files.convert import diffusers_to_ldm
from latentvae.files.export import export_vae
from latentvae.models.autoencoder_kl import AutoencoderKL

# Three levels (f4), 32-px tiles so that --tile really tiles a 48-px image.
CONFIG = {
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [8, 16, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
    "scaling_factor": 0.5,
}


@pytest.fixture(scope="module")
def model() -> AutoencoderKL:
    torch.manual_seed(0)
    vae = AutoencoderKL(**CONFIG)
    with torch.no_grad():
        for param in vae.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return vae.eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    return export_vae(
        model, tmp_path_factory.mktemp("export") / "cli-vae"
    )  # the ldm file; its parent the folder


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def field(text: str, name: str) -> str:
    return re.search(rf"^{re.escape(name)}:\s+(.*)$", text, re.MULTILINE).group(1)


def test_every_subcommand_has_help(capsys):
    for name in [None, *SUBCOMMANDS]:
        with pytest.raises(SystemExit) as info:
            main([name, "--help"] if name else ["--help"])
        assert info.value.code == 0
        assert "usage: latentvae" in capsys.readouterr().out


def test_info_describes_each_format(capsys, model, exported, tmp_path):
    reference = diffusers.AutoencoderKL(**CONFIG)  # independent parameter count
    encoder = sum(
        p.numel() for n, p in reference.named_parameters() if n.startswith(("encoder.", "quant_conv."))
    )
    total = sum(p.numel() for p in reference.parameters())

    code, out, _ = run(capsys, "info", exported.parent)
    assert code == 0
    assert field(out, "format") == "diffusers folder"
    assert field(out, "parameters") == f"encoder {encoder:,}, decoder {total - encoder:,}, total {total:,}"
    assert field(out, "downsampling") == "4x"
    assert field(out, "scaling_factor").startswith("0.5 ")
    assert "latent 4" in field(out, "channels")

    assert run(capsys, "info", exported)[1].count("ldm safetensors") == 1
    prefixed = {f"first_stage_model.{k}": v for k, v in load_file(exported).items()}
    save_file({**prefixed, "model.diffusion_model.out.2.weight": torch.zeros(2)}, tmp_path / "sd.safetensors")
    out = run(capsys, "info", tmp_path / "sd.safetensors")[1]
    assert field(out, "format").startswith("prefixed checkpoint (first_stage_model.")
    assert field(out, "config") == "inferred from tensor shapes"

    torch.save(prefixed, tmp_path / "sd.ckpt")
    code, out, err = run(capsys, "info", tmp_path / "sd.ckpt")
    assert code == 2 and "--allow-pickle" in err and "Traceback" not in err
    code, out, _ = run(capsys, "info", tmp_path / "sd.ckpt", "--allow-pickle")
    assert code == 0 and "pickle .ckpt" in field(out, "format")


def test_convert_to_ldm_and_back(capsys, model, exported, tmp_path):
    code, _, _ = run(capsys, "convert", exported.parent, tmp_path / "vae.safetensors", "--to", "ldm")
    assert code == 0
    ldm = load_file(tmp_path / "vae.safetensors")
    assert "decoder.up.2.block.0.conv1.weight" in ldm
    back = convert_ldm_vae_checkpoint(ldm, CONFIG)  # diffusers' converter as the oracle
    expected = model.state_dict()
    assert sorted(back) == sorted(expected) and all(torch.equal(back[k], expected[k]) for k in expected)

    code, _, _ = run(
        capsys, "convert", tmp_path / "vae.safetensors", tmp_path / "folder", "--to", "diffusers"
    )
    assert code == 0
    reloaded = diffusers.AutoencoderKL.from_pretrained(tmp_path / "folder")
    assert reloaded.config.scaling_factor == 0.5  # came through the ldm file's metadata
    card = ModelCard.load(tmp_path / "folder" / "README.md")  # the folder says what it holds
    assert card.data.library_name == "diffusers" and "| scaling_factor | 0.5 |" in card.text
    state = reloaded.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_convert_dtype(capsys, model, exported, tmp_path, dtype):
    flag = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    out = tmp_path / "half.safetensors"
    assert run(capsys, "convert", exported.parent, out, "--to", "ldm", "--dtype", flag)[0] == 0
    tensors = load_file(out)
    expected = diffusers_to_ldm(model.state_dict())
    assert all(t.dtype == dtype and torch.equal(t, expected[k].to(dtype)) for k, t in tensors.items())
    # Without --dtype the stored dtype is kept.
    assert run(capsys, "convert", out, tmp_path / "kept", "--to", "diffusers")[0] == 0
    assert (
        load_file(tmp_path / "kept" / "diffusion_pytorch_model.safetensors")["quant_conv.weight"].dtype
        == dtype
    )


def test_convert_refuses_a_wrong_output_kind(capsys, exported, tmp_path):
    code, _, err = run(capsys, "convert", exported, tmp_path / "vae.ckpt", "--to", "ldm")
    assert code == 2 and ".safetensors" in err and "Traceback" not in err


def write_image(path, size, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    h, w = size
    # a smooth gradient plus noise: something a tiny random VAE reconstructs badly but finitely
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)  # PSNR = 10 log10(MAX^2 / MSE), MAX = 255


def diffusers_reconstruction(folder, image: np.ndarray, factor: int) -> np.ndarray:
    """Independent reconstruction with stock diffusers: reflect-pad, posterior mode, decode, crop, to uint8."""
    vae = diffusers.AutoencoderKL.from_pretrained(folder).eval()
    h, w, _ = image.shape
    padded = np.pad(image, ((0, -h % factor), (0, -w % factor), (0, 0)), mode="reflect")
    x = torch.from_numpy(padded).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample[0, :, :h, :w]
    return ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def test_reconstruct_writes_images_and_prints_their_psnr(capsys, exported, tmp_path):
    write_image(tmp_path / "a.png", (20, 27), seed=0)
    (tmp_path / "other").mkdir()
    write_image(tmp_path / "other" / "a.jpg", (16, 16), seed=1, mode="L")
    code, out, _ = run(
        capsys,
        "reconstruct",
        exported,
        tmp_path / "a.png",
        tmp_path / "other" / "a.jpg",
        "--out",
        tmp_path / "rec",
    )
    assert code == 0
    printed = [float(v) for v in re.findall(r"PSNR ([0-9.]+) dB ->", out)]
    assert len(printed) == 2
    independent = []
    for source, written, value in zip(["a.png", "other/a.jpg"], ["a.png", "a-2.png"], printed, strict=True):
        original = np.asarray(Image.open(tmp_path / source).convert("RGB"))
        restored = np.asarray(Image.open(tmp_path / "rec" / written))
        assert restored.shape == original.shape
        expected = diffusers_reconstruction(exported.parent, original, factor=4)
        assert np.abs(restored.astype(int) - expected.astype(int)).max() <= 1  # float order: at most 1 level
        independent.append(psnr(original, restored))
        assert abs(value - independent[-1]) < 0.006  # printed with two decimals
    mean = float(re.search(r"mean PSNR over 2 image\(s\): ([0-9.]+) dB", out).group(1))
    assert abs(mean - np.mean(independent)) < 0.006


def test_reconstruct_resolution_and_tiling(capsys, exported, tmp_path, monkeypatch):
    write_image(tmp_path / "wide.png", (30, 50), seed=2)
    code, out, _ = run(
        capsys, "reconstruct", exported, tmp_path / "wide.png", "--out", tmp_path / "r", "--resolution", "24"
    )
    assert code == 0
    assert Image.open(tmp_path / "r" / "wide.png").size == (24, 24)

    import latentvae.models.autoencoder_kl as autoencoder_kl

    tiles = []  # calls of the tile runner: none untiled, some with --tile (48 px > sample_size 32)
    runner = autoencoder_kl.tiled_apply
    monkeypatch.setattr(autoencoder_kl, "tiled_apply", lambda *a, **k: tiles.append(1) or runner(*a, **k))
    write_image(tmp_path / "big.png", (48, 48), seed=3)
    base = run(capsys, "reconstruct", exported, tmp_path / "big.png", "--out", tmp_path / "plain")[1]
    assert not tiles
    tiled = run(capsys, "reconstruct", exported, tmp_path / "big.png", "--out", tmp_path / "tiled", "--tile")[
        1
    ]
    assert tiles
    plain_img = np.asarray(Image.open(tmp_path / "plain" / "big.png")).astype(int)
    tiled_img = np.asarray(Image.open(tmp_path / "tiled" / "big.png")).astype(int)
    assert (
        np.abs(plain_img - tiled_img).max() <= 1
    )  # seam-free tiling: the untiled result up to float rounding
    assert "PSNR" in base and "PSNR" in tiled


def test_expected_failures_exit_2_without_traceback(capsys, exported, tmp_path):
    for argv in (
        ["info", tmp_path / "missing.safetensors"],
        ["reconstruct", exported, tmp_path / "missing.png", "--out", tmp_path / "o"],
        ["convert", tmp_path / "missing", tmp_path / "x.safetensors", "--to", "ldm"],
    ):
        code, _, err = run(capsys, *argv)
        assert code == 2, argv
        assert "missing" in err and "Traceback" not in err and err.count("\n") == 1


def test_python_dash_m_runs_the_cli(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "latentvae", "info", str(tmp_path / "nope.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2
    assert "nope.safetensors" in result.stderr and "Traceback" not in result.stderr
