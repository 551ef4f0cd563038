"""`latentvae diagnose`: the latent health, the artefact checks and the diffusion probe of one or more VAEs, on the
same images with the same seeds (`diagnose`); `latentvae.evaluation.diagnostics_report` writes the files.

Images are prepared as `evaluate` prepares them (shorter side resized to the resolution, center crop). The probe
trains on `probe_views` random crops (with random horizontal flips) of the first `probe_images` images and is
measured on center crops of the last `probe_val_images`, which it never sees in training.
"""

from __future__ import annotations

import gc
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from latentvae.data.images import BadImageError, ImageSource, load_rgb, resize_shorter_side
from latentvae.evaluation.artefacts import (
    DRIFT_CYCLES,
    decode_normalised,
    equivariance,
    interpolations,
    prior_samples,
    round_trip_drift,
    tile_size,
    tiling_seams,
)
from latentvae.evaluation.evaluate import (
    _is_vq,
    code_indices,
    downsampling_factor,
    encode,
    iterate_batches,
    prepare_image,
    reconstruct,
)
from latentvae.evaluation.latent_health import LatentHealth, Spectrum, normalise_latents, posterior_parts
from latentvae.evaluation.metrics import psnr
from latentvae.evaluation.probe import ProbeSettings, probe_samples, train_probe
from latentvae.evaluation.results import EvalData, EvaluationError, ModelSpec, codebook_summary, mean_std
from latentvae.files.loading import load_vae


@dataclass(frozen=True)
class DiagnoseSettings:
    """What `diagnose` measures and on how many images (each a `diagnose` flag)."""

    resolution: int = 256
    batch_size: int = 8
    seed: int = 0
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    allow_pickle: bool = False
    drift_images: int = 8
    drift_cycles: tuple[int, ...] = DRIFT_CYCLES
    seam_images: int = 2
    grid_samples: int = 8  # prior samples (and probe samples) drawn
    interpolation_steps: int = 8
    probe: ProbeSettings | None = field(default_factory=ProbeSettings)  # None: no probe
    probe_images: int = 64
    probe_val_images: int = 16
    probe_views: int = 2


@dataclass
class ModelDiagnostics:
    """One model's findings: `numbers` (for diagnostics.json) and `grids` (uint8 `(N, 3, H, W)` rows, drawn)."""

    name: str
    path: str
    numbers: dict[str, Any] = field(default_factory=dict)
    grids: dict[str, Tensor] = field(default_factory=dict)


def _images(sources: Sequence[ImageSource], resolution: int, count: int) -> Tensor:
    """The first `count` decodable images, center-cropped at `resolution`, as uint8-valued `(N, 3, R, R)`."""
    images = []
    for source in sources:
        if len(images) == count:
            break
        try:
            images.append(torch.from_numpy(prepare_image(source, resolution)).permute(2, 0, 1))
        except BadImageError:
            continue
    return torch.stack(images).float() if images else torch.zeros(0, 3, resolution, resolution)


