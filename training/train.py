"""Train an SD-style KL autoencoder with Accelerate.

    accelerate launch training/train.py --preset quickstart          # minutes on a CPU, no data or network needed
    accelerate launch training/train.py --train_data_dir DIR         # the SD kl-f8 recipe from scratch
    accelerate launch training/train.py --pretrained_model_name_or_path vae.safetensors --decoder_only ...

Reads top to bottom: setup, data, model and EMA, losses and optimizers, `accelerator.prepare`, resume, loop
(autoencoder step, discriminator step, EMA, logging, validation, checkpoints), then the latent scaling factor and
the export to `output_dir/final/`.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import Tensor, nn
from torch.utils.data import DataLoader
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
from latentvae.distributions import DiagonalGaussianDistribution
from latentvae.export import export_vae
from latentvae.images import ImageDataset, collate_images
from latentvae.latent_stats import measure_latent_stats
from latentvae.loading import load_vae
from latentvae.losses import AutoencoderLoss
from latentvae.pretrained import MissingWeightsError, build_lpips
from latentvae.training_config import TrainConfig, parse_config
from latentvae.validation import save_grid, validate

logger = get_logger("latentvae.train", log_level="INFO")


class Reconstruction(nn.Module):
    """x -> (reconstruction from a posterior sample, posterior moments): the module DDP wraps, so every parameter
    that gets a gradient is reached through DDP's forward and gradients are averaged across processes."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        moments = self.vae.encode(images).latent_dist.parameters
        z = DiagonalGaussianDistribution(
            moments
        ).sample()  # z = mu + sigma * eps, eps from torch's global RNG
        return self.vae.decode(z).sample, moments


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
        return build_lpips(cfg.perceptual_net, random_backbone=cfg.perceptual_random_backbone)
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
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        vae.save_config(staging)  # so load_vae can read the checkpoint's weights (model.safetensors) directly
        final = finalize_checkpoint(staging, step, {"epoch": epoch, "config": cfg.to_dict()})
        removed = prune_checkpoints(cfg.output_dir, cfg.checkpoints_total_limit)
        logger.info(f"saved {final}" + (f"; removed {', '.join(p.name for p in removed)}" if removed else ""))
    accelerator.wait_for_everyone()


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
    )
    set_seed(cfg.seed)  # identical initial weights on every process
    started = time.time()

    # -- data -----------------------------------------------------------------------------------------------------
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
    train_set = ImageDataset(data.train, cfg.resolution, train=True, skip_log=data.skip_log)
    val_set = ImageDataset(data.val[: cfg.num_validation_images], cfg.resolution, train=False)
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

    # -- model, EMA, losses, optimizers -------------------------------------------------------------------------
    vae = build_vae(cfg)
    set_seed(cfg.seed, device_specific=True)  # from here on each process draws its own crops and noise
    model = Reconstruction(vae)
    ema = EMAModel(vae.parameters(), decay=cfg.ema_decay, foreach=True) if cfg.ema_decay > 0 else None
    perceptual = build_perceptual(cfg, explicit)
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
    # Accelerate steps a prepared scheduler once per process, hence the factor (as in the diffusers examples).
    steps_per_epoch = math.ceil(
        math.ceil(len(train_loader) / accelerator.num_processes) / cfg.gradient_accumulation_steps
    )
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_steps / steps_per_epoch)

    def schedule(optimizer):
        return get_scheduler(
            cfg.lr_scheduler,
            optimizer,
            num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=max_steps * accelerator.num_processes,
        )

    sched_ae = schedule(opt_ae)
    model, opt_ae, train_loader, sched_ae = accelerator.prepare(model, opt_ae, train_loader, sched_ae)
    if use_gan:
        opt_d = torch.optim.AdamW(discriminator.parameters(), lr=cfg.disc_learning_rate or lr, **adam)
        sched_d = schedule(opt_d)
        discriminator, opt_d, sched_d = accelerator.prepare(discriminator, opt_d, sched_d)
        plain_discriminator = accelerator.unwrap_model(discriminator)
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
    last_layer = vae.decoder.conv_out.weight
    val_metrics: dict[str, float] = {}
    tick, tick_step = time.time(), global_step
    for epoch in range(first_epoch, num_epochs):
        train_loader.set_epoch(epoch)
        batches = train_loader
        if epoch == first_epoch and skip_batches:
            batches = accelerator.skip_first_batches(train_loader, skip_batches)
        for batch in batches:
            images = batch["pixel_values"]
            if cfg.channels_last:
                images = images.to(memory_format=torch.channels_last)
            gan_on = use_gan and loss_fn.discriminator_active(global_step)
            with accelerator.accumulate(model):
                # Autoencoder step. The generator loss goes through a frozen discriminator: gradients reach the
                # reconstruction but are never written into the discriminator.
                recon, moments = model(images)
                if use_gan:
                    plain_discriminator.requires_grad_(False)
                with accelerator.autocast():
                    loss, logs = loss_fn.autoencoder_loss(
                        images,
                        recon,
                        DiagonalGaussianDistribution(moments.float()),
                        global_step,
                        last_layer=last_layer if gan_on else None,
                        discriminator=plain_discriminator if gan_on else None,
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    loss_fn.all_reduce_logvar_grad()
                    if cfg.max_grad_norm > 0:
                        logs["grad_norm"] = accelerator.clip_grad_norm_(ae_params, cfg.max_grad_norm)
                opt_ae.step()
                sched_ae.step()
                opt_ae.zero_grad(set_to_none=True)
            if gan_on:
                # Discriminator step, on detached reconstructions: nothing reaches the autoencoder.
                plain_discriminator.requires_grad_(True)
                with accelerator.accumulate(discriminator), accelerator.autocast():
                    d_loss, d_logs = loss_fn.discriminator_loss(images, recon, discriminator, global_step)
                    accelerator.backward(d_loss)
                    opt_d.step()
                    sched_d.step()
                    opt_d.zero_grad(set_to_none=True)
                logs.update(d_logs)
            if not accelerator.sync_gradients:
                continue

            # -- end of an optimizer step --
            if ema is not None:
                ema.step(vae.parameters())
            global_step += 1
            progress.update(1)
            if global_step % cfg.logging_steps == 0 or global_step == max_steps:
                elapsed = time.time() - tick
                rate = (
                    (global_step - tick_step)
                    * images_per_step
                    * cfg.gradient_accumulation_steps
                    / max(elapsed, 1e-9)
                )
                tick, tick_step = time.time(), global_step
                scalars = {f"train/{k}": float(v) for k, v in logs.items()}
                scalars.update({"train/lr": sched_ae.get_last_lr()[0], "train/images_per_s": rate})
                accelerator.log(scalars, step=global_step)
                progress.set_postfix(loss=f"{scalars['train/loss']:.4g}", img_s=f"{rate:.1f}")
            if global_step % cfg.validation_steps == 0 or global_step == max_steps:
                val_metrics = run_validation(accelerator, cfg, vae, ema, val_set, perceptual, global_step)
            if global_step % cfg.checkpointing_steps == 0 or global_step == max_steps:
                save_checkpoint(accelerator, cfg, vae, global_step, epoch)
            if global_step >= max_steps:
                break
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
        stats_set = ImageDataset(data.train[: cfg.scaling_factor_images], cfg.resolution, train=False)
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


if __name__ == "__main__":
    config, given = parse_config()
    try:
        main(config, given)
    except (MissingWeightsError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
