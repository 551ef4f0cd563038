"""Reconstruction quality of one or more VAEs by the published protocol, side by side (`latentvae evaluate`).

Protocol: image -> RGB uint8 -> resize the shorter side to R (PIL bicubic) and center-crop RxR, or native size
reflect-padded to a multiple of the downsampling factor -> [-1, 1] -> posterior mode (or a seeded sample) of a KL
model, or a VQ model's encoder output, which its decode replaces by the nearest codebook vectors -> decode -> crop
back -> clamp -> uint8 round((x + 1) * 127.5). For a VQ model the codes chosen over all images give the codebook
usage (fraction of codes chosen at least once) and the perplexity of the code histogram. PSNR and SSIM on uint8
(`latentvae.evaluation.metrics`), LPIPS v0.1 on [-1, 1], rFID from pytorch-fid's Inception features of the originals and the
reconstructions.
`evaluate` measures; `latentvae.evaluation.report.write_outputs` writes summary.json, per_image.csv, report.md and grids.

(One concept over about 400 lines: the protocol from images to results, in reading order.)
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from latentvae.data.images import (
    BadImageError,
    ImageSource,
    load_rgb,
    resize_shorter_side,
    source_name,
)
from latentvae.data.sources import HFImageColumn, find_images, load_hf_images
from latentvae.evaluation.colour import colour_scores
from latentvae.evaluation.latent_stats import LatentStats, measure_latent_stats
from latentvae.evaluation.metrics import (
    build_fid_inception,
    frechet_distance,
    inception_features,
    psnr,
    ssim,
    to_uint8,
)
from latentvae.evaluation.normalization import report as normalization_report
from latentvae.evaluation.profiling import PeakMemory, StageTimer
from latentvae.evaluation.results import (
    EvalData,
    EvalSettings,
    Evaluation,
    EvaluationError,
    Example,
    MetricNetworks,
    ModelResult,
    ModelSpec,
    describe_protocol,
)
from latentvae.files.loading import load_vae
from latentvae.models.autoencoder_kl import AutoencoderKL
from latentvae.models.base import parameter_counts
from latentvae.models.vq_model import VQModel
from latentvae.pretrained import MissingWeightsError, build_lpips


def prepare_image(source: ImageSource, resolution: int | None) -> np.ndarray:
    """Read an image as RGB uint8 `[H, W, 3]`; with `resolution`, resize its shorter side to it (PIL bicubic) and
    center-crop a square, as the evaluation protocol does."""
    image = load_rgb(source)
    if resolution is not None:
        image = resize_shorter_side(image, resolution)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    return np.array(image)  # a writable copy, as torch.from_numpy wants


def pad_to_multiple(x: Tensor, factor: int) -> Tensor:
    """Reflect-pad `(B, C, H, W)` at the bottom and right so H and W are multiples of `factor`, as numpy's "reflect"
    does: the edge pixel is not repeated, a side shorter than its padding is reflected again, one of 1 repeated."""
    for dim, slot in ((-2, 3), (-1, 1)):  # F.pad takes (left, right, top, bottom)
        while missing := -x.shape[dim] % factor:
            side = x.shape[dim]
            pad = [0, 0, 0, 0]
            pad[slot] = (
                min(missing, side - 1) if side > 1 else missing
            )  # torch reflects less than a side at once
            x = F.pad(x, pad, mode="reflect" if side > 1 else "replicate")
    return x


# ----- the model, by kind: KL (Gaussian posterior) or VQ (codebook) -----


def _is_kl(model: nn.Module) -> bool:
    return isinstance(model, (AutoencoderKL, diffusers.AutoencoderKL))


def _is_vq(model: nn.Module) -> bool:
    return isinstance(model, (VQModel, diffusers.VQModel))


def _unsupported(model: nn.Module) -> TypeError:
    return TypeError(f"cannot evaluate a {type(model).__name__}: only KL and VQ autoencoders are supported")


def encode(model: nn.Module, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The latents `decode` turns back into images: a KL model's posterior mode, or a sample drawn with
    `generator`; a VQ model's encoder output before quantisation (deterministic, `generator` is not used)."""
    if _is_kl(model):
        posterior = model.encode(x).latent_dist
        return posterior.mode() if generator is None else posterior.sample(generator=generator)
    if _is_vq(model):
        return model.encode(x).latents
    raise _unsupported(model)


