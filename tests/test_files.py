"""Files on disk: ldm <-> diffusers conversion, export, and load_vae, checked against diffusers itself."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import latentvae.files.export
from latentvae.files.convert import diffusers_to_ldm, infer_config, ldm_to_diffusers, to_diffusers_layout
from latentvae.files.export import export_vae, model_config
from latentvae.files.loading import (
    PickleRefusedError,
    StateDictMismatchError,
    VAEFileError,
    load_vae,
    read_vae,
)
from latentvae.models.autoencoder_kl import AutoencoderKL


def kl_config(block_out_channels, layers_per_block=1, latent_channels=4, norm_num_groups=8, **extra) -> dict:
    levels = len(block_out_channels)
    return {
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(block_out_channels),
        "layers_per_block": layers_per_block,
        "latent_channels": latent_channels,
        "norm_num_groups": norm_num_groups,
        **extra,
    }


# norm_num_groups is the largest of 32..1 dividing every width, so shape inference can recover it exactly.
CONFIGS = {
    "2-levels": kl_config((8, 16)),
    "3-levels-3-layers-c8-no-quant": kl_config(
        (8, 8, 16), 3, 8, use_quant_conv=False, use_post_quant_conv=False, in_channels=1, out_channels=1
    ),
    "4-levels-c16-no-mid-attention": kl_config((8, 16, 16, 16), 2, 16, mid_block_add_attention=False),
    "5-levels-no-post-quant": kl_config((8, 8, 8, 16, 16), 1, 4, use_post_quant_conv=False),
    "6-levels": kl_config((8,) * 6, 1, 8),
}
# SD's shape (4 levels, 2 layers, mid attention, quant convs, 4 latent channels, 32 groups) at a test width.
SD_SHAPED = kl_config((32, 32, 32, 32), 2, 4, norm_num_groups=32, sample_size=32)


def perturbed(config: dict, seed: int = 0, **extra) -> AutoencoderKL:
    """A model whose weights are all moved off their init (GroupNorm ones, zero biases) so no key can hide."""
    torch.manual_seed(seed)
    model = AutoencoderKL(**config, **extra)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def outputs(model: torch.nn.Module, in_channels: int = 3, size: int = 32) -> torch.Tensor:
    x = torch.rand(2, in_channels, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        return model(x).sample


def assert_same_outputs(loaded: torch.nn.Module, reference: torch.nn.Module, in_channels: int = 3) -> None:
    # Same class, same weights, same input: the outputs must be identical, not merely close.
    assert torch.equal(outputs(loaded, in_channels), outputs(reference, in_channels))


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].shape == value.shape, key
        assert torch.equal(actual[key], value), key


# ----- conversion -----


@pytest.mark.parametrize("name", [*CONFIGS, "sd-shaped"])
def test_ldm_conversion_round_trips_and_agrees_with_diffusers_converter(name):
    config = CONFIGS.get(name, SD_SHAPED)
    state_dict = perturbed(config).state_dict()
    ldm = diffusers_to_ldm(state_dict)
    assert len(ldm) == len(state_dict)
    assert not any("_blocks" in key or "mid_block" in key for key in ldm)
    # Oracle: diffusers' own ldm -> diffusers converter gives back our state dict exactly.
    assert_same_tensors(convert_ldm_vae_checkpoint(dict(ldm), config), state_dict)
    assert_same_tensors(ldm_to_diffusers(ldm), state_dict)


def test_sd_shaped_ldm_keys_follow_the_original_checkpoint_names():
    ldm = diffusers_to_ldm(AutoencoderKL(**SD_SHAPED).state_dict())
    # Names from the CompVis / SD 1.x checkpoints; decoder level 3 is the lowest resolution there.
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    assert ldm["decoder.mid.attn_1.proj_out.weight"].shape == (32, 32, 1, 1)
    for key in (
        "encoder.down.0.block.1.norm2.weight",
        "encoder.down.2.downsample.conv.weight",
        "decoder.up.3.block.2.conv1.weight",
        "decoder.up.1.upsample.conv.weight",
        "encoder.mid.block_2.conv2.bias",
        "decoder.norm_out.bias",
        "quant_conv.weight",
    ):
        assert key in ldm, key
    assert "decoder.up.0.upsample.conv.weight" not in ldm  # the full-resolution level has no upsampler


def test_nin_shortcut_is_renamed():
    state_dict = AutoencoderKL(**CONFIGS["2-levels"]).state_dict()
    ldm = diffusers_to_ldm(state_dict)
    assert "encoder.down.1.block.0.nin_shortcut.weight" in ldm  # 8 -> 16 channels needs a shortcut conv
    assert "decoder.up.0.block.0.nin_shortcut.weight" in ldm  # decoder 16 -> 8 at full resolution


@pytest.mark.parametrize("name", CONFIGS)
def test_shape_inference_recovers_the_architecture(name):
    config = CONFIGS[name]
    ldm = diffusers_to_ldm(AutoencoderKL(**config).state_dict())
    inferred = infer_config(to_diffusers_layout(ldm)[0])
    reference = AutoencoderKL(**config).config
    for key, value in inferred.items():
        if not key.startswith("_"):
            assert value == (list(reference[key]) if isinstance(reference[key], tuple) else reference[key]), (
                key
            )


def test_shape_inference_documents_its_group_guess():
    # 16 groups over 32 channels is invisible in the shapes: the guess is the largest candidate, 32.
    state_dict = AutoencoderKL(**kl_config((32, 32), norm_num_groups=16)).state_dict()
    assert infer_config(state_dict)["norm_num_groups"] == 32


def test_legacy_diffusers_attention_names_are_accepted(tmp_path):
    model = perturbed(CONFIGS["2-levels"])
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state_dict = {}
    for key, value in model.state_dict().items():
        for new, old in legacy.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        state_dict[key] = value.contiguous()
    assert "encoder.mid_block.attentions.0.query.weight" in state_dict
    save_file(state_dict, tmp_path / "old.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(model_config(model)))
    assert_same_outputs(load_vae(tmp_path / "old.safetensors"), model)


# ----- export -----


def test_export_is_loaded_unchanged_by_stock_diffusers(tmp_path):
    model = perturbed(
        SD_SHAPED, scaling_factor=0.3, shift_factor=0.1, force_upcast=False, latents_mean=[0.0, 0.1, 0.2, 0.3]
    )
    ldm_path = export_vae(model, tmp_path / "my-vae", metadata={"step": "1234"})
    out = tmp_path / "my-vae"
    assert ldm_path == out / "my-vae.safetensors"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",  # the model card (tests/test_card.py)
        "config.json",
        "diffusion_pytorch_model.safetensors",
        ldm_path.name,
    ]
    written = json.loads((out / "config.json").read_text())
    assert written["_class_name"] == "AutoencoderKL"
    constructor_keys = set(inspect.signature(diffusers.AutoencoderKL.__init__).parameters) - {"self"}
    assert constructor_keys <= set(written), constructor_keys - set(written)
    assert (
        written["force_upcast"] is False
        and written["scaling_factor"] == 0.3
        and written["latents_std"] is None
    )

    with safe_open(ldm_path, framework="pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["config"]) == written and metadata["step"] == "1234"

    # Stock diffusers, offline, in a fresh process (HF_HUB_OFFLINE is read when huggingface_hub is imported).
    script = (
        "import sys, torch, diffusers\n"
        "out, ldm, dst = sys.argv[1:]\n"
        "a = diffusers.AutoencoderKL.from_pretrained(out)\n"
        "b = diffusers.AutoencoderKL.from_single_file(ldm, config=out)\n"
        "x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1\n"
        "with torch.no_grad():\n"
        "    torch.save({'pretrained': a(x).sample, 'single_file': b(x).sample, 'config': dict(b.config),\n"
        "                'weights': {'pretrained': a.state_dict(), 'single_file': b.state_dict()}}, dst)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    dst = tmp_path / "outputs.pt"
    subprocess.run([sys.executable, "-c", script, out, ldm_path, dst], env=env, check=True, timeout=300)
    results = torch.load(dst, weights_only=False)
    in_memory = diffusers.AutoencoderKL.from_config(model.config)
    in_memory.load_state_dict(model.state_dict())
    expected = outputs(in_memory.eval())
    for how in ("pretrained", "single_file"):
        # Oracle 1: the weights stock diffusers read are bit-identical to ours ...
        loaded = results["weights"][how]
        assert loaded.keys() == model.state_dict().keys(), how
        assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items()), how
        # ... and its outputs equal stock diffusers' in memory (up to thread-count-dependent summation order).
        assert (results[how] - expected).abs().max() < 1e-5 * expected.abs().max(), how
        # Oracle 2: our model. The two implementations sum in different orders; float32 rounding grows through
        # the decoder to ~3e-6 of the output scale (~4 here), hence 1e-5 relative to it.
        assert (results[how] - outputs(model)).abs().max() < 1e-5 * outputs(model).abs().max(), how
    assert results["config"]["scaling_factor"] == 0.3 and results["config"]["force_upcast"] is False

    assert_same_outputs(load_vae(ldm_path), model)
    assert_same_outputs(load_vae(out), model)
    assert load_vae(ldm_path).config.scaling_factor == 0.3  # config came from the file's metadata


def test_reexport_keeps_one_ldm_file_and_leaves_foreign_files(tmp_path):
    model = perturbed(CONFIGS["2-levels"])
    export_vae(model, tmp_path, ldm_filename="first.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "someone-elses.safetensors")
    export_vae(model, tmp_path, ldm_filename="second.safetensors")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "README.md",
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "second.safetensors",
        "someone-elses.safetensors",
    ]


def test_a_crash_while_writing_leaves_the_old_file_whole(tmp_path, monkeypatch):
    model = perturbed(CONFIGS["2-levels"])
    export_vae(model, tmp_path)
    before = (tmp_path / "diffusion_pytorch_model.safetensors").read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(latentvae.files.export, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        export_vae(perturbed(CONFIGS["2-levels"], seed=1), tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "config.json",
        "diffusion_pytorch_model.safetensors",
        f"{tmp_path.name}.safetensors",
    ]


def test_metadata_must_be_strings(tmp_path):
    with pytest.raises(TypeError, match="step"):
        export_vae(perturbed(CONFIGS["2-levels"]), tmp_path, metadata={"step": 3})


# ----- load_vae -----


@pytest.mark.parametrize("prefix", ["first_stage_model.", "vae."])
@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
def test_prefixed_whole_checkpoint_loads_the_vae_part(tmp_path, prefix, layout):
    config = CONFIGS["4-levels-c16-no-mid-attention"]
    model = perturbed(config)
    vae = diffusers_to_ldm(model.state_dict()) if layout == "ldm" else model.state_dict()
    checkpoint = {prefix + k: v.contiguous() for k, v in vae.items()}
    checkpoint["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(4, 4, 3, 3)
    checkpoint["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.randn(
        10, 4
    )
    save_file(checkpoint, tmp_path / "sd-model.safetensors")
    found = read_vae(tmp_path / "sd-model.safetensors")
    assert found.file_format.startswith(f"prefixed checkpoint ({prefix}") and found.config_source.startswith(
        "inferred"
    )
    assert_same_outputs(load_vae(tmp_path / "sd-model.safetensors"), model)


@pytest.mark.parametrize("name", ["model.ckpt", "vae.pt", "vae.pth", "vae.bin"])
def test_pickle_is_refused_unless_allowed(tmp_path, name):
    model = perturbed(CONFIGS["2-levels"])
    path = tmp_path / name
    ldm = {"first_stage_model." + k: v for k, v in diffusers_to_ldm(model.state_dict()).items()}
    torch.save({"state_dict": ldm, "global_step": 7} if name.endswith(".ckpt") else ldm, path)
    with pytest.raises(PickleRefusedError, match="allow_pickle=True"):
        load_vae(path)
    assert_same_outputs(load_vae(path, allow_pickle=True), model)


def test_compvis_autoencoder_checkpoint_skips_its_loss_modules(tmp_path):
    # CompVis' kl-f8 model.ckpt: unprefixed ldm keys plus the training loss (logvar, LPIPS, discriminator).
    model = perturbed(CONFIGS["2-levels"])
    state_dict = {**diffusers_to_ldm(model.state_dict()), "loss.logvar": torch.zeros(())}
    state_dict["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    torch.save({"state_dict": state_dict}, tmp_path / "model.ckpt")
    assert_same_outputs(load_vae(tmp_path / "model.ckpt", allow_pickle=True), model)


def test_pickle_with_python_objects_is_refused_even_when_allowed(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "callback": Path("x")}, path)
    with pytest.raises(VAEFileError, match="weights_only"):
        load_vae(path, allow_pickle=True)


@pytest.mark.parametrize("config_name", ["config.json", "latentvae_config.json"])
def test_training_checkpoint_folder_from_accelerate(tmp_path, config_name):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model = perturbed(CONFIGS["2-levels"])
    try:
        accelerator = Accelerator(cpu=True)
        prepared = accelerator.prepare(model)
        accelerator.save_state(tmp_path / "checkpoint-10")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    (tmp_path / "checkpoint-10" / config_name).write_text(json.dumps(model_config(prepared)))
    found = read_vae(tmp_path / "checkpoint-10")
    assert (
        found.path.name == "model.safetensors" and found.config_source == f"{config_name} beside the weights"
    )
    assert_same_outputs(load_vae(tmp_path / "checkpoint-10"), model)


def test_pipeline_folder_uses_its_vae_subfolder(tmp_path):
    model = perturbed(CONFIGS["2-levels"])
    model.save_pretrained(tmp_path / "vae")
    (tmp_path / "model_index.json").write_text("{}")
    assert_same_outputs(load_vae(tmp_path, dtype=torch.float32), model)
    assert load_vae(tmp_path, dtype=torch.float16).dtype == torch.float16


def test_missing_paths_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_vae(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_vae(tmp_path)


def test_a_wrong_file_names_missing_unexpected_and_misshaped_keys(tmp_path):
    model = perturbed(CONFIGS["2-levels"])
    export_vae(model, tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state_dict = load_file(weights)
    del state_dict["decoder.conv_out.bias"]
    state_dict["encoder.extra.weight"] = torch.zeros(2)
    state_dict["encoder.conv_in.weight"] = torch.zeros(4, 3, 3, 3)
    save_file(state_dict, weights)
    with pytest.raises(StateDictMismatchError) as info:
        load_vae(tmp_path)
    assert isinstance(info.value, ValueError)
    assert info.value.missing == ["decoder.conv_out.bias"]
    assert info.value.unexpected == ["encoder.extra.weight"]
    assert info.value.mismatched == [("encoder.conv_in.weight", (4, 3, 3, 3), (8, 3, 3, 3))]
    message = str(info.value)
    for text in (
        "decoder.conv_out.bias",
        "encoder.extra.weight",
        "[4, 3, 3, 3]",
        "[8, 3, 3, 3]",
        str(weights),
    ):
        assert text in message


def test_a_config_that_does_not_fit_the_weights_is_a_mismatch(tmp_path):
    model = perturbed(CONFIGS["2-levels"])
    wrong = perturbed(kl_config((8, 16), latent_channels=8))
    ldm_path = latentvae.files.export.save_ldm(model, tmp_path / "vae.safetensors")
    tensors = load_file(ldm_path)
    save_file(tensors, ldm_path, metadata={"config": json.dumps(model_config(wrong))})
    with pytest.raises(StateDictMismatchError, match=r"decoder.conv_in.weight: file \[16, 4, 3, 3\]"):
        load_vae(ldm_path)


def test_unknown_files_are_refused_clearly(tmp_path):
    (tmp_path / "vae.onnx").write_bytes(b"x")
    with pytest.raises(VAEFileError, match="unknown VAE file type"):
        load_vae(tmp_path / "vae.onnx")
    save_file({"unet.weight": torch.zeros(1)}, tmp_path / "unet.safetensors")
    with pytest.raises(VAEFileError, match="not a VAE state dict"):
        load_vae(tmp_path / "unet.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(VAEFileError, match="not a readable safetensors file"):
        load_vae(tmp_path / "broken.safetensors")
    config = {"_class_name": "AutoencoderTiny", "block_out_channels": [8]}
    tensors = {"encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}
    save_file(tensors, tmp_path / "tiny.safetensors", {"config": json.dumps(config)})
    with pytest.raises(VAEFileError, match="'AutoencoderTiny' is not supported"):
        load_vae(tmp_path / "tiny.safetensors")


def test_a_config_value_of_the_wrong_type_names_the_key_the_value_and_the_file(tmp_path, capsys):
    """`"latent_channels": "four"` in config.json: load_vae, `latentvae info` and training stop with one message
    naming the key, the value and the file, instead of a TypeError from deep inside torch."""
    from latentvae.cli import main as cli_main
    from latentvae.training.config import parse_config
    from training.train import build_vae

    folder = tmp_path / "vae"
    export_vae(perturbed(CONFIGS["2-levels"]), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**config, "latent_channels": "four", "force_upcast": "no"})
    )
    fragments = [
        str(folder),
        "config.json",
        "'latent_channels': 'four' (expected int)",
        "'force_upcast': 'no' (expected bool)",
    ]
    with pytest.raises(VAEFileError) as raised:
        load_vae(folder)
    assert all(fragment in str(raised.value) for fragment in fragments), raised.value

    assert cli_main(["info", str(folder)]) == 2
    message = capsys.readouterr().err.strip()
    assert (
        len(message.splitlines()) == 1 and "'latent_channels': 'four'" in message and str(folder) in message
    )

    cfg, _ = parse_config(["--pretrained_model_name_or_path", str(folder)])
    with pytest.raises(VAEFileError, match="'latent_channels': 'four'"):
        build_vae(cfg)  # train.py reports a ValueError in one line and exits 2
