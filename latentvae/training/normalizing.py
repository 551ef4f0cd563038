"""The latent normalisation at the end of a training run (`--latent_normalization`): which mode, the statistics
measured across processes, and the constants written (`latentvae.evaluation.normalization`).

The mode is chosen, and checked against the model, before training starts: a mode the model cannot hold, or FLUX.2's
batchnorm at a resolution that gives latents of odd size, stops the run at once instead of after it. A decoder-only
fine-tune keeps the constants it was loaded with (its latent space is the loaded one, and so is the diffusion model
trained on it) unless asked: --remeasure_latent_normalization (the family's mode) or --latent_normalization given on
the command line.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Subset

from latentvae.data.images import collate_images
from latentvae.data.loaders import TrainingData
from latentvae.evaluation.latent_stats import LatentStats, measure_latent_stats
from latentvae.evaluation.normalization import (
    apply_normalization,
    check_mode,
    default_mode,
    describe,
    held_constants,
    short,
)
from latentvae.training.config import TrainConfig


def chosen_mode(cfg: TrainConfig, explicit: set[str], vae: nn.Module) -> str | None:
    """The mode the run ends with (auto: the latent family's, `default_mode`), or None where the loaded constants are
    kept (--decoder_only without --remeasure_latent_normalization or an explicit --latent_normalization).

    Raises:
        ValueError: `vae` cannot hold the mode, or batchnorm at a resolution that gives odd latent sides.
    """
    asked = cfg.remeasure_latent_normalization or "latent_normalization" in explicit
    if cfg.decoder_only and not asked:
        return None
    mode = default_mode(vae) if cfg.latent_normalization == "auto" else cfg.latent_normalization
    check_mode(vae, mode)
    side = cfg.resolution // vae.downsampling_factor
    if mode == "batchnorm" and side % 2:
        raise ValueError(
            f"batchnorm normalisation measures 2x2 patches of latents, and --resolution {cfg.resolution} gives "
            f"latents {side} wide: use a multiple of {2 * vae.downsampling_factor}"
        )
    return mode


def measure_statistics(
    accelerator: Accelerator, cfg: TrainConfig, vae: nn.Module, data: TrainingData
) -> LatentStats:
    """Posterior samples of the statistics images (the first --scaling_factor_images training images, center
    crops): each process encodes its contiguous share with its own noise (seed + process index), and the float64
    sums are added across processes, so that every process gets the statistics of the whole set."""
    images = data.statistics_set()
    n, rank, world = len(images), accelerator.process_index, accelerator.num_processes
    share = Subset(images, range(rank * n // world, (rank + 1) * n // world))
    loader = DataLoader(share, batch_size=cfg.train_batch_size, collate_fn=collate_images)
    return measure_latent_stats(
        vae,
        (b["pixel_values"] for b in loader),
        generator=torch.Generator().manual_seed(cfg.seed + rank),
        reduce=lambda sums: accelerator.reduce(sums, "sum"),
    )


def write_normalization(
    vae: nn.Module, mode: str | None, stats: LatentStats, cfg: TrainConfig, processes: int = 1
) -> str:
    """Write `mode`'s constants for `stats` into `vae` (None: keep the loaded ones); returns what was done, in words,
    for the summary, the model card and the export's metadata."""
    if mode is None:
        held = ", ".join(f"{k} {short(v)}" for k, v in held_constants(vae).items() if v is not None)
        return (
            f"kept as loaded ({held or 'none'}): a --decoder_only fine-tune keeps the latent space and the constants "
            f"its diffusion model was trained with (measured now and not written: mean {stats.mean:.5g}, 1 / std "
            f"{stats.scaling_factor:.5g} over {stats.num_images} images; --remeasure_latent_normalization writes them)"
        )
    written = apply_normalization(vae, mode, stats)
    noise = f"seed {cfg.seed}" + (f" + process index, {processes} processes" if processes > 1 else "")
    return (
        f"{describe(mode, written, stats)}, {cfg.resolution} px center crops of training images, {noise}; measured "
        "at the end of training"
    )
