"""The preview decoder's distillation: its config (the training script's flags where they apply), the frozen VAE's
targets, the module DDP wraps, and its validation.

    teacher (frozen):  x -> VAE.encode -> q(z|x) -> z = mu + sigma * eps -> VAE.decode(z) = y   (the target image)
                       z_n = normalise(z), mu_n = normalise(mu)                     (latentvae.models.preview)
    student:           tiny.decode(z_n) -> y_hat        L_dec = AutoencoderLoss(y, y_hat): pixel + LPIPS (+ GAN)
                       tiny.encode(x)   -> m_hat        L_enc = encoder_weight * sum_{C,h,w} (m_hat - mu_n)^2 / B

The decoder learns what the VAE's decoder would show for a latent (not the original image: a preview of the
decode, errors included); the encoder learns the posterior mean (a sample's noise would only add variance to its
target). Both losses reach the student through DDP's forward (`PreviewDistillation`), so gradients are averaged
over processes; the teacher runs outside it, in no_grad, the same on every process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch
from diffusers import AutoencoderTiny
from torch import Tensor, nn

from latentvae.data.loaders import DataSettings
from latentvae.evaluation.metrics import psnr, to_uint8
from latentvae.models.preview import TAESD_CHANNELS, last_layer, normalise_latents
from latentvae.training.autoencoding import Autoencoding
from latentvae.training.config import _f, add_config_flags


@dataclass
class PreviewConfig:
    vae: str = _f(None, "The VAE to distil (any path latentvae.load_vae reads).", flag=False)
    preview_channels: str = _f(
        str(TAESD_CHANNELS),
        "Width of the AutoencoderTiny, the same at every level (TAESD: 64); choose it so the preview decodes "
        ">= 10x faster than the VAE (16 for the CPU quickstart VAE).",
    )
    allow_pickle: bool = _f(False, "Allow loading a pickle (.ckpt/.pt/.bin) VAE: only for files you trust.")
    # -- data (as training/train.py) --
    train_data_dir: str | None = _f(
        None, "Folder of training images (searched recursively).", aliases=("--data_dir",)
    )
    dataset_name: str | None = _f(None, "A Hugging Face dataset name or local path (datasets library).")
    image_column: str = _f("image", "Column of --dataset_name that holds the images.")
    val_data_dir: str | None = _f(None, "Folder of held-out images; default: a slice of the training set.")
    train_shards: str | None = _f(None, "WebDataset tar shards to stream instead of a folder.")
    shuffle_buffer: int = _f(1000, "Shards: samples shuffled together.")
    resolution: int = _f(256, "Training crop size in pixels.")
    resize_to: int | None = _f(
        None, "Resize the shorter side to this before cropping (default: --resolution)."
    )
    center_crop: bool = _f(False, "Crop at the center instead of at a random position.")
    random_flip: bool = _f(True, "Flip training crops left-right with probability 1/2.")
    random_hue: float = _f(
        0.0, "Rotate each crop's hue by up to this fraction of the colour circle (0 = off)."
    )
    synthetic_colour_images: int = _f(
        0, "Add this many generated images of every hue to the training images (latentvae.data.synthetic)."
    )
    cache_images: bool = _f(False, "Keep decoded, resized images in memory.")
    max_bad_fraction: float = _f(0.1, "Stop if more than this fraction of the images is broken.")
    dataloader_num_workers: int = _f(2, "Data loader worker processes per training process.")
    # -- optimisation --
    train_batch_size: int = _f(8, "Images per process per step.")
    max_train_steps: int | None = _f(None, "Total optimizer steps; overrides --num_train_epochs when given.")
    num_train_epochs: int = _f(10, "Epochs to train when --max_train_steps is not given.")
    gradient_accumulation_steps: int = _f(1, "Batches accumulated per optimizer step.")
    learning_rate: float = _f(1e-3, "Learning rate (AdamW).")
    lr_scheduler: str = _f(
        "cosine", "Scheduler: constant, constant_with_warmup, linear, cosine, ... (diffusers)."
    )
    lr_warmup_steps: int = _f(20, "Warm-up steps of the learning-rate schedule.")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.99, "Adam beta2.")
    adam_weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_epsilon: float = _f(1e-8, "Adam epsilon.")
    max_grad_norm: float = _f(1.0, "Clip gradient norm to this (0 = no clipping).")
    max_nonfinite_steps: int = _f(10, "Stop after more than this many non-finite steps in a row.")
    mixed_precision: str | None = _f(None, "no, fp16 or bf16; default: what `accelerate config` chose.")
    seed: int = _f(0, "Random seed (init, data order, augmentation, the teacher's posterior noise).")
    ema_decay: float = _f(0.0, "Keep an EMA of the preview's weights with this decay (0 = off); exported.")
    compile: bool = _f(False, "torch.compile the preview model.")
    # -- losses --
    recon_loss: str = _f("mse", "Pixel loss against the VAE's decode: mse or l1.", choices=("mse", "l1"))
    chroma_weight: float = _f(1.0, "Weight of the pixel error's chroma part (as training/train.py).")
    perceptual_weight: float = _f(0.1, "Weight of the LPIPS term against the VAE's decode (0 = off).")
    perceptual_net: str = _f(
        "squeeze", "LPIPS backbone: vgg, alex or squeeze.", choices=("vgg", "alex", "squeeze")
    )
    perceptual_fallback: bool = _f(
        True,
        "If the LPIPS backbone weights are missing and cannot be downloaded, warn loudly and distil without the "
        "perceptual term (not when --perceptual_weight is given).",
    )
    offline: bool = _f(False, "Never download pretrained weights (as HF_HUB_OFFLINE=1).")
    perceptual_random_backbone: bool = _f(False, "Randomly initialised LPIPS backbone: for tests only.")
    encoder_weight: float = _f(1.0, "Weight of the encoder's latent loss (0 = train the decoder only).")
    disc_weight: float = _f(
        0.0, "Weight of the adversarial term (TAESD's; times the adaptive weight; 0 = off)."
    )
    disc_start: int = _f(0, "Step at which the discriminator joins (with --disc_weight > 0).")
    disc_learning_rate: float | None = _f(None, "Discriminator learning rate (default: the preview's).")
    # -- output, logging, checkpoints --
    output_dir: str = _f("outputs/preview", "Where checkpoints, validation grids, logs and the export go.")
    report_to: str = _f("tensorboard", "Tracker: tensorboard, wandb, all or none.")
    tracker_project_name: str = _f("latentvae-preview", "Project name for the tracker.")
    logging_steps: int = _f(10, "Log losses every N steps.")
    validation_steps: int = _f(
        500, "Validate (PSNR against the VAE's decode, image grid) every N steps and at the end."
    )
    num_validation_images: int = _f(16, "Held-out images used for validation.")
    checkpointing_steps: int = _f(500, "Save a resumable checkpoint every N steps.")
    checkpoints_total_limit: int | None = _f(3, "Keep at most this many checkpoints (oldest removed).")
    resume_from_checkpoint: str | None = _f(None, "'latest' or a checkpoint folder to resume from.")
    scaling_factor_images: int = _f(64, "Training images whose latents set latent_magnitude / latent_shift.")
    license: str | None = _f(None, "License written into the model card (a Hub license id).")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def data_settings(self) -> DataSettings:
        """The fields the data layer reads, as its own settings object."""
        return DataSettings(**{f.name: getattr(self, f.name) for f in fields(DataSettings)})


def add_preview_arguments(parser: argparse.ArgumentParser) -> None:
    """The VAE (positional), `--config` (a JSON file of field values) and one flag per `PreviewConfig` field."""
    parser.add_argument("vae", help="the VAE to distil: a diffusers folder, .safetensors or checkpoint")
    parser.add_argument("--config", default=None, help="JSON file of field values (flags given here win).")
    add_config_flags(parser, PreviewConfig)


def preview_config(args: argparse.Namespace) -> tuple[PreviewConfig, set[str]]:
    """Defaults < `--config` JSON < flags, from parsed `add_preview_arguments` arguments; and the names given."""
    values = {}
    if getattr(args, "config", None):
        with open(args.config) as handle:
            values.update(json.load(handle))
    names = {f.name for f in fields(PreviewConfig)}
    explicit = {name for name in vars(args) if name in names and name != "vae"}
    values.update({name: getattr(args, name) for name in explicit}, vae=args.vae)
    if unknown := set(values) - names:
        raise SystemExit(f"unknown config fields {sorted(unknown)} (from --config {args.config})")
    return PreviewConfig(**values), explicit


def parse_preview_config(argv: list[str] | None = None) -> tuple[PreviewConfig, set[str]]:
    parser = argparse.ArgumentParser(
        description="Distil a preview decoder (diffusers.AutoencoderTiny) from a VAE."
    )
    add_preview_arguments(parser)
    return preview_config(parser.parse_args(argv))


@torch.no_grad()
def teacher_targets(
    vae: nn.Module, images: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The frozen VAE on `images`: (z_n, a posterior sample normalised; mu_n, the normalised posterior mean; the
    VAE's decode of the sample, clamped to [-1, 1] as pipelines do)."""
    posterior = vae.encode(images).latent_dist
    z = posterior.sample(generator)
    decoded = vae.decode(z).sample.clamp(-1, 1)
    return normalise_latents(vae.config, z), normalise_latents(vae.config, posterior.mean), decoded


