"""eval/evaluate.py (`latentvae evaluate`): metrics against analytic values and independent libraries, the image
paths' shapes, and whole runs of tiny models on a folder of small images."""

from __future__ import annotations

import csv
import json
import math

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.linalg import sqrtm
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from latentvae import AutoencoderKL, export_vae
from latentvae.cli import SUBCOMMANDS, main
from latentvae.data.images import ImageDataset, load_rgb
from latentvae.evaluation.evaluate import (
    build_metric_networks,
    evaluate,
    open_data,
    pad_to_multiple,
    prepare_image,
    reconstruct,
)
from latentvae.evaluation.metrics import frechet_distance, inception_features, psnr, ssim
from latentvae.evaluation.report import write_outputs
from latentvae.evaluation.results import EvalData, EvalSettings, MetricNetworks, parse_model_arg
from latentvae.pretrained import build_lpips

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
FID_FILE = "pt_inception-2015-12-05-6726825d.pth"


@pytest.fixture(autouse=True)
def empty_torch_hub(tmp_path, monkeypatch):
    """No pretrained weights and no downloads, as on a machine that is offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "torch" / "hub" / "checkpoints"


def tiny_vae(levels: int, seed: int = 0) -> AutoencoderKL:
    """Downsampling factor 2^(levels - 1)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(8, 16, 16)[:levels],
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
    )


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    noise = gaussian_filter(rng.normal(size=(height, width, 3)), sigma=(2, 2, 0))
    return np.clip((noise - noise.mean()) / noise.std() * 50 + 128, 0, 255).astype(np.uint8)