def decode(model: nn.Module, latents: Tensor) -> Tensor:
    """Images in (about) [-1, 1] from `encode`'s latents; a VQ model quantises them first."""
    if _is_kl(model) or _is_vq(model):
        return model.decode(latents).sample
    raise _unsupported(model)


def code_indices(model: nn.Module, latents: Tensor) -> Tensor:
    """The codebook indices a VQ model's `decode` picks for `encode`'s latents, flattened."""
    return model.quantize(latents)[2][2].flatten()


def downsampling_factor(model: nn.Module) -> int:
    """Pixels per latent position along a side: 2^(levels - 1), as pipelines compute `vae_scale_factor`."""
    return 2 ** (len(model.config.block_out_channels) - 1)


def _model_input(model: nn.Module, images: Tensor) -> Tensor:
    """uint8-valued `(B, 3, H, W)` -> [-1, 1] float32 on the model's device, reflect-padded to its factor."""
    return pad_to_multiple(images.to(model.device, torch.float32) / 127.5 - 1, downsampling_factor(model))


@torch.inference_mode()
def reconstruct(
    model: nn.Module,
    images: Tensor,
    generator: torch.Generator | None = None,
    stage: Callable[[str], AbstractContextManager] | None = None,
) -> tuple[Tensor, Tensor]:
    """Encode and decode images of any size by the protocol.

    Args:
        model: a KL or VQ autoencoder (ours or diffusers').
        images: uint8-valued RGB `(B, 3, H, W)`, any dtype, on any device.
        generator: draw a posterior sample with it instead of taking the mode.
        stage: gives a context manager per stage (`"encode"`, `"decode"`), e.g. a `StageTimer`.

    Returns:
        `(reconstructions, latents)`: uint8-valued float32 `(B, 3, H, W)` on the model's device (reflect-padded to
        a multiple of the downsampling factor before encoding, cropped back after decoding), and the latents.
    """
    stage = stage or (lambda name: nullcontext())
    height, width = images.shape[-2:]
    x = _model_input(model, images).to(model.dtype)
    with stage("encode"):
        latents = encode(model, x, generator)
    with stage("decode"):
        decoded = decode(model, latents)
    return to_uint8(decoded[..., :height, :width]), latents


# ----- metric networks and data -----


@torch.inference_mode()
def reconstruct_image(model: nn.Module, image: np.ndarray) -> np.ndarray:
    """Encode to the posterior mode and decode; uint8 `[H, W, 3]` in and out, any size.

    The image is reflection-padded at the bottom/right to a multiple of the downsampling factor and the
    reconstruction is cropped back, so the output has the input's size.
    """
    restored, _ = reconstruct(model, torch.from_numpy(image).permute(2, 0, 1)[None])  # HWC -> [1, 3, H, W]
    return restored[0].to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def build_metric_networks(settings: EvalSettings) -> MetricNetworks:
    """LPIPS and FID Inception from the torch hub cache (downloaded there when missing, unless offline); a file that
    is missing offline or fails to download leaves that metric out, with the error (which names the file and the
    folder it belongs in) as the reason."""
    networks = MetricNetworks()
    if settings.lpips_net is None:
        networks.skipped["lpips"] = "turned off with --no_lpips"
    else:
        try:
            lpips_net = build_lpips(
                settings.lpips_net, offline=settings.offline, alternative="evaluate with --no_lpips"
            )
            networks.lpips = lpips_net.to(settings.device)
        except MissingWeightsError as err:
            networks.skipped["lpips"] = str(err)
    if not settings.fid:
        networks.skipped["rfid"] = "turned off with --no_fid"
    else:
        try:
            networks.inception = build_fid_inception(offline=settings.offline).to(settings.device)
        except MissingWeightsError as err:
            networks.skipped["rfid"] = str(err)
    for metric, reason in networks.skipped.items():
        print(f"{metric} not computed: {reason}", file=sys.stderr)
    return networks


# ----- the images -----


