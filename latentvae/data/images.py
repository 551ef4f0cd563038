"""Single images: decoding any of them to 8-bit RGB, and the dataset that turns them into training crops.

Every way a file can fail to decode surfaces as one exception, `BadImageError`, with a short reason
(`"empty"`, `"truncated"`, `"too_large"`, ...). `ImageDataset` replaces such an image by the next good one,
with one warning each, and records it in a `SkipLog`; each sample also carries its own skips, so that with
DataLoader workers (each holding a copy of the log) the training loop still learns of them. Nothing here touches
the network.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.functional import adjust_hue

from latentvae.data.skips import SkipLog

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImageBytes:
    """An encoded image held in memory, e.g. one row of a Hugging Face dataset.

    Args:
        name: What warnings and logs call it (a file name, or `dataset[row]`).
        data: The encoded file (PNG, JPEG, ...).
    """

    name: str
    data: bytes


# Anything `load_rgb` and `probe_image` accept.
ImageSource = str | os.PathLike | ImageBytes


def source_name(source: ImageSource) -> str:
    """The name under which `source` appears in warnings, logs and `BadImageError`."""
    return source.name if isinstance(source, ImageBytes) else os.fspath(source)


class BadImageError(ValueError):
    """An image that cannot be used: missing, unreadable, empty, not an image, too large, truncated or corrupt.

    Attributes:
        name: The file (or `ImageBytes.name`) at fault.
        reason: One of `"missing"`, `"unreadable"`, `"empty"`, `"not_an_image"`, `"too_large"`,
            `"truncated"`, `"corrupt"`, for counting skipped files by kind.
    """

    def __init__(self, name: str, reason: str, detail: str) -> None:
        super().__init__(f"{name}: {reason.replace('_', ' ')} ({detail}); replace or delete this file.")
        self.name = name
        self.reason = reason


def failure_reason(exc: BaseException) -> str:
    """The `BadImageError.reason` for an exception raised while opening or decoding an image (or a shard)."""
    if isinstance(exc, Image.DecompressionBombError):
        return "too_large"
    if isinstance(exc, FileNotFoundError):
        return "missing"
    if isinstance(exc, PermissionError):
        return "unreadable"
    if isinstance(exc, UnidentifiedImageError):
        return "not_an_image"
    # PIL reports a short file as OSError("image file is truncated ...") or "Truncated File Read";
    # tarfile reports a cut-off archive as "unexpected end of data".
    if isinstance(exc, EOFError) or any(word in str(exc).lower() for word in ("truncated", "unexpected end")):
        return "truncated"
    return "corrupt"


@contextmanager
def _as_bad_image(name: str) -> Iterator[None]:
    try:
        yield
    except BadImageError:
        raise
    except Exception as exc:  # decoders of broken files raise almost anything; none of it may stop a run
        raise BadImageError(name, failure_reason(exc), str(exc) or type(exc).__name__) from exc


def _open(source: ImageSource) -> Image.Image:
    """Read the header only, refusing empty files and images over `Image.MAX_IMAGE_PIXELS` before any pixel
    buffer is allocated."""
    name = source_name(source)
    if isinstance(source, ImageBytes):
        size, file = len(source.data), io.BytesIO(source.data)
    else:
        size, file = os.stat(source).st_size, os.fspath(source)
    if size == 0:
        raise BadImageError(name, "empty", "0 bytes")
    with warnings.catch_warnings():
        # PIL only warns between 1x and 2x its limit; the explicit check below makes that an error too.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(file)
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        image.close()
        raise BadImageError(name, "too_large", f"{image.width}x{image.height} exceeds {limit} pixels")
    return image


def probe_image(source: ImageSource) -> tuple[int, int]:
    """Check an image cheaply, without decoding its pixels: the header parses, the size is within
    `Image.MAX_IMAGE_PIXELS`, and `PIL.Image.verify` passes (for PNG it checks every chunk's CRC, so truncated
    and corrupted PNGs are caught; for JPEG it checks little, and `load_rgb` remains the final word).

    Args:
        source: A path or an `ImageBytes`.

    Returns:
        `(width, height)` as stored in the file.

    Raises:
        BadImageError: With the reason the image is unusable.
    """
    with _as_bad_image(source_name(source)), _open(source) as image:
        size = image.size
        image.verify()
    return size


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    # 16-bit and 32-bit integer ("I;16*", "I") and float ("F") single-channel images. PIL's own convert("L")
    # clips them at 255 instead of rescaling, which turns a 16-bit photo white.
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    low, high = (0.0, 1.0) if image.mode == "F" else (0.0, 65535.0)
    if values.size and (values.min() < low or values.max() > high):
        low, high = float(values.min()), float(values.max())  # data outside the nominal range: stretch it
    # [low, high] -> [0, 255]; for 16-bit this is v / 257, so 0 -> 0 and 65535 -> 255 exactly
    scaled = np.round((values - low) * (255.0 / max(high - low, 1e-12)))
    return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        return _high_bit_depth_to_rgb(image)
    if image.has_transparency_data:
        # RGBA, LA, PA, and palette / colour-key transparency: composite on white, as a viewer would show it,
        # rather than exposing whatever colour the invisible pixels happen to store.
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, ...


def load_rgb(source: ImageSource) -> Image.Image:
    """Decode an image to 8-bit RGB as it is meant to be seen.

    Gray and palette images become RGB; transparency (RGBA, LA, palette) is composited on white; CMYK is
    converted to RGB; 16-bit and float images are rescaled to 8 bit, not clipped; the EXIF orientation is
    applied. Only the first frame of multi-frame files (GIF, TIFF, WebP) is used.

    Args:
        source: A path or an `ImageBytes`.

    Returns:
        A fully decoded `PIL.Image.Image` in mode `"RGB"`, independent of the file.

    Raises:
        BadImageError: The file is missing, unreadable, empty, not an image, larger than
            `PIL.Image.MAX_IMAGE_PIXELS` (checked from the header, before decoding), truncated or corrupt.
    """
    with _as_bad_image(source_name(source)), _open(source) as image:
        image.load()  # decode now, while errors are still attributed to this file
        try:
            ImageOps.exif_transpose(image, in_place=True)
        except Exception as exc:  # malformed EXIF beside good pixels: keep the picture as stored
            logger.debug("Ignoring unreadable EXIF orientation of %s: %s", source_name(source), exc)
        return _to_rgb(image)


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Resize with PIL's bicubic filter so that the shorter side is `size`, keeping the aspect ratio.

    Larger images are shrunk with antialiasing (PIL widens the filter by the shrink factor); smaller ones are
    enlarged, so that a `size` crop always fits; an image whose shorter side is already `size` is returned as is.
    """
    width, height = image.size
    if min(width, height) == size:
        return image
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image.resize(new_size, Image.Resampling.BICUBIC)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a float32 tensor of shape (3, H, W) with values in [-1, 1]."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # H x W x 3
    # [0, 255] -> [-1, 1]: x / 127.5 - 1
    return (pixels.permute(2, 0, 1).float() / 127.5 - 1.0).contiguous()