def as_batch(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float()  # HWC -> [1, 3, H, W]


def oracle_reconstruction(folder, image: np.ndarray) -> np.ndarray:
    """diffusers' own AutoencoderKL, numpy's reflect padding and the protocol's uint8 rounding."""
    vae = diffusers.AutoencoderKL.from_pretrained(folder)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    height, width = image.shape[:2]
    padded = np.pad(image, ((0, -height % f), (0, -width % f), (0, 0)), mode="reflect")
    with torch.no_grad():
        y = vae(as_batch(padded) / 127.5 - 1).sample[..., :height, :width]
    return ((y.clamp(-1, 1) + 1) * 127.5).round()[0].permute(1, 2, 0).numpy().astype(np.uint8)


def oracle_crop(path, resolution: int) -> np.ndarray:
    """The training pipeline's validation crop (resize shorter side, center crop), back in uint8."""
    pixels = ImageDataset([path], resolution, train=False).crop(load_rgb(path))
    return ((pixels + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(np.uint8)


def read_json_strictly(path):
    def refuse(token):
        raise ValueError(f"not valid JSON: {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture
def image_dir(tmp_path):
    """Three images of two shapes and one corrupt file."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(smooth_image(rng, 32, 32)).save(folder / "a.png")
    Image.fromarray(smooth_image(rng, 36, 46)).save(folder / "b.png")
    Image.fromarray(smooth_image(rng, 30, 22)).save(folder / "c.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return folder


# ----- metrics -----


def test_psnr_of_a_known_additive_error_is_the_analytic_value_and_identical_images_give_inf():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.integers(20, 236, size=(2, 3, 16, 16))).float()
    signs = torch.from_numpy(rng.choice([-1.0, 1.0], size=x.shape))
    for d in (1.0, 5.0, 17.0):
        # MSE = d^2, so PSNR = 10 log10(255^2 / d^2) = 20 log10(255 / d)
        assert psnr(x, x + d * signs).tolist() == pytest.approx([20 * math.log10(255 / d)] * 2, abs=1e-4)
    assert psnr(x, x).tolist() == [math.inf, math.inf]


def test_ssim_of_identical_images_is_one_and_agrees_with_scikit_image():
    rng = np.random.default_rng(2)
    for _ in range(3):
        a = smooth_image(rng, 128, 128)
        b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
        ours = ssim(as_batch(a), as_batch(b)).item()
        theirs = structural_similarity(
            a,
            b,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=255,
            channel_axis=-1,
        )
        # torchmetrics averages the reflect-padded border too, scikit-image only the interior: at 128 px the two
        # differ by up to about 0.006; the interior values are the same.
        assert ours == pytest.approx(theirs, abs=0.01)
        assert ssim(as_batch(a), as_batch(a)).item() == pytest.approx(1.0, abs=1e-6)


def test_frechet_distance_matches_the_closed_form_for_gaussians_with_diagonal_covariance():
    rng = np.random.default_rng(3)
    n, d = 50, 6
    var_a, var_b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)

    def samples(mu, var):
        # orthonormal, centered columns: the sample mean is mu and the unbiased covariance exactly diag(var)
        centered = rng.normal(size=(n, d))
        q, _ = np.linalg.qr(centered - centered.mean(0))
        return mu + q * np.sqrt((n - 1) * var)

    a, b = samples(mu_a, var_a), samples(mu_b, var_b)
    assert np.allclose(np.cov(a, rowvar=False), np.diag(var_a))
    # Commuting covariances: Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) = sum (sqrt(var_a) - sqrt(var_b))^2
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], b)


# ----- image paths -----


def test_resize_and_center_crop_match_the_training_pipeline_and_native_size_is_kept(tmp_path):
    path = tmp_path / "wide.png"
    original = smooth_image(np.random.default_rng(4), 60, 90)
    Image.fromarray(original).save(path)
    cropped = prepare_image(path, 32)
    assert cropped.shape == (32, 32, 3)
    np.testing.assert_array_equal(cropped, oracle_crop(path, 32))
    np.testing.assert_array_equal(prepare_image(path, None), original)


@pytest.mark.parametrize("height,width", [(16, 16), (30, 22), (5, 7), (3, 2), (1, 4), (9, 1)])
def test_pad_to_multiple_is_numpy_reflect_padding(height, width):
    image = torch.arange(height * width * 3, dtype=torch.float32).reshape(1, 3, height, width)
    padded = pad_to_multiple(image, 8)
    expected = np.pad(image.numpy(), ((0, 0), (0, 0), (0, -height % 8), (0, -width % 8)), mode="reflect")
    assert padded.shape[-2] % 8 == 0 and padded.shape[-1] % 8 == 0
    np.testing.assert_array_equal(padded.numpy(), expected)


def test_reconstruct_pads_to_the_downsampling_factor_and_crops_back(tmp_path):
    model = tiny_vae(levels=3).eval()  # factor 4, which divides neither 30 nor 22
    export_vae(model, tmp_path / "vae")
    image = smooth_image(np.random.default_rng(5), 30, 22)
    seen = []
    model.encoder.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    recon, latents = reconstruct(model, as_batch(image))
    assert seen == [(1, 3, 32, 24)]
    assert recon.shape == (1, 3, 30, 22) and latents.shape == (1, 4, 8, 6)
    expected = oracle_reconstruction(tmp_path / "vae", image)
    ours = recon[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - expected).max() <= 1  # same weights, float rounding may flip a value by one step
    assert (ours != expected).mean() < 0.01


# ----- whole runs -----


def test_two_models_give_csv_rows_summary_report_and_grids(tmp_path, image_dir, empty_torch_hub):
    export_vae(tiny_vae(levels=2, seed=0), tmp_path / "f2")
    export_vae(tiny_vae(levels=3, seed=1), tmp_path / "f4")
    out = tmp_path / "out"
    argv = ["evaluate", "--model", f"small={tmp_path / 'f2'}", "--model", str(tmp_path / "f4")]
    argv += [
        "--data_dir",
        str(image_dir),
        "--output_dir",
        str(out),
        "--resolution",
        "32",
        "--batch_size",
        "2",
    ]
    assert main([*argv, "--grid_images", "2"]) == 0

    with open(out / "per_image.csv") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == [
        "model", "image", "psnr", "ssim", "lpips", "psnr_y", "psnr_c", "colourfulness_ratio", "ciede2000"
    ]  # fmt: skip
    assert [(row["model"], row["image"]) for row in rows] == [
        (model, image) for model in ("small", "f4") for image in ("a.png", "b.png", "c.png")
    ]
    assert all(row["lpips"] == "" for row in rows)  # no LPIPS weights here
    for row in rows:
        original = oracle_crop(image_dir / row["image"], 32)
        recon = oracle_reconstruction(tmp_path / ("f2" if row["model"] == "small" else "f4"), original)
        assert float(row["psnr"]) == pytest.approx(
            peak_signal_noise_ratio(original, recon, data_range=255), abs=0.02
        )
        # luma and chroma against PIL's YCbCr (BT.601 full range, rounded to uint8 by PIL: hence the tolerance)
        y_real, y_fake = (
            np.asarray(Image.fromarray(a).convert("YCbCr"), dtype=np.float64) for a in (original, recon)
        )
        assert float(row["psnr_y"]) == pytest.approx(
            peak_signal_noise_ratio(y_real[..., 0], y_fake[..., 0], data_range=255), abs=0.3
        )
        assert float(row["psnr_c"]) == pytest.approx(
            peak_signal_noise_ratio(y_real[..., 1:], y_fake[..., 1:], data_range=255), abs=0.3
        )

    summary = read_json_strictly(out / "summary.json")
    small, f4 = summary["models"]
    assert (small["name"], f4["name"]) == ("small", "f4")
    assert small["n_images"] == f4["n_images"] == 3
    assert small["lpips"] is None and small["rfid"] is None
    assert small["latent_shape"] == [4, 16, 16] and f4["latent_shape"] == [4, 8, 8]
    assert (small["compression_factor"], f4["compression_factor"]) == (3.0, 12.0)  # 3 f^2 / C
    config = json.loads((tmp_path / "f4" / "config.json").read_text())
    assert f4["config_scaling_factor"] == config["scaling_factor"]
    assert len(f4["latent_channel_std"]) == 4 and f4["suggested_scaling_factor"] > 0
    assert small["encode_ms"] > 0 and small["decode_ms"] > 0
    assert list(summary["skipped_images"]) == [str(image_dir / "broken.png")]
    assert ALEXNET_FILE in summary["skipped_metrics"]["lpips"]
    assert FID_FILE in summary["skipped_metrics"]["rfid"]

    report = (out / "report.md").read_text()
    expected_parts = ("| small |", "| f4 |", "**", "## Protocol", "broken.png", ALEXNET_FILE, FID_FILE)
    for expected in (*expected_parts, "rFID caveat:** when computed (see Skipped) on 3 images"):
        assert expected in report
    assert str(empty_torch_hub) in report  # where to put the weights
    for name in ("worst_small", "best_small", "worst_f4", "best_f4", "side_by_side"):
        with Image.open(out / f"{name}.png") as grid:
            assert grid.mode == "RGB" and grid.width > 3 * 32
        assert f"{name}.png" in report


def test_the_latent_normalisation_report_shows_each_convention_against_the_config(tmp_path, image_dir):
    vae = AutoencoderKL(**{**tiny_vae(levels=3).config, "shift_factor": 0.25, "scaling_factor": 0.5})
    export_vae(vae, tmp_path / "vae")
    out = tmp_path / "out"
    argv = [
        "evaluate",
        "--model",
        str(tmp_path / "vae"),
        "--data_dir",
        str(image_dir),
        "--output_dir",
        str(out),
    ]
    assert (
        main([*argv, "--resolution", "32", "--batch_size", "2", "--seed", "4", "--no_fid", "--no_lpips"]) == 0
    )
    (found,) = [m["latent_normalization"] for m in read_json_strictly(out / "summary.json")["models"]]
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert found["held_mode"] == found["default_mode"] == "shift_scale"
    assert found["held"] == {
        k: config[k] for k in ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
    }

    # The suggestions, from posterior samples drawn by stock diffusers: the same crops, batches and seed.
    stock = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae")
    crops = [as_batch(oracle_crop(image_dir / name, 32)) / 127.5 - 1 for name in ("a.png", "b.png", "c.png")]
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        z = [
            stock.encode(torch.cat(b)).latent_dist.sample(generator=generator) for b in (crops[:2], crops[2:])
        ]
    z = torch.cat(z).double().numpy()
    suggested = found["suggested"]
    assert set(suggested) == {"scale", "shift_scale", "per_channel"}  # no bn: no batchnorm
    assert suggested["shift_scale"]["shift_factor"] == pytest.approx(z.mean(), rel=1e-4, abs=1e-6)
    assert suggested["shift_scale"]["scaling_factor"] == pytest.approx(1 / z.std(), rel=1e-4)
    assert suggested["scale"] == {**suggested["shift_scale"], "shift_factor": None}
    np.testing.assert_allclose(suggested["per_channel"]["latents_std"], z.std(axis=(0, 2, 3)), rtol=1e-4)
    report = (out / "report.md").read_text()
    assert "| Constant | Config (shift_scale) | scale | shift_scale (default) | per_channel |" in report
    assert "| `shift_factor` | 0.25 | none |" in report


def test_native_size_with_a_factor_that_does_not_divide_the_image(tmp_path, image_dir):
    export_vae(tiny_vae(levels=3), tmp_path / "f4")
    out = tmp_path / "out"
    argv = [
        "evaluate",
        "--model",
        str(tmp_path / "f4"),
        "--data_dir",
        str(image_dir),
        "--output_dir",
        str(out),
    ]
    assert main([*argv, "--resize", "none", "--no_lpips", "--no_fid", "--max_images", "3"]) == 0
    with open(out / "per_image.csv") as file:
        rows = {row["image"]: float(row["psnr"]) for row in csv.DictReader(file)}
    assert list(rows) == ["a.png", "b.png"]  # the first 3 files in name order hold broken.png
    original = np.array(Image.open(image_dir / "b.png"))  # 36 x 46, padded to 36 x 48 inside
    expected = peak_signal_noise_ratio(
        original, oracle_reconstruction(tmp_path / "f4", original), data_range=255
    )
    assert rows["b.png"] == pytest.approx(expected, abs=0.02)
    assert "turned off with --no_lpips" in (out / "report.md").read_text()


def test_identical_reconstructions_report_inf_and_keep_the_json_valid(tmp_path):
    model = tiny_vae(levels=2)
    with torch.no_grad():  # the decoder outputs +10 everywhere: clamped to white
        model.decoder.conv_out.weight.zero_()
        model.decoder.conv_out.bias.fill_(10.0)
    export_vae(model, tmp_path / "white")
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("w1.png", "w2.png"):
        Image.new("RGB", (16, 16), "white").save(folder / name)
    evaluation = evaluate(
        [parse_model_arg(str(tmp_path / "white"))],
        EvalData([folder / "w1.png", folder / "w2.png"], "two white squares", folder),
        EvalSettings(resolution=16, lpips_net=None, fid=False),
        progress=False,
    )
    write_outputs(evaluation, tmp_path / "out")
    model_summary = read_json_strictly(tmp_path / "out" / "summary.json")["models"][0]
    assert model_summary["psnr"] == "inf" and model_summary["psnr_infinite"] == 2
    assert model_summary["psnr_std"] is None and model_summary["ssim"] == pytest.approx(1.0)
    with open(tmp_path / "out" / "per_image.csv") as file:
        assert [row["psnr"] for row in csv.DictReader(file)] == ["inf", "inf"]
    assert "| white | 2 | inf |" in (tmp_path / "out" / "report.md").read_text()


def test_fid_inception_loads_its_weights_file_through_pytorch_fid_and_matches_its_features(
    tmp_path, empty_torch_hub
):
    """Random weights saved under the FID file name, which pytorch-fid then loads through its own path: the
    features are meaningless but must equal pytorch-fid's own (file reading included) on the same images."""
    import torchvision
    from pytorch_fid.fid_score import get_activations

    empty_torch_hub.mkdir(parents=True)
    inception = torchvision.models.inception_v3(
        num_classes=1008, aux_logits=False, weights=None, init_weights=True
    )
    torch.save(inception.state_dict(), empty_torch_hub / FID_FILE)
    networks = build_metric_networks(EvalSettings(lpips_net=None, fid=True))
    assert networks.inception is not None and "rfid" not in networks.skipped

    rng = np.random.default_rng(6)
    images = [smooth_image(rng, 32, 32) for _ in range(3)]
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(files[-1])
    theirs = get_activations(files, networks.inception, batch_size=3, dims=2048, device="cpu", num_workers=0)
    ours = inception_features(networks.inception, torch.cat([as_batch(image) for image in images]))
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-4)


class TinyFeatures(torch.nn.Module):
    """Stands in for pytorch-fid's InceptionV3 (input in [0, 1], a list holding `(B, D, 1, 1)`), with D = 2 so that
    three images give full-rank covariances."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 5), torch.nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return [self.net(x)]


def test_lpips_and_rfid_are_filled_in_when_their_networks_are_there(tmp_path, image_dir):
    networks = MetricNetworks(lpips=build_lpips("alex", random_backbone=True), inception=TinyFeatures())
    export_vae(tiny_vae(levels=2), tmp_path / "vae")
    sources = [image_dir / name for name in ("a.png", "b.png", "c.png")]
    settings = EvalSettings(resolution=32, batch_size=2)
    data = EvalData(sources, "three images", image_dir)
    result = evaluate(
        [parse_model_arg(str(tmp_path / "vae"))], data, settings, networks, progress=False
    ).models[0]

    originals = [oracle_crop(path, 32) for path in sources]
    recons = [oracle_reconstruction(tmp_path / "vae", original) for original in originals]
    with torch.no_grad():
        for i, (original, recon) in enumerate(zip(originals, recons)):
            expected = networks.lpips(as_batch(original) / 127.5 - 1, as_batch(recon) / 127.5 - 1).item()
            assert result.scores["lpips"][i] == pytest.approx(expected, rel=1e-3, abs=1e-6)
        stats = []
        for images in (originals, recons):
            features = networks.inception(torch.cat([as_batch(image) for image in images]) / 255)[0].flatten(
                1
            )
            stats.append((features.double().mean(0).numpy(), np.cov(features.double().numpy(), rowvar=False)))
    (mu_a, cov_a), (mu_b, cov_b) = stats
    # FID = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), here with scipy's matrix square root
    expected_fid = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * sqrtm(cov_a @ cov_b).real)
    assert result.rfid == pytest.approx(expected_fid, rel=1e-4, abs=1e-9)
    summary = result.summary()
    assert summary["rfid_n_images"] == 3 and summary["lpips"] == pytest.approx(
        np.mean(result.scores["lpips"])
    )


# ----- command line and data -----


def test_command_line_errors_are_one_line_and_exit_2(tmp_path, image_dir, capsys):
    export_vae(tiny_vae(levels=2), tmp_path / "vae")
    assert "evaluate" in SUBCOMMANDS
    base = ["evaluate", "--model", str(tmp_path / "vae"), "--output_dir", str(tmp_path / "out")]
    assert main(base) == 2
    assert "--data_dir DIR or --dataset_name NAME" in capsys.readouterr().err
    assert main([*base, "--data_dir", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert (
        main(["evaluate", "--model", str(tmp_path / "missing"), "--data_dir", str(image_dir)] + base[3:]) == 2
    )
    assert "missing" in capsys.readouterr().err
    assert main([*base, "--data_dir", str(image_dir), "--model", f"vae={tmp_path / 'vae'}"]) == 2
    assert "distinct names" in capsys.readouterr().err


def test_model_names_default_to_the_folder_or_file_name(tmp_path):
    (tmp_path / "my_vae").mkdir()
    (tmp_path / "a=b.safetensors").touch()
    assert parse_model_arg(str(tmp_path / "my_vae")).name == "my_vae"
    assert parse_model_arg(str(tmp_path / "vae.safetensors")).name == "vae"
    assert parse_model_arg(f"base={tmp_path / 'my_vae'}").name == "base"
    assert parse_model_arg(str(tmp_path / "a=b.safetensors")).path == tmp_path / "a=b.safetensors"


def test_a_hugging_face_dataset_is_read_and_cut_to_max_images(tmp_path, image_dir):
    datasets = pytest.importorskip("datasets")
    files = [str(image_dir / name) for name in ("a.png", "b.png", "c.png")]
    dataset = datasets.Dataset.from_dict({"picture": files}).cast_column("picture", datasets.Image())
    dataset.save_to_disk(tmp_path / "ds")
    data = open_data(None, str(tmp_path / "ds"), image_column="picture", max_images=2)
    assert len(data.sources) == 2
    assert [prepare_image(source, None).shape for source in data.sources] == [(32, 32, 3), (36, 46, 3)]
