"""Synthetic colour images (`latentvae.data.synthetic`, `--synthetic_colour_images`): the HSV conversion against the
standard library's `colorsys`, every hue present, the same pixels for the same seed, and the training set grown by
them."""

from __future__ import annotations

import colorsys

import numpy as np

from latentvae.data.images import load_rgb
from latentvae.data.synthetic import _hsv_to_rgb, colour_images


def test_hsv_conversion_is_colorsys():
    rng = np.random.default_rng(0)
    hsv = rng.uniform(0, 1, (500, 3))
    expected = np.array([colorsys.hsv_to_rgb(*row) for row in hsv])
    np.testing.assert_allclose(_hsv_to_rgb(hsv[:, 0], hsv[:, 1], hsv[:, 2]), expected, atol=1e-12)


def test_the_images_cover_every_hue_and_repeat_with_their_seed():
    images = colour_images(8, size=128, seed=3)
    assert [image.name for image in images] == [f"synthetic-colour-{i:03d}.png" for i in range(8)]
    assert [image.data for image in colour_images(8, size=128, seed=3)] == [image.data for image in images]
    assert colour_images(1, size=128, seed=4)[0].data != images[0].data
    pixels = np.concatenate([np.asarray(load_rgb(image)).reshape(-1, 3) for image in images]) / 255
    hsv = np.array([colorsys.rgb_to_hsv(*p) for p in pixels[::37]])
    saturated = hsv[(hsv[:, 1] > 0.5) & (hsv[:, 2] > 0.3)]
    sextants = np.bincount((saturated[:, 0] * 6).astype(int) % 6, minlength=6) / len(saturated)
    assert sextants.min() > 0.05, sextants  # red, yellow, green, cyan, blue and magenta all present


def test_training_adds_them_to_the_training_images(tmp_path):
    from accelerate import Accelerator

    from latentvae.data.loaders import DataSettings, build_training_data
    from tests.test_train import write_images

    write_images(tmp_path / "train", 4, seed=1)
    write_images(tmp_path / "val", 2, seed=2)
    settings = DataSettings(
        resolution=32,
        train_batch_size=2,
        train_data_dir=str(tmp_path / "train"),
        val_data_dir=str(tmp_path / "val"),
        synthetic_colour_images=5,
    )
    data = build_training_data(settings, Accelerator(cpu=True))
    assert len(data.batches.dataset) == 4 + 5
    assert "5 synthetic colour images" in data.description
    assert len(data.stats) == 4  # the latent statistics stay those of the user's images
