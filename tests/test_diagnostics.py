"""Latent health, artefact checks and the diffusion probe (`latentvae diagnose`), against oracles: torch.distributions'
KL, a channel forced constant, a sinusoid's frequency, an autoencoder whose equivariance is known in closed form,
an exact autoencoder, and latents made deliberately harder to diffuse."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from PIL import Image
from torch.distributions import Normal, kl_divergence

from latentvae import AutoencoderKL
from latentvae.cli import main
from latentvae.evaluation.artefacts import equivariance, round_trip_drift
from latentvae.evaluation.diagnostics import DiagnoseSettings, run_probe
from latentvae.evaluation.evaluate import open_data
from latentvae.evaluation.latent_health import (
    LatentHealth,
    Spectrum,
    channel_kl,
    denormalise_latents,
    normalise_latents,
    posterior_parts,
)
from latentvae.evaluation.latent_stats import measure_latent_stats
from latentvae.evaluation.metrics import psnr, to_uint8
from latentvae.evaluation.probe import ProbeSettings
from latentvae.models.distributions import DiagonalGaussianDistribution


def test_channel_kl_is_torch_distributions_kl_averaged_over_images_and_positions():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    oracle = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).mean((0, 2, 3))
    torch.testing.assert_close(channel_kl(mean, logvar).mean(0).float(), oracle)


def test_latent_health_kl_matches_the_posterior_of_a_model():
    model = AutoencoderKL.from_preset("tiny-kl-f8").eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    health = LatentHealth()
    with torch.no_grad():
        health.add(model, *posterior_parts(model, x))
        posterior = model.encode(x).latent_dist
    oracle = kl_divergence(Normal(posterior.mean, posterior.std), Normal(0.0, 1.0)).mean((0, 2, 3))
    np.testing.assert_allclose(health.summary()["kl_per_channel"], oracle.numpy(), rtol=1e-5)


def test_a_channel_forced_constant_is_one_active_unit_fewer():
    # a large scaling factor makes every channel of the random-init model vary by more than 0.01 over images
    model = AutoencoderKL.from_preset("tiny-kl-f8", scaling_factor=30.0).eval()
    x = torch.rand(6, 3, 32, 32) * 2 - 1

    def active() -> int:
        health = LatentHealth()
        with torch.no_grad():
            health.add(model, *posterior_parts(model, x))
        return health.summary()["active_units"]

    assert active() == 4
    with torch.no_grad():  # the quant conv's output channel 2 is the posterior mean of latent channel 2
        model.quant_conv.weight[2] = 0.0
        model.quant_conv.bias[2] = 0.7
    assert active() == 3


def test_normalisation_is_the_pipelines_and_inverts():
    model = AutoencoderKL.from_preset("tiny-flux1-kl-f8c16")
    z = torch.randn(2, 16, 4, 4)
    c = model.config
    torch.testing.assert_close(normalise_latents(model, z), (z - c.shift_factor) * c.scaling_factor)
    torch.testing.assert_close(denormalise_latents(model, normalise_latents(model, z)), z)


@pytest.mark.parametrize("frequency", [3, 10])
def test_the_spectrum_of_a_sinusoid_peaks_at_its_frequency(frequency):
    n = 32
    cols = torch.arange(n, dtype=torch.float64)
    x = torch.sin(2 * math.pi * frequency * cols / n).expand(2, 1, n, n)
    spectrum = Spectrum()
    spectrum.add(x)
    summary = spectrum.summary()
    peak = summary["frequency"][int(np.argmax(summary["power"]))]
    assert peak == pytest.approx(frequency / n)
    assert summary["high_frequency_share"] == pytest.approx(float(frequency / n > 0.25))


class PoolingVAE(AutoencoderKL):
    """A fixed "VAE": the latent is the 8x8 average of the image (3 channels), decoding repeats each latent value
    over its 8x8 block; so it commutes with 90-degree rotation and area downscaling by construction."""

    def encode(self, x, return_dict=True):
        mean = F.avg_pool2d(x, 8)
        posterior = DiagonalGaussianDistribution(torch.cat([mean, torch.full_like(mean, -30.0)], 1))
        return AutoencoderKLOutput(latent_dist=posterior)

    def decode(self, z, return_dict=True, generator=None):
        return DecoderOutput(sample=F.interpolate(z, scale_factor=8, mode="nearest"))


def pooling_vae() -> PoolingVAE:
    return PoolingVAE.from_preset("tiny-kl-f8", latent_channels=3).eval()


def test_equivariance_of_a_pooling_autoencoder_is_what_theory_says():
    model = pooling_vae()
    torch.manual_seed(0)
    images = (torch.rand(2, 3, 64, 64) * 255).round()
    found = equivariance(model, images)
    # rotation commutes with pooling and upsampling: the error is the reconstruction error, exactly
    assert found["rotate_90"] == pytest.approx(found["none"], abs=1e-4)
    # D(pool_s(E(x))) = D(E(pool_s(x))): the error is the reconstruction error of the downscaled image
    for name, s in (("downscale_2x", 2), ("downscale_4x", 4)):
        small = F.avg_pool2d(images / 127.5 - 1, s)
        own = psnr(to_uint8(small), to_uint8(F.interpolate(F.avg_pool2d(small, 8), scale_factor=8)))
        np.testing.assert_allclose(found[name], own.numpy(), rtol=1e-5)
    # images constant on 32x32 blocks survive every transform exactly
    blocks = F.interpolate((torch.rand(2, 3, 2, 2) * 255).round(), scale_factor=32)
    assert all(v == math.inf for values in equivariance(model, blocks).values() for v in values)


def test_an_exact_autoencoder_does_not_drift():
    model = pooling_vae()
    images = F.interpolate((torch.rand(2, 3, 4, 4) * 255).round(), scale_factor=8)  # constant 8x8 blocks
    drift = round_trip_drift(model, images)
    assert set(drift) == {1, 2, 4, 8}
    for scores in drift.values():
        assert scores["psnr"] == [math.inf, math.inf]
        assert scores["ciede2000"] == [0.0, 0.0]


class SignFlippedVAE(AutoencoderKL):
    """The same weights with a fixed random +-1 pattern (per channel and position) multiplied into the latents and
    divided out again before decoding: reconstructions are exact copies, the latents are white noise-like."""

    def encode(self, x, return_dict=True):
        posterior = super().encode(x).latent_dist
        mean, logvar = posterior.mean * self.signs, posterior.logvar  # a sign flip keeps the variance
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(torch.cat([mean, logvar], 1)))

    def decode(self, z, return_dict=True, generator=None):
        return super().decode(z * self.signs)


def smooth_images(folder, count: int, size: int = 128) -> None:
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        coarse = torch.rand((1, 3, 4, 4), generator=generator)
        image = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        array = (image[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(array).save(folder / f"{i:02d}.png")


def test_the_probe_finds_latents_with_a_high_frequency_sign_pattern_harder(tmp_path):
    """Sanity check (b): same weights, same reconstructions, latents made harder to diffuse -> a clearly worse
    probe loss (here about 1.4x: 0.91 against 1.32 after 50 steps, a few CPU seconds each)."""
    smooth_images(tmp_path, 20)
    data = open_data(tmp_path, None)
    torch.manual_seed(0)
    plain = AutoencoderKL.from_preset("tiny-kl-f8", sample_size=64).eval()
    # A random-init posterior's noise is as large as the spread of its means, so its samples would be white noise
    # already: a small posterior std (log sigma^2 = -12) lets the latents carry the images' smoothness.
    with torch.no_grad():
        plain.quant_conv.bias[4:] = -12.0
    # unit variance, as training's measured scaling factor gives, so the probe sees unit-scale latents
    stats = measure_latent_stats(plain, [torch.rand(8, 3, 128, 128) * 2 - 1])
    plain.register_to_config(scaling_factor=stats.scaling_factor)
    flipped = SignFlippedVAE.from_config(plain.config).eval()
    flipped.load_state_dict(plain.state_dict())
    flipped.signs = torch.randint(0, 2, (1, 4, 16, 16), generator=torch.Generator().manual_seed(1)) * 2.0 - 1
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(flipped(x).sample, plain(x).sample)
    settings = DiagnoseSettings(
        resolution=128, probe_images=16, probe_val_images=4, grid_samples=2,
        probe=ProbeSettings(steps=50, eval_every=25, sample_steps=2, learning_rate=2e-3),
    )  # fmt: skip
    easy, _ = run_probe(plain, data, settings)
    hard, _ = run_probe(flipped, data, settings)
    print(f"probe loss: plain {easy['val_loss']:.4f}, sign-flipped {hard['val_loss']:.4f}")
    assert hard["val_loss"] > 1.25 * easy["val_loss"]


def test_diagnose_writes_json_markdown_and_plots_for_models_side_by_side(tmp_path):
    smooth_images(tmp_path, 6, size=32)
    torch.manual_seed(0)
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        AutoencoderKL.from_preset("tiny-kl-f8", sample_size=32).save_pretrained(tmp_path / name)
    out = tmp_path / "out"
    code = main(
        ["diagnose", str(tmp_path / "a"), "--model", f"second={tmp_path / 'b'}", "--data_dir", str(tmp_path),
         "--output_dir", str(out), "--resolution", "32", "--drift_images", "2", "--seam_images", "1",
         "--grid_samples", "2", "--interpolation_steps", "3", "--probe_steps", "4", "--probe_images", "3",
         "--probe_val_images", "2", "--probe_views", "1"]
    )  # fmt: skip
    assert code == 0
    document = json.loads((out / "diagnostics.json").read_text())
    assert [m["name"] for m in document["models"]] == ["a", "second"]
    first = document["models"][0]
    assert len(first["health"]["kl_per_channel"]) == 4 and first["seams"]["image_size"] == 64
    assert set(first["drift"]) == {"1", "2", "4", "8"} and len(first["probe"]["curve_val_loss"]) == 4
    report = (out / "diagnostics.md").read_text()
    assert "| a |" in report and "| second |" in report and "**" in report
    for name in ("kl_per_channel", "spectra", "drift", "probe_loss", "samples_a", "interpolation_second"):
        with Image.open(out / f"{name}.png") as image:
            assert image.format == "PNG" and image.width > 50


def test_probe_sanity_script_measures_the_same_probe_and_an_exact_sign_flip(tmp_path):
    """eval/probe_sanity.py: its plain runs are diagnose's probe with the same seed, and its sign-flipped VAE
    reconstructs exactly what the VAE does (only the latents change)."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    from latentvae import export_vae

    root = Path(__file__).resolve().parents[1]
    smooth_images(tmp_path, 10, size=64)
    torch.manual_seed(0)
    vae = AutoencoderKL.from_preset("tiny-kl-f8", sample_size=64).eval()
    export_vae(vae, tmp_path / "vae")
    out = tmp_path / "out"
    command = [
        sys.executable, str(root / "eval" / "probe_sanity.py"), "--vae", str(tmp_path / "vae"),
        "--data_dir", str(tmp_path), "--resolution", "64", "--seeds", "0", "1", "--probe_steps", "3",
        "--probe_images", "6", "--probe_val_images", "2", "--out", str(out),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    record = json.loads((out / "probe_sanity.json").read_text())
    assert [row["seed"] for row in record["runs"]["sign_flipped"]] == [0, 1]
    assert "sign_flipped" in (out / "probe_sanity.md").read_text()

    settings = DiagnoseSettings(
        resolution=64, probe_images=6, probe_val_images=2, grid_samples=1, probe=ProbeSettings(steps=3)
    )
    expected, _ = run_probe(vae, open_data(tmp_path, None), settings)
    assert record["runs"]["plain"][0]["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)

    spec = importlib.util.spec_from_file_location("probe_sanity", root / "eval" / "probe_sanity.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        plain_out, plain_mean = vae(x).sample, vae.encode(x).latent_dist.mean
        flipped = script.sign_flipped(vae, 8, seed=1)
        torch.testing.assert_close(flipped(x).sample, plain_out)
        signs = flipped.encode(x).latent_dist.mean / plain_mean
    torch.testing.assert_close(signs.abs(), torch.ones_like(signs))
    assert (signs < 0).float().mean().item() == pytest.approx(0.5, abs=0.15)