class PreviewDistillation(Autoencoding):
    """`forward(images, generator=None, latents=z_n, latent_means=mu_n) -> (tiny.decode(z_n), L_enc, logs, {})`.

    With `encoder_weight` 0 the encoder is frozen (and not run), so DDP sees no unused trainable parameter.
    """

    def __init__(self, preview: AutoencoderTiny, encoder_weight: float = 1.0):
        super().__init__(preview)
        if encoder_weight < 0:
            raise ValueError(f"encoder_weight must be >= 0, got {encoder_weight}")
        self.encoder_weight = encoder_weight
        if encoder_weight == 0:
            preview.encoder.requires_grad_(False)

    def last_layer(self) -> Tensor:
        return last_layer(self.vae)

    def forward(
        self,
        images: Tensor,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        latent_means: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor], dict]:
        # `generator`: the teacher's posterior noise was drawn before; the student draws nothing.
        preview = self.vae.decode(latents).sample
        if self.encoder_weight == 0:
            zero = torch.zeros((), device=images.device)
            return preview, zero, {"encoder_loss": zero}, {}
        predicted = self.vae.encode(images).latents  # (B, latent_channels, h, w)
        encoder_loss = (predicted.float() - latent_means.float()).square().sum() / images.shape[0]
        return preview, self.encoder_weight * encoder_loss, {"encoder_loss": encoder_loss.detach()}, {}