def open_data(
    data_dir: str | Path | None,
    dataset_name: str | None,
    image_column: str = "image",
    split: str = "train",
    max_images: int | None = None,
) -> EvalData:
    """The images of a folder (`find_images`) or a Hugging Face dataset column (`load_hf_images`), in order.

    Raises:
        `EvaluationError`: neither or both sources given, or no image file in it.
    """
    if (data_dir is None) == (dataset_name is None):
        raise EvaluationError(
            "give the images to evaluate on with --data_dir DIR or --dataset_name NAME (exactly one of them)"
        )
    try:
        if dataset_name is not None:
            sources = load_hf_images(dataset_name, image_column, split)
            where, root = (
                f"Hugging Face dataset {dataset_name!r} (split {split!r}, column {image_column!r})",
                None,
            )
        else:
            sources, where, root = find_images(data_dir), f"folder {data_dir}", Path(data_dir)
    except ValueError as err:  # no such folder, split or column: the message says which
        raise EvaluationError(str(err)) from err
    if len(sources) == 0:
        raise EvaluationError(f"no image files in {where}")
    if max_images is not None and max_images < len(sources):
        indices = range(max_images)
        sources = sources.select(indices) if isinstance(sources, HFImageColumn) else sources[:max_images]
        where += f", its first {max_images} image files"
    return EvalData(sources, where, root)


@dataclass
class Batch:
    positions: list[int]  # indices into EvalData.sources
    names: list[str]
    images: Tensor  # uint8 (B, 3, H, W)


def iterate_batches(data: EvalData, resolution: int | None, batch_size: int) -> Iterator[Batch]:
    """The decodable images in order, batched; images of another size than the batch's start a new batch.
    Images that fail to decode are recorded in `data.skip_log` (and not tried again in later passes)."""
    pending: list[tuple[int, str, np.ndarray]] = []
    for position, source in enumerate(data.sources):
        if source_name(source) in data.skip_log:
            continue
        try:
            image = prepare_image(source, resolution)
        except BadImageError as err:
            data.skip_log.record(err.name, err.reason)
            continue
        if pending and (len(pending) == batch_size or image.shape != pending[0][2].shape):
            yield _stack(pending)
            pending = []
        pending.append((position, data.display_name(source), image))
    if pending:
        yield _stack(pending)


def _stack(items: list[tuple[int, str, np.ndarray]]) -> Batch:
    images = torch.from_numpy(np.stack([image for _, _, image in items])).permute(0, 3, 1, 2)  # BHWC -> BCHW
    return Batch([position for position, _, _ in items], [name for _, name, _ in items], images)


# ----- measuring -----


