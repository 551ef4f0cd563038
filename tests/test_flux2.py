"""latentvae.AutoencoderKLFlux2 against the oracle diffusers.AutoencoderKLFlux2 (keys, shapes, config, outputs), the
latent-family presets against diffusers' classes, and the files both layouts write, read back by stock diffusers."""

import json

import diffusers
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_model import _config, assert_same, images

from latentvae import FLUX2_PRESETS, PRESETS, AutoencoderKL, AutoencoderKLFlux2, export_vae, load_vae
from latentvae.files.export import save_ldm
from latentvae.models.base import parameter_counts

CONFIGS = {
    "two-levels": _config((8, 16), sample_size=32),
    "wider-decoder": _config((8, 16, 16), 2, 8, sample_size=32, decoder_block_out_channels=(16, 32, 32)),
    "narrower-decoder-no-quant-convs": _config(
        (16, 16, 32),
        latent_channels=6,
        sample_size=32,
        decoder_block_out_channels=(8, 8, 16),
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
        patch_size=(1, 2),
        batch_norm_eps=1e-3,
    ),
    "tiny-preset": FLUX2_PRESETS["tiny-flux2-kl-f8c32"],
}


def perturbed_pair(config: dict, seed: int = 0):
    """Ours with every weight moved off its init and BN statistics of our own; diffusers' with the same tensors."""
    torch.manual_seed(seed)
    ours = AutoencoderKLFlux2(**config)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
        ours.bn.running_mean.copy_(torch.randn_like(ours.bn.running_mean))
        ours.bn.running_var.copy_(torch.rand_like(ours.bn.running_var) + 0.5)
        ours.bn.num_batches_tracked.fill_(7)
    ref = diffusers.AutoencoderKLFlux2(**config)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours.eval(), ref.eval()


def public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_constructor_defaults_are_diffusers_and_the_flux2_preset():
    with torch.device("meta"):
        ours, ref = AutoencoderKLFlux2(), diffusers.AutoencoderKLFlux2()
        preset = AutoencoderKLFlux2.from_preset("flux2-kl-f8c32")
    assert public(ours.config) == public(ref.config)
    assert public(preset.config) == public(ref.config)
    assert "scaling_factor" not in ours.config and "force_upcast" not in ours.config
    assert {k: v.shape for k, v in preset.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_keys_shapes_and_config_match_diffusers(name):
    ours, ref = AutoencoderKLFlux2(**CONFIGS[name]), diffusers.AutoencoderKLFlux2(**CONFIGS[name])
    assert {k: (v.shape, v.dtype) for k, v in ours.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in ref.state_dict().items()
    }
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert public(ours.config) == public(ref.config)
    assert ours.bn.num_features == ref.bn.num_features and not list(ours.bn.parameters())


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_outputs_match_diffusers(name):
    ours, ref = perturbed_pair(CONFIGS[name])
    x = images(2, 32)
    q_ours, q_ref = ours.encode(x).latent_dist, ref.encode(x).latent_dist
    assert_same(q_ours.mean, q_ref.mean)
    assert_same(q_ours.logvar, q_ref.logvar)
    z = q_ref.sample(generator=torch.Generator().manual_seed(3))
    assert_same(ours.decode(z).sample, ref.decode(z).sample)
    assert_same(ours(x).sample, ref(x).sample)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert_same(
        ours(x, sample_posterior=True, generator=g1).sample,
        ref(x, sample_posterior=True, generator=g2).sample,
    )


@torch.no_grad()
def test_to_diffusers_and_back_keep_weights_statistics_and_outputs():
    ours, _ = perturbed_pair(CONFIGS["wider-decoder"])
    stock = ours.to_diffusers()
    assert type(stock) is diffusers.AutoencoderKLFlux2
    x = images(1, 32)
    assert_same(stock(x).sample, ours(x).sample)
    back = AutoencoderKLFlux2.from_diffusers(stock)
    assert type(back) is AutoencoderKLFlux2
    expected = ours.state_dict()
    assert all(
        torch.equal(v, expected[k]) and v.dtype == expected[k].dtype for k, v in back.state_dict().items()
    )


def test_training_leaves_the_bn_statistics_alone_as_diffusers_does():
    """Train mode, a backward pass: `bn` is outside encode/decode in both implementations, so no statistic moves."""
    ours, ref = perturbed_pair(CONFIGS["two-levels"])
    before = {k: v.clone() for k, v in ours.bn.state_dict().items()}
    for model in (ours.train(), ref.train()):
        model(images(2, 32), sample_posterior=True).sample.square().mean().backward()
    for model in (ours, ref):
        assert all(torch.equal(v, before[k]) for k, v in model.bn.state_dict().items())


# ----- presets -----


@pytest.mark.parametrize(
    "name, scaling, shift", [("flux1-kl-f8c16", 0.3611, 0.1159), ("sd3-kl-f8c16", 1.5305, 0.0609)]
)
def test_16_channel_presets_are_the_released_shapes_and_constants(name, scaling, shift):
    """REFERENCES.md: (128, 256, 512, 512), 2 layers, 16 latent channels, no quant convs, the released constants."""
    with torch.device("meta"):
        ours, ref = AutoencoderKL.from_preset(name), diffusers.AutoencoderKL(**PRESETS[name])
    c = ours.config
    assert tuple(c.block_out_channels) == (128, 256, 512, 512) and c.layers_per_block == 2
    assert c.latent_channels == 16 and not c.use_quant_conv and not c.use_post_quant_conv
    assert (c.scaling_factor, c.shift_factor) == (scaling, shift)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    tiny = AutoencoderKL.from_preset(f"tiny-{name}")
    assert tiny.config.latent_channels == 16 and tiny.quant_conv is None and tiny.post_quant_conv is None
    assert (tiny.config.scaling_factor, tiny.config.shift_factor) == (scaling, shift)
    assert tiny.downsampling_factor == 8 and parameter_counts(tiny)["total"] < 1.5e6


def test_tiny_flux2_preset_is_small_and_32_channels():
    tiny = AutoencoderKLFlux2.from_preset("tiny-flux2-kl-f8c32")
    assert (
        tiny.config.latent_channels == 32 and tiny.bn.num_features == 4 * 32 and tiny.downsampling_factor == 8
    )
    assert parameter_counts(tiny)["total"] < 1.5e6
    with pytest.raises(ValueError, match="unknown AutoencoderKLFlux2 preset"):
        AutoencoderKLFlux2.from_preset("tiny-kl-f8")


# ----- files -----


@torch.no_grad()
def test_16_channel_vae_without_quant_convs_round_trips_both_layouts(tmp_path):
    torch.manual_seed(0)
    # 32 groups: what shape inference guesses for these widths (the preset's 16 are not visible in the shapes).
    model = AutoencoderKL.from_preset("tiny-flux1-kl-f8c16", sample_size=32, norm_num_groups=32)
    for p in model.parameters():
        p.add_(0.02 * torch.randn_like(p))
    model.eval()
    ldm_path = export_vae(model, tmp_path / "flux1")
    state = model.state_dict()
    x = images(1, 32)
    expected = model(x).sample
    # Stock diffusers reads the folder, and its own ldm converter reads the single file, to our tensors exactly.
    stock = diffusers.AutoencoderKL.from_pretrained(tmp_path / "flux1").eval()
    assert stock.config.shift_factor == 0.1159 and stock.config.scaling_factor == 0.3611
    assert stock.quant_conv is None and stock.post_quant_conv is None
    converted = convert_ldm_vae_checkpoint(load_file(ldm_path), dict(stock.config))
    for loaded in (stock.state_dict(), converted):
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    assert_same(stock(x).sample, expected)
    for path in (ldm_path, tmp_path / "flux1"):
        vae = load_vae(path)
        assert type(vae) is AutoencoderKL and vae.config.shift_factor == 0.1159
        assert torch.equal(vae(x).sample, expected)
    # Without its metadata, the ldm file's architecture is inferred from the shapes: 16 channels, no quant convs.
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(ldm_path), bare)
    inferred = load_vae(bare)
    assert inferred.config.latent_channels == 16 and not inferred.config.use_quant_conv
    assert torch.equal(inferred(x).sample, expected)


