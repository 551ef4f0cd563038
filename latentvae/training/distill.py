"""Distil a preview decoder (a TAESD-shaped `diffusers.AutoencoderTiny`) from a trained VAE, with Accelerate.

    latentvae distill-preview VAE --data_dir DIR [--output_dir OUT] [--max_train_steps N] ...
    accelerate launch training/distill_preview.py VAE --data_dir DIR ...        # the same; many processes: DDP

Reads top to bottom, as training/train.py: setup, data and the perceptual loss, the frozen VAE and the student
(and EMA), losses and optimizers, `accelerator.prepare`, resume, loop (the teacher's targets, then one `TrainStep`:
student step, discriminator step; EMA, logging, validation, checkpoints), then the latent byte range and the export
to `output_dir/final/` with its model card. What is distilled, and how: `latentvae.training.preview`; the latent
convention and the model's shape: `latentvae.models.preview`. Checkpoints, signals, non-finite steps and the data
behave as in training/train.py (the same modules).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from latentvae.data.images import collate_images
from latentvae.data.loaders import build_training_data
from latentvae.data.seeding import derived_generator
from latentvae.files.card import TrainingRecord
from latentvae.files.export import export_preview
from latentvae.files.loading import load_vae
from latentvae.models.preview import build_preview, check_teacher, normalise_latents, set_latent_range
from latentvae.training.checkpointing import latest_checkpoint, resume, resume_command, save_checkpoint
from latentvae.training.launch import build_accelerator, build_optimizers, build_perceptual
from latentvae.training.losses import AutoencoderLoss
from latentvae.training.preview import PreviewConfig, PreviewDistillation, teacher_targets, validate_preview
from latentvae.training.signals import PreemptionHandler, ignore_stop_signals
from latentvae.training.step import NonFiniteGuard, TrainStep

logger = get_logger("latentvae.distill", log_level="INFO")
SCRIPT = "training/distill_preview.py"


def load_teacher(cfg: PreviewConfig, device: torch.device) -> torch.nn.Module:
    """The VAE, frozen, fp32, in eval mode on `device`."""
    if not cfg.vae:
        raise ValueError("name the VAE to distil: latentvae distill-preview VAE --data_dir DIR")
    vae = load_vae(cfg.vae, allow_pickle=cfg.allow_pickle)
    check_teacher(vae, cfg.vae)
    return vae.float().eval().requires_grad_(False).to(device)


def images_per_step(cfg: PreviewConfig, accelerator: Accelerator) -> int:
    return cfg.train_batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps


def run_validation(accelerator, cfg, teacher, preview, ema, val_set, step: int) -> dict[str, float]:
    """PSNR of the preview against the VAE on the held-out crops, and a grid input | VAE | preview (main process,
    EMA weights when EMA is on)."""
    metrics: dict[str, float] = {}
    if accelerator.is_main_process:
        if ema is not None:
            ema.store(preview.parameters())
            ema.copy_to(preview.parameters())
        loader = DataLoader(val_set, batch_size=cfg.train_batch_size, collate_fn=collate_images)
        with accelerator.autocast():
            metrics = validate_preview(teacher, preview, (b["pixel_values"] for b in loader))
            images = next(iter(loader))["pixel_values"][:4].to(accelerator.device)
            with torch.no_grad():
                mean = teacher.encode(images).latent_dist.mean
                rows = [
                    images,
                    teacher.decode(mean).sample,
                    preview.decode(normalise_latents(teacher.config, mean)).sample,
                ]
        if ema is not None:
            ema.restore(preview.parameters())
        grid = make_grid(
            torch.cat([r.float().clamp(-1, 1).cpu() for r in rows]),
            nrow=len(images),
            normalize=True,
            value_range=(-1, 1),
        )
        path = Path(cfg.output_dir) / "validation" / f"step-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
        logger.info(
            f"step {step}: preview vs VAE decode PSNR {metrics['psnr_vs_vae']:.2f} dB, round trip "
            f"{metrics['psnr_roundtrip']:.2f} dB, latent RMSE {metrics['latent_rmse']:.4f} ({path})",
            main_process_only=True,
        )
    accelerator.wait_for_everyone()
    return metrics


@torch.no_grad()
def latent_range(cfg: PreviewConfig, teacher, data, device) -> tuple[float, float]:
    """Mean and std of the normalised posterior mean over the statistics images (`--scaling_factor_images`)."""
    loader = DataLoader(data.statistics_set(), batch_size=cfg.train_batch_size, collate_fn=collate_images)
    parts = [
        normalise_latents(teacher.config, teacher.encode(b["pixel_values"].to(device)).latent_dist.mean)
        .flatten()
        .cpu()
        for b in loader
    ]
    values = torch.cat(parts).double()
    return float(values.mean()), float(values.std())


def finish(accelerator, cfg, teacher, preview, ema, data, step: int, val_metrics: dict) -> Path:
    """Set the latent byte range from data, export to `output_dir/final/` with the model card (main process)."""
    final_dir = Path(cfg.output_dir) / "final"
    if accelerator.is_main_process:
        preview.eval()
        if ema is not None:
            ema.copy_to(preview.parameters())
        mean, std = latent_range(cfg, teacher, data, accelerator.device)
        magnitude, shift = set_latent_range(preview, mean, std)
        losses = {
            name: getattr(cfg, name)
            for name in ("recon_loss", "perceptual_weight", "perceptual_net", "encoder_weight", "disc_weight")
        }
        record = TrainingRecord(
            recipe="preview",
            steps=step,
            images_per_step=images_per_step(cfg, accelerator),
            resolution=cfg.resolution,
            data=data.description.splitlines()[0],
            losses=losses,
            optimizer={
                "learning_rate": cfg.learning_rate,
                "lr_scheduler": cfg.lr_scheduler,
                "ema_decay": cfg.ema_decay,
            },
            validation={k: v for k, v in val_metrics.items() if k != "num_images"},
            num_validation_images=int(val_metrics.get("num_images", 0)),
            script=SCRIPT,
        )
        export_preview(preview, final_dir, teacher=cfg.vae, record=record, license=cfg.license)
        print(
            "\n".join(
                [
                    f"done: {step} steps; preview vs VAE decode PSNR {val_metrics.get('psnr_vs_vae', float('nan')):.2f} dB",
                    f"latent byte range: latent_magnitude {magnitude:.4f}, latent_shift {shift:.4f} (mean {mean:.4f}, std {std:.4f})",
                    f"AutoencoderTiny: {final_dir}",
                    f"use it: diffusers.AutoencoderTiny.from_pretrained('{final_dir}'), e.g. as a pipeline's `vae`",
                ]
            ),
            flush=True,
        )
    # Every process leaves the group together: a rank destroying its gloo group while the main one still exports
    # sometimes died in teardown ("terminate called without an active exception", 1 run in 3 of the 2-process test).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final_dir


def main(cfg: PreviewConfig, explicit: set[str] = frozenset()) -> Path:
    """Distil and export to `output_dir/final/`; returns that folder, or the checkpoint written when a SIGTERM /
    SIGINT stopped the run early."""
    # -- setup --------------------------------------------------------------------------------------------------
    output_dir = Path(cfg.output_dir)
    accelerator = build_accelerator(cfg)
    set_seed(
        cfg.seed
    )  # identical initial weights on every process; the data and noise are seeded by position

    # -- data, the perceptual loss and the VAE (all fail here, before any training) --------------------------------
    data = build_training_data(cfg.data_settings(), accelerator, worker_init_fn=ignore_stop_signals)
    logger.info(data.description, main_process_only=True)
    val_set = data.validation_set()
    with accelerator.main_process_first():
        perceptual = build_perceptual(cfg, explicit)
    teacher = load_teacher(cfg, accelerator.device)

    # -- the student, EMA, losses, optimizers ----------------------------------------------------------------------
    preview = build_preview(teacher, cfg.preview_channels).train()
    model = PreviewDistillation(preview, cfg.encoder_weight)  # the module DDP wraps
    ema = EMAModel(preview.parameters(), decay=cfg.ema_decay, foreach=True) if cfg.ema_decay > 0 else None
    loss_fn = AutoencoderLoss(
        perceptual_loss=perceptual,
        perceptual_weight=cfg.perceptual_weight,
        recon_loss=cfg.recon_loss,
        chroma_weight=cfg.chroma_weight,
        disc_weight=cfg.disc_weight,
        disc_start=cfg.disc_start,
    ).to(accelerator.device)
    steps_per_epoch = data.batches.steps_per_epoch
    max_steps = (
        cfg.max_train_steps if cfg.max_train_steps is not None else cfg.num_train_epochs * steps_per_epoch
    )
    model, opt, sched, critic, opt_d, sched_d = build_optimizers(
        accelerator, cfg, model, loss_fn, max_steps, cfg.learning_rate
    )
    train_step = TrainStep(accelerator, model, loss_fn, opt, sched, cfg.max_grad_norm, critic, opt_d, sched_d)
    accelerator.register_for_checkpointing(loss_fn)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    if accelerator.is_main_process:
        scalars = {k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(cfg.tracker_project_name, config=scalars)

    # -- resume ---------------------------------------------------------------------------------------------------
    global_step = 0
    if cfg.resume_from_checkpoint:
        global_step = resume(accelerator, cfg.resume_from_checkpoint, output_dir, data.batches)
        if ema is not None:
            ema.to(accelerator.device)

    # -- loop -----------------------------------------------------------------------------------------------------
    logger.info(
        f"preview: {sum(p.numel() for p in preview.parameters()) / 1e6:.2f} M parameters (VAE "
        f"{sum(p.numel() for p in teacher.parameters()) / 1e6:.2f} M); {max_steps} steps of "
        f"{images_per_step(cfg, accelerator)} images, lr {cfg.learning_rate:.3g}",
        main_process_only=True,
    )
    progress = tqdm(
        total=max_steps, initial=global_step, desc="distil", disable=not accelerator.is_local_main_process
    )
    val_metrics: dict[str, float] = {}
    micro_step = 0
    step_files: list[str] = []
    nonfinite = NonFiniteGuard(cfg.max_nonfinite_steps, output_dir)
    with PreemptionHandler() as preemption:
        for batch in data.batches.batches(global_step):
            if global_step >= max_steps:
                break
            data.monitor.update(batch)
            images = batch["pixel_values"]
            step_files += batch["path"]
            noise = derived_generator(cfg.seed, accelerator.process_index, global_step, micro_step)
            with accelerator.autocast():
                latents, means, targets = teacher_targets(teacher, images, noise)
            logs = train_step(images, global_step, targets=targets, latents=latents, latent_means=means)
            if not accelerator.sync_gradients:
                micro_step += 1
                continue

            # -- end of an optimizer step --
            micro_step = 0
            global_step += 1
            progress.update(1)
            nonfinite.update(global_step, train_step.skipped, step_files)
            step_files = []
            if ema is not None and train_step.updated:
                ema.step(preview.parameters())
            last = global_step == max_steps
            if global_step % cfg.logging_steps == 0 or last:
                scalars = {f"train/{k}": float(v) for k, v in logs.items()}
                accelerator.log({**scalars, "train/lr": sched.get_last_lr()[0]}, step=global_step)
                progress.set_postfix(loss=f"{scalars['train/loss']:.4g}")
            if global_step % cfg.validation_steps == 0 or last:
                val_metrics = run_validation(accelerator, cfg, teacher, preview, ema, val_set, global_step)
            stop = preemption.stop_requested(accelerator)
            if (stop or global_step % cfg.checkpointing_steps == 0 or last) and nonfinite.run == 0:
                save_checkpoint(
                    accelerator,
                    output_dir,
                    global_step,
                    {"epoch": data.batches.epoch, "config": cfg.to_dict()},
                    process_state={"data": data.batches.state_dict()},
                    model_config=preview,
                    keep=cfg.checkpoints_total_limit,
                )
            if stop:
                progress.close()
                newest = latest_checkpoint(output_dir)
                logger.info(
                    f"stopped by a signal after step {global_step} of {max_steps}; newest checkpoint: {newest}. "
                    f"Resume with:\n  {resume_command(sys.argv[1:], SCRIPT)}",
                    main_process_only=True,
                )
                accelerator.end_training()
                return newest
            if global_step >= max_steps:
                break
    progress.close()

    # -- latent byte range and export -------------------------------------------------------------------------
    return finish(accelerator, cfg, teacher, preview, ema, data, global_step, val_metrics)