@torch.inference_mode()
def evaluate_model(
    spec: ModelSpec,
    data: EvalData,
    settings: EvalSettings,
    networks: MetricNetworks,
    reference_features: list[Tensor],
    progress: bool = True,
) -> ModelResult:
    """Reconstruct every image with one model and measure it.

    Args:
        spec: the model's name and file.
        data: the images (the same for every model).
        settings: the protocol.
        networks: LPIPS / Inception, or None where not computed.
        reference_features: Inception features of the originals; filled by the first model's pass when empty.
        progress: show a progress bar.

    Returns:
        `ModelResult` with per-image scores, rFID, speed, memory, latent statistics and grid examples.
    """
    device = torch.device(settings.device)
    model = load_vae(spec.path, allow_pickle=settings.allow_pickle, device=device, dtype=settings.dtype)
    tensors = [*model.parameters(), *model.buffers()]
    memory = PeakMemory(device, weight_bytes=sum(t.numel() * t.element_size() for t in tensors))
    timer = StageTimer(device)
    generator = torch.Generator().manual_seed(settings.seed) if settings.sample_posterior else None
    result = ModelResult(spec.name, str(spec.path), downsampling_factor(model), parameter_counts(model))
    result.config_scaling_factor = getattr(model.config, "scaling_factor", None)
    if settings.sample_posterior and _is_vq(model):
        note = (
            "--sample_posterior does not apply: a VQ model's latent is deterministic (its quantised encoding)"
        )
        result.notes.append(note)
        print(f"{spec.name}: {note}", file=sys.stderr)
    shared = set(np.linspace(0, len(data.sources) - 1, settings.grid_images).round().astype(int).tolist())
    fill_reference = not reference_features
    features: list[Tensor] = []
    bar = tqdm(total=len(data.sources), desc=spec.name, unit="img", disable=not progress)
    for batch in iterate_batches(data, settings.resolution, settings.batch_size):
        if (
            not timer.batches
        ):  # warm-up, neither timed nor measured: kernels chosen, caches filled for this shape
            reconstruct(model, batch.images)
        timer.start_batch(len(batch.names))
        with memory.track():
            recon, latents = reconstruct(model, batch.images, generator, timer)
        result.latent_shape = result.latent_shape or list(latents.shape[1:])
        if _is_vq(model):
            result.add_codes(code_indices(model, latents), model.config.num_vq_embeddings)
        real = batch.images.to(device, torch.float32)
        scores = _score(real, recon, networks)
        result.add_scores(batch.names, scores)
        if networks.inception is not None:
            features.append(inception_features(networks.inception, recon))
            if fill_reference:
                reference_features.append(inception_features(networks.inception, real))
        for i, position in enumerate(batch.positions):
            example = Example(scores["psnr"][i], position, batch.names[i], _hwc(real[i]), _hwc(recon[i]))
            result.offer_example(example, settings.grid_images, shared=position in shared)
        bar.update(batch.positions[-1] + 1 - bar.n)  # skipped images count as done
    bar.update(bar.total - bar.n)
    bar.close()
    if not result.images:
        raise EvaluationError(
            f"none of the {len(data.sources)} images could be decoded: {data.skip_log.summary()}"
        )
    result.encode_ms, result.decode_ms = timer.ms_per_image("encode"), timer.ms_per_image("decode")
    result.peak_mem_mb, result.peak_mem_kind = memory.peak_mb, memory.kind
    if networks.inception is not None:
        try:
            result.rfid = frechet_distance(torch.cat(reference_features), torch.cat(features))
        except ValueError as err:
            result.notes.append(f"rFID not computed: {err}")
    result.latent_stats = _latent_stats(model, data, settings, progress)
    result.normalization = normalization_report(model, result.latent_stats)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _score(real: Tensor, recon: Tensor, networks: MetricNetworks) -> dict[str, list[float]]:
    """Per-image PSNR, SSIM, the colour scores (and LPIPS) of uint8-valued batches."""
    scores = {"psnr": psnr(real, recon), "ssim": ssim(real, recon), **colour_scores(real, recon)}
    if networks.lpips is not None:  # LPIPS takes [-1, 1]
        scores["lpips"] = networks.lpips(real / 127.5 - 1, recon / 127.5 - 1).flatten()
    return {metric: values.tolist() for metric, values in scores.items()}


def _latent_stats(model: nn.Module, data: EvalData, settings: EvalSettings, progress: bool) -> LatentStats:
    # A second encoder pass with posterior samples, measured exactly as training measures the scaling factor.
    batches = iterate_batches(data, settings.resolution, settings.batch_size)
    inputs = (_model_input(model, batch.images) for batch in batches)
    inputs = tqdm(inputs, desc="latent statistics", unit="batch", leave=False, disable=not progress)
    return measure_latent_stats(model, inputs, generator=torch.Generator().manual_seed(settings.seed))


def _hwc(image: Tensor) -> np.ndarray:
    return image.to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def evaluate(
    specs: Sequence[ModelSpec],
    data: EvalData,
    settings: EvalSettings,
    networks: MetricNetworks | None = None,
    progress: bool = True,
) -> Evaluation:
    """Evaluate several models on the same images by the same protocol.

    Args:
        specs: the models; their names must differ.
        data: the images.
        settings: the protocol.
        networks: LPIPS / Inception networks (default: `build_metric_networks(settings)`).
        progress: a progress bar per model.

    Returns:
        `Evaluation`, for `latentvae.evaluation.report.write_outputs`.
    """
    names = [spec.name for spec in specs]
    if not specs or len(set(names)) != len(names):
        raise EvaluationError(
            f"need one or more models with distinct names, got {names}; name them NAME=PATH"
        )
    networks = networks if networks is not None else build_metric_networks(settings)
    reference: list[Tensor] = []
    results = [evaluate_model(spec, data, settings, networks, reference, progress) for spec in specs]
    protocol = describe_protocol(settings, data.description, networks, results[0].peak_mem_kind)
    return Evaluation(protocol, results, dict(data.skip_log.reasons), dict(networks.skipped))
