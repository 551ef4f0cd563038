"""Synthetic colour images, generated in memory: smooth fields of every hue with hard-edged shapes and fine texture.

The CPU quickstart trains on the photographs scikit-image bundles; they hold no green-dominant pixel at all (five are
greyscale), so a VAE trained on them alone renders grass and foliage grey. These images put the whole hue circle,
at all saturations and brightnesses, into the training set (`--synthetic_colour_images N`), offline and the same on
every machine: the same `seed` gives the same pixels.

Each image: a background whose hue, saturation and value vary smoothly (a few random low-frequency waves in HSV),
then random discs and rectangles of random saturated colours with hard edges, then a little pixel noise (texture).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from latentvae.data.images import ImageBytes


def _waves(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, count: int = 3) -> np.ndarray:
    """A smooth field in [0, 1]: the sum of `count` random plane waves of 0.5-3 cycles per image, rescaled."""
    field = np.zeros_like(x)
    for _ in range(count):
        angle, cycles, phase = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 3), rng.uniform(0, 2 * np.pi)
        field += np.sin(2 * np.pi * cycles * (x * np.cos(angle) + y * np.sin(angle)) + phase)
    return (field - field.min()) / (np.ptp(field) + 1e-9)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """HSV in [0, 1] -> RGB in [0, 1] (the hexcone model), elementwise; output `(..., 3)`."""
    k = lambda n: (n + h * 6) % 6  # noqa: E731
    channel = lambda n: v - v * s * np.clip(np.minimum(k(n), 4 - k(n)), 0, 1)  # noqa: E731
    return np.stack([channel(5), channel(3), channel(1)], axis=-1)


def colour_image(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """One synthetic image, `(size, size, 3)` uint8."""
    y, x = np.mgrid[0:size, 0:size] / size
    hue = (rng.uniform() + 0.6 * _waves(rng, y, x)) % 1.0
    saturation = 0.25 + 0.75 * _waves(rng, y, x)
    value = 0.2 + 0.8 * _waves(rng, y, x)
    rgb = _hsv_to_rgb(hue, saturation, value)
    for _ in range(rng.integers(3, 9)):
        colour = _hsv_to_rgb(*(np.array(rng.uniform(lo, 1.0)) for lo in (0.0, 0.5, 0.3)))
        cy, cx, radius = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.04, 0.25)
        if rng.uniform() < 0.5:
            mask = (y - cy) ** 2 + (x - cx) ** 2 < radius**2
        else:
            mask = (np.abs(y - cy) < radius) & (np.abs(x - cx) < radius * rng.uniform(0.3, 2))
        rgb[mask] = colour
    rgb = rgb + rng.normal(0, 0.02, rgb.shape)
    return (rgb.clip(0, 1) * 255).round().astype(np.uint8)


def colour_images(count: int, size: int = 256, seed: int = 0) -> list[ImageBytes]:
    """`count` synthetic colour images as in-memory PNGs (`ImageBytes` named `synthetic-colour-NNN.png`)."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(colour_image(rng, size)).save(buffer, format="PNG")
        images.append(ImageBytes(f"synthetic-colour-{i:03d}.png", buffer.getvalue()))
    return images
