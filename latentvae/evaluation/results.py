"""What an evaluation is asked (settings, models, images) and what it found (per-model results, the protocol in
words): the dataclasses `latentvae.evaluation.evaluate` fills and `latentvae.evaluation.report` renders."""

from __future__ import annotations

import heapq
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from latentvae.data.images import ImageSource, source_name
from latentvae.data.skips import SkipLog
from latentvae.evaluation.latent_stats import LatentStats

METRICS = ("psnr", "ssim", "lpips", "psnr_y", "psnr_c", "colourfulness_ratio", "ciede2000")  # per image


class EvaluationError(ValueError):
    """The evaluation cannot run as asked: no usable images, or models that cannot be told apart."""


@dataclass(frozen=True)
class EvalSettings:
    """How images are prepared and reconstructed, and which metrics run (every field is an `evaluate` flag)."""

    resolution: int | None = 256  # None: native size, padded to the downsampling factor and cropped back
    batch_size: int = 8
    sample_posterior: bool = False  # False: the posterior mode (the published protocol)
    seed: int = 0  # for posterior samples (reconstruction with sample_posterior, and the latent statistics)
    lpips_net: str | None = "alex"  # None: no LPIPS
    fid: bool = True
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    grid_images: int = 4  # worst and best images drawn per model, and rows of the side-by-side grid
    allow_pickle: bool = False
    offline: bool = False  # never download LPIPS / FID weights (as $HF_HUB_OFFLINE=1 does)


@dataclass(frozen=True)
class ModelSpec:
    """One `--model [NAME=]PATH`."""

    name: str
    path: Path


def parse_model_arg(text: str) -> ModelSpec:
    """`NAME=PATH`, or a bare `PATH` named after its folder or file stem (an existing path is never split)."""
    name, sep, path = text.partition("=")
    if sep and name and "/" not in name and not Path(text).exists():
        return ModelSpec(name, Path(path))
    path = Path(text)
    return ModelSpec(path.name if path.is_dir() else path.stem, path)


@dataclass
class EvalData:
    """The images to evaluate on, in a fixed order; `skip_log` collects those that fail to decode."""

    sources: Sequence[ImageSource]
    description: str
    root: Path | None = None  # image names in the outputs are relative to it
    skip_log: SkipLog = field(default_factory=SkipLog)

    def display_name(self, source: ImageSource) -> str:
        name = source_name(source)
        return os.path.relpath(name, self.root) if self.root is not None else name


@dataclass
class MetricNetworks:
    """The networks behind LPIPS and rFID; `skipped` says why a metric is not computed (metric -> reason)."""

    lpips: nn.Module | None = None
    inception: nn.Module | None = None
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass(order=True)
class Example:
    """An image drawn in a grid: its input and one model's reconstruction, uint8 `[H, W, 3]`, ordered by PSNR."""

    psnr: float
    position: int  # index into the evaluated sources, which is the same for every model
    name: str = field(compare=False)
    original: np.ndarray = field(compare=False, repr=False)
    reconstruction: np.ndarray = field(compare=False, repr=False)


@dataclass
class ModelResult:
    """One model's measurements."""

    name: str
    path: str
    downsampling_factor: int
    parameters: dict[str, int]  # encoder, decoder, total
    images: list[str] = field(default_factory=list)
    scores: dict[str, list[float]] = field(default_factory=dict)  # metric -> one value per image
    rfid: float | None = None
    encode_ms: float | None = None
    decode_ms: float | None = None
    peak_mem_mb: float | None = None
    peak_mem_kind: str | None = None
    latent_shape: list[int] | None = None  # (C, h, w) of the first image
    latent_stats: LatentStats | None = None
    config_scaling_factor: float | None = None
    normalization: dict[str, Any] | None = None  # `latentvae.evaluation.normalization.report`
    code_counts: np.ndarray | None = None  # VQ models: how often each code was chosen, over all images
    worst: list[Example] = field(default_factory=list)
    best: list[Example] = field(default_factory=list)
    shared: dict[int, Example] = field(default_factory=dict)  # the side-by-side grid's images, by position
    notes: list[str] = field(default_factory=list)

    def add_scores(self, names: list[str], scores: dict[str, list[float]]) -> None:
        self.images.extend(names)
        for metric, values in scores.items():
            self.scores.setdefault(metric, []).extend(values)

    def add_codes(self, indices: Tensor, codebook_size: int) -> None:
        """Count the codebook indices a VQ model chose for a batch."""
        counts = torch.bincount(indices.flatten().cpu(), minlength=codebook_size).numpy()
        self.code_counts = counts if self.code_counts is None else self.code_counts + counts

    def offer_example(self, example: Example, count: int, shared: bool) -> None:
        """Keep `example` if it is among the `count` worst or best by PSNR so far, or drawn side by side."""
        self.worst = heapq.nsmallest(count, [*self.worst, example])
        self.best = heapq.nlargest(count, [*self.best, example])
        if shared:
            self.shared[example.position] = example

    def summary(self) -> dict[str, Any]:
        """This model's entry in summary.json (None where not computed)."""
        out: dict[str, Any] = {"name": self.name, "path": self.path, "n_images": len(self.images)}
        for metric in METRICS:
            out[metric], out[f"{metric}_std"] = mean_std(self.scores.get(metric))
        out["psnr_infinite"] = sum(math.isinf(v) for v in self.scores["psnr"])
        channels = self.latent_shape[0] if self.latent_shape else None
        stats = self.latent_stats
        out.update(
            rfid=self.rfid,
            rfid_n_images=len(self.images) if self.rfid is not None else None,
            encode_ms=self.encode_ms,
            decode_ms=self.decode_ms,
            peak_mem_mb=self.peak_mem_mb,
            peak_mem_kind=self.peak_mem_kind,
            parameters=self.parameters,
            downsampling_factor=self.downsampling_factor,
            latent_shape=self.latent_shape,
            # values in an image / values in its latent: 3 f^2 / C
            compression_factor=3 * self.downsampling_factor**2 / channels if channels else None,
            latent_mean=stats.mean if stats else None,
            latent_std=stats.std if stats else None,
            latent_channel_mean=stats.channel_mean if stats else None,
            latent_channel_std=stats.channel_std if stats else None,
            suggested_scaling_factor=stats.scaling_factor if stats else None,
            config_scaling_factor=self.config_scaling_factor,
            latent_normalization=self.normalization,
            **self._codebook_summary(),
            notes=self.notes,
        )
        return out

    def _codebook_summary(self) -> dict[str, Any]:
        if self.code_counts is None:
            keys = ("codebook_size", "codes_used", "codebook_usage", "codebook_unused", "codebook_perplexity")
            return dict.fromkeys(keys)
        return codebook_summary(self.code_counts)


