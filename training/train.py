"""Train an SD-style KL autoencoder with Accelerate.

    accelerate launch training/train.py --preset quickstart          # minutes on a CPU, no data or network needed
    accelerate launch training/train.py --train_data_dir DIR         # the SD kl-f8 recipe from scratch
    accelerate launch training/train.py --pretrained_model_name_or_path vae.safetensors --decoder_only ...

Reads top to bottom: setup, data, model and EMA, losses and optimizers, `accelerator.prepare`, resume, loop
(one `TrainStep` per batch: autoencoder step, discriminator step; then EMA, logging, validation, checkpoints), then
the latent scaling factor and the export to `output_dir/final/`. The step itself is `latentvae.training_step`; the
randomness that makes a resumed run exact is `latentvae.seeding`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from latentvae import AutoencoderKL
from latentvae.checkpointing import (
    finalize_checkpoint,
    prune_checkpoints,
    read_training_state,
    resolve_resume_path,
    staging_dir,
)
from latentvae.data import load_image_data
from latentvae.discriminator import NLayerDiscriminator
from latentvae.export import export_vae
from latentvae.images import ImageDataset, collate_images
from latentvae.latent_stats import measure_latent_stats
from latentvae.loading import load_vae
from latentvae.losses import AutoencoderLoss
from latentvae.pretrained import MissingWeightsError, build_lpips
from latentvae.seeding import EpochSeededDataset, derived_generator
from latentvae.training_config import TrainConfig, parse_config
from latentvae.training_step import Reconstruction, TrainStep
from latentvae.validation import save_grid, validate

logger = get_logger("latentvae.train", log_level="INFO")


def build_vae(cfg: TrainConfig) -> AutoencoderKL:
    if cfg.pretrained_model_name_or_path:
        vae = load_vae(cfg.pretrained_model_name_or_path, allow_pickle=cfg.allow_pickle)
    else:
        vae = AutoencoderKL.from_preset(cfg.model_preset)
    vae = vae.float()  # trainable weights stay fp32; autocast handles mixed precision
    if cfg.decoder_only:
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
    if cfg.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    if cfg.channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    return vae.train()


def build_perceptual(cfg: TrainConfig, explicit: set[str]) -> nn.Module | None:
    """LPIPS for the loss; offline without backbone weights: an error, or (quickstart) a loud warning and none."""
    if cfg.perceptual_weight <= 0:
        return None
    try:
        return build_lpips(
            cfg.perceptual_net,
            random_backbone=cfg.perceptual_random_backbone,
            alternative="train without the perceptual term: --perceptual_weight 0",
        )
    except MissingWeightsError as err:
        if not cfg.perceptual_fallback or "perceptual_weight" in explicit:
            raise
        banner = "!" * 100
        logger.warning(
            f"\n{banner}\nTRAINING WITHOUT THE PERCEPTUAL (LPIPS) LOSS: {err}\n"
            f"Reconstructions will be blurrier than with LPIPS. Put the file in place to use it.\n{banner}",
            main_process_only=True,
        )
        cfg.perceptual_weight = 0.0  # recorded in checkpoints and the tracker as what actually ran
        return None


def has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def lr_for(cfg: TrainConfig, accelerator: Accelerator) -> float:
    if not cfg.scale_lr:
        return cfg.learning_rate
    # latent-diffusion: base lr per image, times the number of images per optimizer step
    return (
        cfg.learning_rate * cfg.train_batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
    )


def save_checkpoint(
    accelerator: Accelerator, cfg: TrainConfig, vae: AutoencoderKL, step: int, epoch: int
) -> None:
    """Every process writes its part (RNG state) into a staging folder; the main process renames it when complete."""
    staging = staging_dir(cfg.output_dir, step)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash: start clean, no stale files from it
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        vae.save_config(staging)  # so load_vae can read the checkpoint's weights (model.safetensors) directly
        final = finalize_checkpoint(staging, step, {"epoch": epoch, "config": cfg.to_dict()})
        removed = prune_checkpoints(cfg.output_dir, cfg.checkpoints_total_limit)
        logger.info(f"saved {final}" + (f"; removed {', '.join(p.name for p in removed)}" if removed else ""))
    accelerator.wait_for_everyone()


def run_validation(accelerator, cfg, vae, ema, val_set, perceptual, step) -> dict[str, float]:
    """PSNR / SSIM (/ LPIPS) and a grid on the validation images, with EMA weights when EMA is on (main process)."""
    metrics: dict[str, float] = {}
    if accelerator.is_main_process:
        if ema is not None:
            ema.store(vae.parameters())
            ema.copy_to(vae.parameters())
        loader = DataLoader(val_set, batch_size=cfg.train_batch_size, collate_fn=collate_images)
        with accelerator.autocast():
            metrics, grid = validate(vae, (b["pixel_values"] for b in loader), perceptual)
        if ema is not None:
            ema.restore(vae.parameters())
        path = save_grid(grid, Path(cfg.output_dir) / "validation" / f"step-{step:07d}.png")
        accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("val/input|reconstruction|error", grid, step)
        logger.info(
            f"step {step}: val PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f} ({path})",
            main_process_only=True,
        )
    accelerator.wait_for_everyone()
    return metrics


def main(cfg: TrainConfig, explicit: set[str] = frozenset()) -> Path:
    """Train, export to `output_dir/final/` and return that folder."""
    # -- setup --------------------------------------------------------------------------------------------------
    output_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        # The shuffling order is a function of (seed, epoch), so a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        dynamo_backend="inductor" if cfg.compile else None,
        # Several processes on a machine without GPUs: Accelerate runs each alone unless told to use the CPU
        # (then it sets up gloo DDP), so `accelerate launch --multi_gpu --num_processes 2` works there too.
        cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator(),
    )
    # Identical initial weights on every process. Crops and posterior noise do not use this global RNG: they
    # are seeded by position (latentvae.seeding), which is what makes a resumed run exact.
    set_seed(cfg.seed)
    started = time.time()

    # -- data, and the perceptual loss (both fail here, before any model is built) -------------------------------
    with accelerator.main_process_first():
        data = load_image_data(
            train_data_dir=cfg.train_data_dir,
            dataset_name=cfg.dataset_name,
            image_column=cfg.image_column,
            val_data_dir=cfg.val_data_dir,
            seed=cfg.seed,
        )
    logger.info(data.description, main_process_only=True)
    logger.info(f"validation images: {', '.join(data.val_names)}", main_process_only=True)
    crops = dict(resize_to=cfg.resize_to, cache=cfg.cache_images)
    train_set = EpochSeededDataset(
        ImageDataset(data.train, cfg.resolution, train=True, skip_log=data.skip_log, **crops), cfg.seed
    )
    val_images = ImageDataset(data.val, cfg.resolution, train=False, **crops)
    val_set = Subset(val_images, range(min(cfg.num_validation_images, len(val_images))))
    images_per_step = cfg.train_batch_size * accelerator.num_processes
    if len(train_set) < images_per_step:
        raise ValueError(
            f"{len(train_set)} training images cannot fill one step of {cfg.train_batch_size} images x "
            f"{accelerator.num_processes} processes; lower --train_batch_size or add images"
        )
    train_loader = DataLoader(
        train_set,
        batch_size=cfg.train_batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.dataloader_num_workers,
        collate_fn=collate_images,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.dataloader_num_workers > 0,
    )
    train_loader = accelerator.prepare(train_loader)  # this process's shard
    perceptual = build_perceptual(cfg, explicit)

    # -- model, EMA, losses, optimizers -------------------------------------------------------------------------
    vae = build_vae(cfg)
    model = Reconstruction(vae)
    ema = EMAModel(vae.parameters(), decay=cfg.ema_decay, foreach=True) if cfg.ema_decay > 0 else None
    loss_fn = AutoencoderLoss(
        perceptual_loss=perceptual,
        perceptual_weight=cfg.perceptual_weight,
        recon_loss=cfg.recon_loss,
        kl_weight=cfg.kl_weight,
        learn_logvar=cfg.learn_logvar,
        disc_weight=cfg.disc_weight,
        disc_start=cfg.disc_start,
    ).to(accelerator.device)
    use_gan = cfg.disc_weight > 0
    discriminator = NLayerDiscriminator() if use_gan else None

    lr = lr_for(cfg, accelerator)
    adam = dict(
        betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon
    )
    ae_params = [p for p in vae.parameters() if p.requires_grad] + loss_fn.autoencoder_parameters()
    opt_ae = torch.optim.AdamW(ae_params, lr=lr, **adam)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    max_steps = (
        cfg.max_train_steps if cfg.max_train_steps is not None else cfg.num_train_epochs * steps_per_epoch
    )
    num_epochs = math.ceil(max_steps / steps_per_epoch)

    def schedule(optimizer):
        # Accelerate steps a prepared scheduler once per process, hence the factor (as in the diffusers examples).
        return get_scheduler(
            cfg.lr_scheduler,
            optimizer,
            num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=max_steps * accelerator.num_processes,
        )

    sched_ae = schedule(opt_ae)
    model, opt_ae, sched_ae = accelerator.prepare(model, opt_ae, sched_ae)
    opt_d = sched_d = None
    if use_gan:
        opt_d = torch.optim.AdamW(discriminator.parameters(), lr=cfg.disc_learning_rate or lr, **adam)
        sched_d = schedule(opt_d)
        discriminator, opt_d, sched_d = accelerator.prepare(discriminator, opt_d, sched_d)
    train_step = TrainStep(
        accelerator, model, loss_fn, opt_ae, sched_ae, cfg.max_grad_norm, discriminator, opt_d, sched_d
    )
    accelerator.register_for_checkpointing(loss_fn)  # the learned logvar
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    if accelerator.is_main_process:
        scalars = {k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(cfg.tracker_project_name, config=scalars)

    # -- resume ---------------------------------------------------------------------------------------------------
    global_step, first_epoch, skip_batches = 0, 0, 0
    if cfg.resume_from_checkpoint:
        path = resolve_resume_path(cfg.resume_from_checkpoint, output_dir)
        if path is None:
            logger.info(f"no checkpoint in {output_dir} yet: starting from scratch", main_process_only=True)
        else:
            accelerator.load_state(str(path))
            if ema is not None:
                ema.to(accelerator.device)  # custom objects are loaded onto the CPU
            global_step = read_training_state(path)["global_step"]
            first_epoch = global_step // steps_per_epoch
            skip_batches = (global_step % steps_per_epoch) * cfg.gradient_accumulation_steps
            logger.info(f"resumed from {path} at step {global_step}", main_process_only=True)

    # -- loop -----------------------------------------------------------------------------------------------------
    logger.info(
        f"{sum(p.numel() for p in vae.parameters()) / 1e6:.1f} M parameters, {max_steps} steps of "
        f"{images_per_step * cfg.gradient_accumulation_steps} images, lr {lr:.3g}",
        main_process_only=True,
    )
    progress = tqdm(
        total=max_steps, initial=global_step, desc="train", disable=not accelerator.is_local_main_process
    )
    val_metrics: dict[str, float] = {}
    tick, tick_step = time.time(), global_step
    # Batches since the last optimizer step; checkpoints fall on optimizer steps, so it is 0 on resume.
    micro_step = 0
    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_steps:
            break
        train_set.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        batches = train_loader
        if epoch == first_epoch and skip_batches:
            batches = accelerator.skip_first_batches(train_loader, skip_batches)
        for batch in batches:
            data.skip_log.merge(batch["skipped"])  # files found broken in data-loader workers
            images = batch["pixel_values"]
            if cfg.channels_last:
                images = images.to(memory_format=torch.channels_last)
            noise = derived_generator(cfg.seed, accelerator.process_index, global_step, micro_step)
            logs = train_step(images, global_step, noise)
            if not accelerator.sync_gradients:
                micro_step += 1
                continue

            # -- end of an optimizer step --
            micro_step = 0
            if ema is not None:
                ema.step(vae.parameters())
            global_step += 1
            progress.update(1)
            if global_step % cfg.logging_steps == 0 or global_step == max_steps:
                elapsed = time.time() - tick
                images_seen = (global_step - tick_step) * images_per_step * cfg.gradient_accumulation_steps
                tick, tick_step = time.time(), global_step
                scalars = {f"train/{k}": float(v) for k, v in logs.items()}
                rate = images_seen / max(elapsed, 1e-9)
                scalars.update({"train/lr": sched_ae.get_last_lr()[0], "train/images_per_s": rate})
                accelerator.log(scalars, step=global_step)
                progress.set_postfix(loss=f"{scalars['train/loss']:.4g}", img_s=f"{rate:.1f}")
            if global_step % cfg.validation_steps == 0 or global_step == max_steps:
                val_metrics = run_validation(accelerator, cfg, vae, ema, val_set, perceptual, global_step)
            if global_step % cfg.checkpointing_steps == 0 or global_step == max_steps:
                save_checkpoint(accelerator, cfg, vae, global_step, epoch)
            if global_step >= max_steps:
                break
    progress.close()

    # -- scaling factor and export -----------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    final_dir = output_dir / "final"
    if accelerator.is_main_process:
        vae.eval()
        if ema is not None:
            ema.copy_to(vae.parameters())
        stats_images = ImageDataset(data.train, cfg.resolution, train=False, **crops)
        stats_set = Subset(stats_images, range(min(cfg.scaling_factor_images, len(stats_images))))
        stats_loader = DataLoader(stats_set, batch_size=cfg.train_batch_size, collate_fn=collate_images)
        stats = measure_latent_stats(
            vae, (b["pixel_values"] for b in stats_loader), generator=torch.Generator().manual_seed(cfg.seed)
        )
        vae.register_to_config(scaling_factor=stats.scaling_factor)
        export_vae(
            vae,
            final_dir,
            metadata={
                "weights": "ema" if ema is not None else "trained",
                "global_step": str(global_step),
                "latent_channel_mean": str(stats.channel_mean),
                "latent_channel_std": str(stats.channel_std),
                "scaling_factor_images": str(stats.num_images),
            },
        )
        minutes = (time.time() - started) / 60
        summary = [
            f"done: {global_step} steps in {minutes:.1f} min",
            f"final validation: PSNR {val_metrics.get('psnr', float('nan')):.2f} dB, "
            f"SSIM {val_metrics.get('ssim', float('nan')):.4f} on {val_metrics.get('num_images', 0)} images",
            f"latent scaling factor {stats.scaling_factor:.5f} (1 / std over {stats.num_images} training images)",
            f"skipped images: {data.skip_log.summary()}",
            f"checkpoints: {output_dir}/checkpoint-*   validation grids: {output_dir}/validation/",
            f"VAE: {final_dir} (weights: {'EMA' if ema is not None else 'trained'})",
            f"use it: AutoencoderKL.from_pretrained('{final_dir}') then StableDiffusionPipeline.from_pretrained(..., vae=vae)",
        ]
        print("\n".join(summary), flush=True)
    accelerator.end_training()
    return final_dir


if __name__ == "__main__":
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    config, given = parse_config()
    try:
        main(config, given)
    except (MissingWeightsError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