@torch.no_grad()
def test_flux2_export_is_a_diffusers_folder_that_both_libraries_load(tmp_path):
    ours, _ = perturbed_pair(CONFIGS["wider-decoder"])
    written = export_vae(ours, tmp_path / "flux2", metadata={"global_step": "2"})
    out = tmp_path / "flux2"
    assert written == out / "diffusion_pytorch_model.safetensors"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLFlux2" and config["decoder_block_out_channels"] == [
        16,
        32,
        32,
    ]
    with safe_open(written, framework="pt") as f:
        assert f.metadata()["global_step"] == "2"
    state = ours.state_dict()
    x = images(1, 32)
    stock = diffusers.AutoencoderKLFlux2.from_pretrained(out).eval()
    loaded = load_vae(out)
    assert type(loaded) is AutoencoderKLFlux2
    for model in (stock, loaded):
        got = model.state_dict()
        assert got.keys() == state.keys()
        assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in state.items())
    assert_same(stock(x).sample, ours(x).sample)
    assert torch.equal(loaded(x).sample, ours(x).sample)
    stock.save_pretrained(tmp_path / "saved-by-diffusers")  # and the other way round
    again = load_vae(tmp_path / "saved-by-diffusers")
    assert type(again) is AutoencoderKLFlux2
    assert json.loads(json.dumps(public(again.config))) == json.loads(json.dumps(public(ours.config)))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(TypeError, match="no ldm single-file layout"):
        save_ldm(ours, tmp_path / "flux2.safetensors")


def test_flux2_architecture_is_inferred_from_the_weights_alone(tmp_path):
    # A square patch: a (1, 2) patch and a (2, 1) one give the same shapes.
    ours, _ = perturbed_pair({**CONFIGS["narrower-decoder-no-quant-convs"], "patch_size": (3, 3)})
    bare = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, bare)
    loaded = load_vae(bare)
    assert type(loaded) is AutoencoderKLFlux2
    c = loaded.config
    assert tuple(c.decoder_block_out_channels) == (8, 8, 16) and tuple(c.patch_size) == (3, 3)
    assert not c.use_quant_conv and not c.mid_block_add_attention
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_the_command_line_converts_and_describes_a_flux2_vae(tmp_path, capsys):
    from latentvae.cli import main

    ours, _ = perturbed_pair(CONFIGS["wider-decoder"])
    export_vae(ours.half(), tmp_path / "fp16")  # a sorted file starts with the int64 bn.num_batches_tracked
    assert main(["convert", str(tmp_path / "fp16"), str(tmp_path / "copy"), "--to", "diffusers"]) == 0
    copy = load_file(tmp_path / "copy" / "diffusion_pytorch_model.safetensors")
    assert copy["decoder.conv_out.weight"].dtype == torch.float16 and copy["bn.num_batches_tracked"] == 7
    assert main(["convert", str(tmp_path / "fp16"), str(tmp_path / "flux2.safetensors"), "--to", "ldm"]) == 2
    assert "no ldm single-file layout" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "copy")]) == 0
    out = capsys.readouterr().out
    assert "(decoder [16, 32, 32])" in out and "bn over [2, 2]-patchified latents (32 channels)" in out