def codebook_summary(counts: np.ndarray) -> dict[str, Any]:
    """codebook_size, codes_used, codebook_usage (fraction chosen at least once), codebook_unused (the rest),
    codebook_perplexity (exp of the code histogram's entropy: the number of equally used codes with the same
    spread), from how often each code was chosen."""
    probs = counts[counts > 0] / counts.sum()
    return dict(
        codebook_size=len(counts),
        codes_used=int((counts > 0).sum()),
        codebook_usage=float((counts > 0).mean()),
        codebook_unused=float((counts == 0).mean()),
        codebook_perplexity=float(np.exp(-(probs * np.log(probs)).sum())),  # exp(-sum p log p)
    )


def describe_protocol(
    settings: EvalSettings, data: str, networks: MetricNetworks, memory_kind: str | None
) -> dict[str, str]:
    """The protocol in words, for summary.json and report.md."""
    size = settings.resolution
    seed = settings.seed
    return {
        "data": data,
        "preprocessing": (
            f"RGB uint8; shorter side resized to {size} px (PIL bicubic), center crop {size}x{size}"
            if size is not None
            else "RGB uint8 at native size, reflect-padded at the bottom and right to a multiple of each model's "
            "downsampling factor, reconstructions cropped back"
        ),
        "latents": (f"posterior sample (seed {seed})" if settings.sample_posterior else "posterior mode")
        + " of KL models; nearest codebook vectors of VQ models' encoder output",
        "output": "decoded, clamped to [-1, 1], uint8 = round((x + 1) * 127.5)",
        "psnr": "per image on uint8 RGB, MAX 255; mean and (population) standard deviation over the images with "
        'finite PSNR; identical reconstructions have infinite PSNR, counted in psnr_infinite and written "inf"',
        "colour": "PSNR of Y and of Cb+Cr (ITU-R BT.601 full-range YCbCr, as JPEG) per image; colourfulness ratio = "
        "Hasler-Suesstrunk M(reconstruction) / M(original), NaN (left out) for grey originals; CIEDE2000 = mean "
        "over pixels of scikit-image's deltaE_ciede2000 in CIELAB (D65) (latentvae.evaluation.colour)",
        "ssim": "torchmetrics structural_similarity_index_measure on uint8 RGB: 11x11 Gaussian window, sigma 1.5, "
        "K1 0.01, K2 0.03, data range 255, borders reflect-padded, mean over pixels and channels",
        "lpips": f"LPIPS v0.1 ({settings.lpips_net}) on [-1, 1], lpips package"
        if networks.lpips is not None
        else "not computed",
        "rfid": "Frechet distance of pytorch-fid InceptionV3 pool3 features (2048-d, FID weights "
        "pt_inception-2015-12-05) between the originals and the reconstructions"
        if networks.inception is not None
        else "not computed",
        "timing": f"wall clock per image of encode and of decode, batches of {settings.batch_size}, after an "
        "untimed warm-up pass over the first batch",
        "memory": "the model's weights plus the largest growth in memory during one batch's encode + decode, "
        f"from {memory_kind or 'nothing: not measured on this device'}",
        "latent_stats": f"posterior samples (seed {seed}; a VQ model: its encoder output) of all evaluated images "
        "(latentvae.evaluation.latent_stats); "
        "suggested scaling factor = 1 / std over all latent elements; latent_normalization: the constants each "
        "convention the model can hold would set from them (latentvae.evaluation.normalization), next to those "
        "its config (and a FLUX.2 VAE's bn) holds",
        "codebook": "VQ models: the encoder output is replaced by its nearest codebook vectors before decoding; "
        "usage = fraction of the codebook chosen at least once over all latent positions of all evaluated images, "
        "perplexity = exp(entropy) of that code histogram",
        "device": f"{settings.device}, {str(settings.dtype).removeprefix('torch.')}",
    }


@dataclass
class Evaluation:
    """Everything `evaluate` found: the protocol in words, one result per model, and what was left out."""

    protocol: dict[str, str]
    models: list[ModelResult]
    skipped_images: dict[str, str]  # name -> reason
    skipped_metrics: dict[str, str]  # metric -> reason


def mean_std(values: list[float] | None) -> tuple[float | None, float | None]:
    """Mean and population standard deviation over the finite values; (inf, None) if all are inf (identical
    reconstructions); (None, None) if there are none."""
    if not values:
        return None, None
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return (math.inf if all(v == math.inf for v in values) else None), None
    return float(np.mean(finite)), float(np.std(finite))


def json_safe(value: Any) -> Any:
    """`value` with +inf as `"inf"` and NaN / -inf as None, so that `json.dumps(allow_nan=False)` accepts it."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value == math.inf else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value