def random_view(source: ImageSource, resolution: int, rng: random.Random) -> np.ndarray:
    """A random `resolution` square crop of the image (shorter side resized to it), flipped left-right with
    probability 1/2: uint8 `[R, R, 3]`."""
    image = resize_shorter_side(load_rgb(source), resolution)
    left, top = rng.randint(0, image.width - resolution), rng.randint(0, image.height - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.array(image)


def probe_split(data: EvalData, settings: DiagnoseSettings) -> tuple[list[ImageSource], list[ImageSource]]:
    """(training sources, held-out sources): the first `probe_images` and the last `probe_val_images`."""
    count = len(data.sources)
    held_out = min(settings.probe_val_images, count // 2)
    train = min(settings.probe_images, count - held_out)
    if held_out < 1 or train < 1:
        raise EvaluationError(f"the diffusion probe needs at least 2 images, {data.description} has {count}")
    return [data.sources[i] for i in range(train)], [data.sources[i] for i in range(count - held_out, count)]


@torch.inference_mode()
def _probe_latents(model: nn.Module, images: Tensor, settings: DiagnoseSettings) -> Tensor:
    """Normalised latents that a latent diffusion model trains on: posterior samples (seeded) of a KL model, the
    encoder output of a VQ model."""
    generator = torch.Generator().manual_seed(settings.seed)
    parts = []
    for batch in images.split(settings.batch_size):
        x = batch.to(model.device, model.dtype) / 127.5 - 1
        parts.append(
            normalise_latents(model, encode(model, x, None if _is_vq(model) else generator)).float().cpu()
        )
    return torch.cat(parts)


def run_probe(model: nn.Module, data: EvalData, settings: DiagnoseSettings) -> tuple[dict[str, Any], Tensor]:
    """Train and measure the probe on this model's latents; (its numbers, decoded probe samples)."""
    train_sources, val_sources = probe_split(data, settings)
    rng = random.Random(settings.seed)  # the same crops for every model
    views = []
    for source in train_sources:
        for _ in range(settings.probe_views):
            try:
                views.append(torch.from_numpy(random_view(source, settings.resolution, rng)).permute(2, 0, 1))
            except BadImageError:
                break
    train = _probe_latents(model, torch.stack(views).float(), settings)
    val = _probe_latents(model, _images(val_sources, settings.resolution, len(val_sources)), settings)
    result, unet = train_probe(train, val, settings.probe, model.device)
    z = probe_samples(
        unet,
        list(train.shape[1:]),
        settings.grid_samples,
        settings.probe.sample_steps,
        torch.Generator().manual_seed(settings.seed),
    )
    from_probe = decode_normalised(model, z)
    numbers = result.summary()
    numbers["train_images"], numbers["val_images"] = len(train_sources), len(val_sources)
    return numbers, from_probe


def diagnose_model(
    spec: ModelSpec, data: EvalData, settings: DiagnoseSettings, progress: bool = True
) -> ModelDiagnostics:
    """Every diagnostic of one model (see the modules `latent_health`, `artefacts`, `probe`)."""
    device = torch.device(settings.device)
    model = load_vae(spec.path, allow_pickle=settings.allow_pickle, device=device, dtype=settings.dtype)
    out = ModelDiagnostics(spec.name, str(spec.path))
    with torch.inference_mode():
        out.numbers = _latent_space(model, data, settings, progress)
        out.numbers.update(_artefacts(model, data, settings, out.numbers["latent_shape"], out.grids))
    out.numbers["probe"] = None
    if settings.probe is not None:
        out.numbers["probe"], out.grids["probe_samples"] = run_probe(model, data, settings)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _latent_space(
    model: nn.Module, data: EvalData, settings: DiagnoseSettings, progress: bool
) -> dict[str, Any]:
    """One pass over the images: latent health, spectra, codebook use, mode / sample PSNR, equivariance."""
    kind = "vq" if _is_vq(model) else "kl"
    health, latent_spectrum, image_spectrum = LatentHealth(), Spectrum(), Spectrum()
    scores: dict[str, list[float]] = {}
    counts = None
    generator = torch.Generator().manual_seed(settings.seed)
    bar = tqdm(total=len(data.sources), desc="latent space", unit="img", disable=not progress)
    for batch in iterate_batches(data, settings.resolution, settings.batch_size):
        real = batch.images.to(model.device, torch.float32)
        x = real.to(model.dtype) / 127.5 - 1
        mean, logvar = posterior_parts(model, x)
        health.add(model, mean, logvar)
        latent_spectrum.add(normalise_latents(model, mean))
        image_spectrum.add(x)
        scores.setdefault("psnr_mode", []).extend(psnr(real, reconstruct(model, real)[0]).tolist())
        if kind == "kl":
            sampled = reconstruct(model, real, generator)[0]
            scores.setdefault("psnr_sample", []).extend(psnr(real, sampled).tolist())
        else:
            batch_counts = torch.bincount(
                code_indices(model, mean).cpu(), minlength=model.config.num_vq_embeddings
            )
            counts = batch_counts if counts is None else counts + batch_counts
        for name, values in equivariance(model, real).items():
            scores.setdefault(name, []).extend(values)
        bar.update(batch.positions[-1] + 1 - bar.n)
    bar.close()
    if health.images == 0:
        raise EvaluationError(
            f"none of the {len(data.sources)} images could be decoded: {data.skip_log.summary()}"
        )
    means = {name: mean_std(values)[0] for name, values in scores.items()}
    return {
        "kind": kind,
        "latent_shape": list(health.shape),
        "downsampling_factor": downsampling_factor(model),
        "health": health.summary(),
        "codebook": codebook_summary(counts.numpy()) if counts is not None else None,
        "reconstruction": {name: means.pop(name) for name in ("psnr_mode", "psnr_sample") if name in means},
        "equivariance": means,
        "spectra": {"latent": latent_spectrum.summary(), "image": image_spectrum.summary()},
    }


def _artefacts(
    model: nn.Module,
    data: EvalData,
    settings: DiagnoseSettings,
    latent_shape: list[int],
    grids: dict[str, Tensor],
) -> dict[str, Any]:
    """Round-trip drift, tiling seams; prior samples and interpolations into `grids`."""
    first = _images(data.sources, settings.resolution, max(settings.drift_images, 2))
    drift = round_trip_drift(model, first[: settings.drift_images], settings.drift_cycles)
    numbers: dict[str, Any] = {
        "drift": {
            str(k): {name: mean_std(v)[0] for name, v in scores.items()} for k, scores in drift.items()
        },
        "seams": None,
        "notes": [],
    }
    size = tile_size(model)
    if size is None:
        numbers["notes"].append(f"no tiling seam score: a {type(model).__name__} has no tiled decoding")
    else:
        seams = tiling_seams(model, _images(data.sources, 2 * size, settings.seam_images))
        worst = int(np.argmin(seams["worst_band_psnr"]))
        numbers["seams"] = {
            "tile_size": size,
            "image_size": 2 * size,
            "images": len(seams["psnr"]),
            "psnr": mean_std(seams["psnr"])[0],
            "worst_band_psnr": seams["worst_band_psnr"][worst],
            "worst_band": f"image {worst}, {seams['worst_band'][worst]}",
        }
    grids["prior"] = prior_samples(
        model, latent_shape, settings.grid_samples, torch.Generator().manual_seed(settings.seed)
    )
    if len(first) >= 2:
        paths = interpolations(model, first[:2], settings.interpolation_steps)
        grids.update({f"interpolation_{name}": images for name, images in paths.items()})
    return numbers


def describe(settings: DiagnoseSettings, data: EvalData) -> dict[str, Any]:
    """The settings and the data in words and numbers, for diagnostics.json and diagnostics.md."""
    described = asdict(settings)
    described["dtype"] = str(settings.dtype).removeprefix("torch.")
    described["data"] = data.description
    return described


def diagnose(
    specs: Sequence[ModelSpec], data: EvalData, settings: DiagnoseSettings, progress: bool = True
) -> list[ModelDiagnostics]:
    """`diagnose_model` for each model, on the same images with the same seeds; names must differ."""
    names = [spec.name for spec in specs]
    if not specs or len(set(names)) != len(names):
        raise EvaluationError(
            f"need one or more models with distinct names, got {names}; name them NAME=PATH"
        )
    return [diagnose_model(spec, data, settings, progress) for spec in specs]