class ImageDataset(torch.utils.data.Dataset):
    """Square crops of images, as tensors in [-1, 1].

    Each image is resized so its shorter side is `resize_to` (default `resolution`; bicubic, antialiased; small
    images are enlarged), then cropped to `resolution` x `resolution`: at a random position and flipped left-right with
    probability 1/2 for training (`center_crop` and `random_flip` change that, as the diffusers training examples'
    flags of the same names do), at the center for validation. Randomness comes from torch's global RNG, so
    `torch.manual_seed`, DataLoader worker seeding and Accelerate's RNG checkpoints all cover it.

    An image that fails to decode is replaced by the next one in order that decodes (wrapping around), so an
    index always gives the same image and batches stay full; the failure is warned about once per process and
    recorded in `skip_log`.

    Args:
        sources: Paths, `ImageBytes`, or an `HFImageColumn` (e.g. `ImageData.train`).
        resolution: Side of the square crops, in pixels.
        resize_to: Shorter side before cropping (>= resolution); larger values train on detail crops rather than
            whole-image thumbnails. Default: `resolution`.
        cache: Keep the decoded, resized images in memory (per process and worker): for small datasets.
        train: Training crops (random position, flipped) or validation crops (center, never flipped).
        center_crop: Training crops at the center too (the diffusers AutoencoderKL example's crops).
        random_flip: Flip training crops left-right with probability 1/2.
        random_hue: Rotate each training crop's hue by a random fraction of the colour circle, uniform in
            [-random_hue, random_hue] (torchvision's `adjust_hue`, as `ColorJitter(hue=...)`; at most 0.5). A small
            or uniform training set then cannot be reconstructed by painting its mean tint over the luma: the
            encoder has to put chroma into the latent. 0 (default): off.
        skip_log: Where decoding failures are recorded (e.g. `ImageData.skip_log`); a new log by default.

    Each item is a dict: `"pixel_values"`, a float32 tensor of shape (3, resolution, resolution) in [-1, 1];
    `"path"`, the name of the image used; `"skipped"`, a tuple of `(name, reason)` for the broken images passed
    over to produce this item (usually empty).
    """

    def __init__(
        self,
        sources: Sequence[ImageSource],
        resolution: int,
        train: bool = True,
        skip_log: SkipLog | None = None,
        resize_to: int | None = None,
        cache: bool = False,
        center_crop: bool = False,
        random_flip: bool = True,
        random_hue: float = 0.0,
    ) -> None:
        if resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels, got {resolution}.")
        if resize_to is not None and resize_to < resolution:
            raise ValueError(f"resize_to ({resize_to}) must be at least the crop resolution ({resolution}).")
        if not 0.0 <= random_hue <= 0.5:
            raise ValueError(
                f"random_hue must be in [0, 0.5] (a fraction of the colour circle), got {random_hue}."
            )
        self.random_hue = random_hue
        self.resize_to = resolution if resize_to is None else resize_to
        # Decoded, resized images by name: for small datasets that fit in memory, decoding dominates a step.
        self.cache: dict[str, Image.Image] | None = {} if cache else None
        self.sources = sources
        self.resolution = resolution
        self.train = train
        self.center_crop, self.random_flip = center_crop, random_flip
        self.skip_log = SkipLog() if skip_log is None else skip_log

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> dict[str, Any]:
        skipped: list[tuple[str, str]] = []
        for offset in range(len(self.sources)):
            source = self.sources[(index + offset) % len(self.sources)]
            name = source_name(source)
            if name in self.skip_log:  # known broken: do not decode or report it again
                continue
            try:
                image = self._resized(source, name)
            except BadImageError as exc:
                self.skip_log.record(exc.name, exc.reason)
                skipped.append((exc.name, exc.reason))
                continue
            return {"pixel_values": self._crop_resized(image), "path": name, "skipped": tuple(skipped)}
        raise RuntimeError(
            f"None of the {len(self.sources)} images can be decoded: {self.skip_log.summary()}."
        )

    def _resized(self, source: ImageSource, name: str) -> Image.Image:
        if self.cache is not None and name in self.cache:
            return self.cache[name]
        image = resize_shorter_side(load_rgb(source), self.resize_to)
        if self.cache is not None:
            self.cache[name] = image
        return image

    def crop(self, image: Image.Image) -> torch.Tensor:
        """Resize, crop (and for training flip) one RGB image; returns (3, resolution, resolution) in [-1, 1]."""
        return self._crop_resized(resize_shorter_side(image, self.resize_to))

    def _crop_resized(self, image: Image.Image) -> torch.Tensor:
        size = self.resolution
        width, height = image.size
        left, top, flip = (width - size) // 2, (height - size) // 2, False
        if self.train and not self.center_crop:
            left = int(torch.randint(0, width - size + 1, ()).item())
            top = int(torch.randint(0, height - size + 1, ()).item())
        if self.train and self.random_flip:
            flip = bool(torch.rand(()) < 0.5)
        image = image.crop((left, top, left + size, top + size))
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.train and self.random_hue > 0:
            image = adjust_hue(image, float((torch.rand(()) * 2 - 1) * self.random_hue))
        return to_tensor(image)


def collate_images(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader `collate_fn` for `ImageDataset`: stacks `"pixel_values"` to (B, 3, R, R), lists `"path"`,
    and joins every sample's `"skipped"` into one list of `(name, reason)`."""
    return {
        "pixel_values": torch.stack([sample["pixel_values"] for sample in samples]),
        "path": [sample["path"] for sample in samples],
        "skipped": [entry for sample in samples for entry in sample["skipped"]],
    }