@torch.no_grad()
def validate_preview(vae: nn.Module, preview: AutoencoderTiny, batches: Iterable[Tensor]) -> dict[str, float]:
    """Mean PSNR (uint8, dB) of the preview's decode against the VAE's decode of the same latent (posterior mean),
    of the preview's own round trip against the input, and the RMSE of its encoder against mu_n."""
    was_training = preview.training
    preview.eval()
    scores: dict[str, list[Tensor]] = {"psnr_vs_vae": [], "psnr_roundtrip": [], "latent_rmse": []}
    for images in batches:
        images = images.to(preview.device)
        mean = vae.encode(images).latent_dist.mean
        full = to_uint8(vae.decode(mean).sample)
        mean_n = normalise_latents(vae.config, mean)
        quick = to_uint8(preview.decode(mean_n).sample)
        encoded = preview.encode(images).latents
        roundtrip = to_uint8(preview.decode(encoded).sample)
        scores["psnr_vs_vae"].append(psnr(full, quick).cpu())
        scores["psnr_roundtrip"].append(psnr(to_uint8(images), roundtrip).cpu())
        scores["latent_rmse"].append((encoded - mean_n).float().square().flatten(1).mean(1).sqrt().cpu())
    preview.train(was_training)
    if not scores["psnr_vs_vae"]:
        raise ValueError("no validation images")
    metrics = {name: float(torch.cat(parts).mean()) for name, parts in scores.items()}
    metrics["num_images"] = sum(len(part) for part in scores["psnr_vs_vae"])
    return metrics
