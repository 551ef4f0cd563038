"""Train an SD-style KL autoencoder (or a FLUX.2 one, `--model flux2`, or a VQ one, `--model vq`) with Accelerate.

    accelerate launch training/train.py --recipe quickstart          # minutes on a CPU, no data or network needed
    accelerate launch training/train.py --train_data_dir DIR         # the SD kl-f8 recipe from scratch
    accelerate launch training/train.py --pretrained_model_name_or_path vae.safetensors --decoder_only ...
    accelerate launch training/train.py --recipe vq-f4 --train_data_dir DIR   # LDM's vq-f4 recipe
    accelerate launch training/train.py --train_shards 'shards/shard-{000000..000099}.tar' --max_train_steps N

Reads top to bottom: setup, data, model and EMA, losses and optimizers, `accelerator.prepare`, resume, loop
(one `TrainStep` per batch: autoencoder step, discriminator step; then EMA, logging, validation, checkpoints), then
the latent normalisation (`--latent_normalization`: `latentvae.training.normalizing`) and the export to
`output_dir/final/` with its model card (`--push_to_hub` uploads it: `latentvae.training.publish`). The module DDP
wraps (reconstruction plus the latent regulariser's loss: KL or VQ) is `latentvae.training.autoencoding`; the step
itself is `latentvae.training.step`; the randomness that makes a resumed run exact is `latentvae.data.seeding`; the
data (folder, dataset or streamed shards) is `latentvae.data.loaders`.

What may go wrong, and what happens then: a broken image is skipped with a warning and counted (more than
--max_bad_fraction is an error with the list); SIGTERM / SIGINT finishes the step, writes a checkpoint and exits 0
(a second signal exits at once: `latentvae.training.signals`); a kill leaves the newest complete checkpoint usable
(`latentvae.training.checkpointing`); a NaN/inf loss or gradient skips the step, more than --max_nonfinite_steps in a
row stop the run.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object, set_seed
from diffusers.training_utils import EMAModel
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from latentvae import AutoencoderKL, AutoencoderKLFlux2, VQModel
from latentvae.data.images import collate_images
from latentvae.data.loaders import build_training_data
from latentvae.data.seeding import derived_generator
from latentvae.data.skips import SkipLog
from latentvae.evaluation.latent_health import latent_health_scalars
from latentvae.evaluation.normalization import export_metadata
from latentvae.files.export import export_vae
from latentvae.files.hub import check_can_push
from latentvae.files.loading import load_vae
from latentvae.pretrained import MissingWeightsError
from latentvae.training.autoencoding import build_autoencoding
from latentvae.training.checkpointing import latest_checkpoint, resume, resume_command, save_checkpoint
from latentvae.training.config import TrainConfig, parse_config
from latentvae.training.launch import build_accelerator, build_optimizers, build_perceptual
from latentvae.training.losses import AutoencoderLoss
from latentvae.training.normalizing import chosen_mode, measure_statistics, write_normalization
from latentvae.training.publish import copy_last_grid, push_training, training_card
from latentvae.training.recipes import width_scaled_lr
from latentvae.training.regularizers import regularized
from latentvae.training.signals import PreemptionHandler, ignore_stop_signals
from latentvae.training.step import NonFiniteGuard, NonFiniteTrainingError, TrainStep
from latentvae.training.validation import (
    grid_images,
    latent_space_metrics,
    reconstruction_grid,
    save_grid,
    validate,
)

logger = get_logger("latentvae.train", log_level="INFO")


MODEL_CLASSES = {"kl": AutoencoderKL, "flux2": AutoencoderKLFlux2, "vq": VQModel}


def build_vae(cfg: TrainConfig) -> AutoencoderKL | VQModel:
    model_class = MODEL_CLASSES[cfg.model]
    if cfg.pretrained_model_name_or_path:
        vae = load_vae(cfg.pretrained_model_name_or_path, allow_pickle=cfg.allow_pickle)
        if type(vae) is not model_class:  # not isinstance: AutoencoderKLFlux2 is an AutoencoderKL
            kind = next(k for k, c in MODEL_CLASSES.items() if type(vae) is c)
            raise ValueError(
                f"{cfg.pretrained_model_name_or_path} holds an {type(vae).__name__}-type model: train it with "
                f"--model {kind}"
            )
    else:
        vae = model_class.from_preset(cfg.model_preset)
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


def images_per_step(cfg: TrainConfig, accelerator: Accelerator) -> int:
    return cfg.train_batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps


def lr_for(cfg: TrainConfig, accelerator: Accelerator, vae: nn.Module) -> float:
    if cfg.scale_lr:  # latent-diffusion: base lr per image, times the number of images per optimizer step
        return cfg.learning_rate * images_per_step(cfg, accelerator)
    if cfg.scale_lr_with_width:
        return width_scaled_lr(
            cfg.learning_rate, max(vae.config.block_out_channels), images_per_step(cfg, accelerator)
        )
    return cfg.learning_rate


def checkpoint(accelerator, cfg, vae, data, step: int) -> Path:
    """A resumable checkpoint: everything Accelerate holds, the config, and each process's data position."""
    return save_checkpoint(
        accelerator,
        cfg.output_dir,
        step,
        {"epoch": data.batches.epoch, "config": cfg.to_dict()},
        process_state={"data": data.batches.state_dict()},
        model_config=vae,
        keep=cfg.checkpoints_total_limit,
    )


def run_validation(
    accelerator, cfg, vae, ema, val_set, grid_set, perceptual, step: int, anchor=None
) -> dict[str, float]:
    """PSNR / SSIM / colour scores (/ LPIPS) on the validation crops and a grid of whole, colourful validation
    images, with EMA weights when EMA is on (main process); with a latent-space regulariser on, or a fine-tune
    that trains the encoder (`anchor`: its frozen start), the equivariance PSNRs and the latent drift too."""
    metrics: dict[str, float] = {}
    if accelerator.is_main_process:
        if ema is not None:
            ema.store(vae.parameters())
            ema.copy_to(vae.parameters())
        loader = DataLoader(val_set, batch_size=cfg.train_batch_size, collate_fn=collate_images)
        with accelerator.autocast():
            metrics = validate(vae, (b["pixel_values"] for b in loader), perceptual)
            grid = reconstruction_grid(vae, grid_set)
            if accelerator.trackers:  # per-channel KL and active units (latentvae diagnose) for the tracker
                health = latent_health_scalars(vae, (b["pixel_values"] for b in loader))
            latent = {}
            if anchor is not None or regularized(cfg):
                latent = latent_space_metrics(vae, (b["pixel_values"] for b in loader), anchor)
        if ema is not None:
            ema.restore(vae.parameters())
        path = save_grid(grid, Path(cfg.output_dir) / "validation" / f"step-{step:07d}.png")
        accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
        if accelerator.trackers:
            accelerator.log({f"val/{k}": v for k, v in health.items()}, step=step)
        accelerator.log({f"val/{k}": v for k, v in latent.items()}, step=step)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("val/input|reconstruction|error", grid, step)
        logger.info(
            f"step {step}: val PSNR {metrics['psnr']:.2f} dB (Y {metrics['psnr_y']:.2f}, CbCr {metrics['psnr_c']:.2f}), "
            f"SSIM {metrics['ssim']:.4f}, colourfulness ratio {metrics['colourfulness_ratio']:.3f} ({path})",
            main_process_only=True,
        )
        if latent:
            logger.info(
                f"step {step}: " + ", ".join(f"{k.replace('/', ' ')} {v:.4g}" for k, v in latent.items()),
                main_process_only=True,
            )
    accelerator.wait_for_everyone()
    return metrics


class StepLog:
    """Training scalars every `--logging_steps`: the step's losses, the learning rate and images per second."""

    def __init__(self, accelerator, cfg, scheduler, progress, step: int):
        self.accelerator, self.cfg, self.scheduler, self.progress = accelerator, cfg, scheduler, progress
        self.images_per_step = images_per_step(cfg, accelerator)
        self.tick, self.tick_step = time.time(), step

    def __call__(self, step: int, logs: dict) -> None:
        elapsed = time.time() - self.tick
        rate = (step - self.tick_step) * self.images_per_step / max(elapsed, 1e-9)
        self.tick, self.tick_step = time.time(), step
        scalars = {f"train/{k}": float(v) for k, v in logs.items()}
        scalars.update({"train/lr": self.scheduler.get_last_lr()[0], "train/images_per_s": rate})
        self.accelerator.log(scalars, step=step)
        self.progress.set_postfix(loss=f"{scalars['train/loss']:.4g}", img_s=f"{rate:.1f}")


def finish(
    accelerator, cfg, vae, ema, data, step: int, val_metrics: dict, started: float, normalization: str | None
) -> Path:
    """Measure the latent statistics (EMA weights when EMA is on; every process its share), write the
    `normalization` constants (None: keep the loaded ones), export to `output_dir/final/` with its model card, print
    the summary and, with --push_to_hub, upload the export (main process)."""
    accelerator.wait_for_everyone()
    vae.eval()
    if ema is not None:
        ema.copy_to(vae.parameters())
    stats = measure_statistics(accelerator, cfg, vae, data)
    skipped = SkipLog()  # the skips every process saw, training and measuring, for the summary
    for reasons in gather_object([data.skip_log.reasons]):
        skipped.merge(reasons.items())
    final_dir = Path(cfg.output_dir) / "final"
    if accelerator.is_main_process:
        name = type(vae).__name__
        normalisation = write_normalization(vae, normalization, stats, cfg, accelerator.num_processes)
        weights = "EMA" if ema is not None else "trained"
        card = training_card(
            cfg,
            steps=step,
            images_per_step=images_per_step(cfg, accelerator),
            learning_rate=lr_for(cfg, accelerator, vae),
            data=data.description,
            validation=val_metrics,
            normalisation=normalisation,
            grid=copy_last_grid(Path(cfg.output_dir), final_dir),
        )
        export_vae(
            vae,
            final_dir,
            card=card,
            metadata={
                "weights": weights.lower(),
                "global_step": str(step),
                **export_metadata(normalisation, stats),
            },
        )
        summary = [
            f"done: {step} steps in {(time.time() - started) / 60:.1f} min",
            f"final validation: PSNR {val_metrics.get('psnr', float('nan')):.2f} dB, "
            f"SSIM {val_metrics.get('ssim', float('nan')):.4f} on {val_metrics.get('num_images', 0)} images",
            f"latent normalisation: {normalisation}",
            f"skipped images: {skipped.summary()}",
            f"checkpoints: {cfg.output_dir}/checkpoint-*   validation grids: {cfg.output_dir}/validation/",
            f"{name}: {final_dir} (weights: {weights})",
            f"use it: diffusers.{name}.from_pretrained('{final_dir}'), e.g. as a pipeline's `{vae.pipeline_component}`",
        ]
        print("\n".join(summary), flush=True)
        if cfg.push_to_hub:
            for url in push_training(cfg, final_dir, step):
                print(f"pushed to the Hub: {url}", flush=True)
    # Every process leaves the group together: a rank destroying its gloo group while the main one still exports
    # sometimes died in teardown ("terminate called without an active exception", 1 run in 3 of the 2-process test).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final_dir


def main(cfg: TrainConfig, explicit: set[str] = frozenset()) -> Path:
    """Train and export to `output_dir/final/`; returns that folder, or the checkpoint written when a SIGTERM /
    SIGINT stopped the run early."""
    # -- setup --------------------------------------------------------------------------------------------------
    output_dir = Path(cfg.output_dir)
    if cfg.push_to_hub:
        check_can_push(cfg.offline)  # now, not after the training
    accelerator = build_accelerator(cfg)
    # Identical initial weights on every process. Crops and posterior noise do not use this global RNG: they
    # are seeded by position (latentvae.data.seeding), which is what makes a resumed run exact.
    set_seed(cfg.seed)
    started = time.time()

    # -- data, and the perceptual loss (both fail here, before any model is built) -------------------------------
    data = build_training_data(cfg.data_settings(), accelerator, worker_init_fn=ignore_stop_signals)
    logger.info(data.description, main_process_only=True)
    val_set = data.validation_set()
    with accelerator.main_process_first():  # one process downloads the backbone; the others find it cached
        perceptual = build_perceptual(cfg, explicit)

    # -- model, EMA, losses, optimizers -------------------------------------------------------------------------
    vae = build_vae(cfg)
    normalization = chosen_mode(cfg, explicit, vae)  # a mode the model cannot hold stops the run now
    grid_set = grid_images(data.val, multiple=vae.downsampling_factor)  # whole, colourful validation images
    model = build_autoencoding(
        vae, cfg
    )  # the module DDP wraps: reconstruction + the latent regulariser's loss
    ema = EMAModel(vae.parameters(), decay=cfg.ema_decay, foreach=True) if cfg.ema_decay > 0 else None
    loss_fn = AutoencoderLoss(
        perceptual_loss=perceptual,
        perceptual_weight=cfg.perceptual_weight,
        recon_loss=cfg.recon_loss,
        chroma_weight=cfg.chroma_weight,
        learn_logvar=cfg.learn_logvar,
        disc_weight=cfg.disc_weight,
        disc_start=cfg.disc_start,
        align_weight=cfg.align_weight,
        align_adaptive=cfg.align_adaptive,
    ).to(accelerator.device)
    steps_per_epoch = data.batches.steps_per_epoch  # None for a stream, which needs --max_train_steps
    max_steps = (
        cfg.max_train_steps if cfg.max_train_steps is not None else cfg.num_train_epochs * steps_per_epoch
    )
    training_state = model.training_state()  # e.g. a VQ codebook's EMA statistics, outside the state_dict
    anchor = getattr(model, "anchor", None)  # a fine-tune's frozen start, for the latent drift
    model, opt_ae, sched_ae, critic, opt_d, sched_d = build_optimizers(
        accelerator, cfg, model, loss_fn, max_steps, lr_for(cfg, accelerator, vae)
    )
    train_step = TrainStep(
        accelerator, model, loss_fn, opt_ae, sched_ae, cfg.max_grad_norm, critic, opt_d, sched_d
    )
    for state in [loss_fn, *training_state]:  # the learned logvar, the regulariser's state
        accelerator.register_for_checkpointing(state)
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
            ema.to(accelerator.device)  # custom objects are loaded onto the CPU

    # -- loop -----------------------------------------------------------------------------------------------------
    logger.info(
        f"{sum(p.numel() for p in vae.parameters()) / 1e6:.1f} M parameters, {max_steps} steps of "
        f"{images_per_step(cfg, accelerator)} images, lr {lr_for(cfg, accelerator, vae):.3g}",
        main_process_only=True,
    )
    progress = tqdm(
        total=max_steps, initial=global_step, desc="train", disable=not accelerator.is_local_main_process
    )
    log_step = StepLog(accelerator, cfg, sched_ae, progress, global_step)
    val_metrics: dict[str, float] = {}
    micro_step = (
        0  # batches since the last optimizer step; checkpoints fall on optimizer steps, so 0 on resume
    )
    step_files: list[str] = []  # the files of the current step's batches, named if its loss is not finite
    nonfinite = NonFiniteGuard(cfg.max_nonfinite_steps, output_dir)
    with PreemptionHandler() as preemption:
        for batch in data.batches.batches(global_step):
            if global_step >= max_steps:  # resumed from the last checkpoint: straight to the export
                break
            data.monitor.update(batch)  # counts files found broken (in data-loader workers too)
            images = batch["pixel_values"]
            step_files += batch["path"]
            if cfg.channels_last:
                images = images.to(memory_format=torch.channels_last)
            noise = derived_generator(cfg.seed, accelerator.process_index, global_step, micro_step)
            logs = train_step(images, global_step, noise)
            if not accelerator.sync_gradients:
                micro_step += 1
                continue

            # -- end of an optimizer step --
            micro_step = 0
            global_step += 1
            progress.update(1)
            nonfinite.update(global_step, train_step.skipped, step_files)  # a skipped step: warn, maybe stop
            step_files = []
            if ema is not None and train_step.updated:
                ema.step(vae.parameters())
            last = global_step == max_steps
            if global_step % cfg.logging_steps == 0 or last:
                log_step(global_step, logs)
            if global_step % cfg.validation_steps == 0 or last:
                val_metrics = run_validation(
                    accelerator, cfg, vae, ema, val_set, grid_set, perceptual, global_step, anchor
                )
            stop = preemption.stop_requested(accelerator)  # a SIGTERM / SIGINT reached some process
            # Never right after a non-finite step: weights that cause NaN must not push out the good checkpoints.
            if (stop or global_step % cfg.checkpointing_steps == 0 or last) and nonfinite.run == 0:
                checkpoint(accelerator, cfg, vae, data, global_step)
            if stop:
                progress.close()
                newest = latest_checkpoint(output_dir)
                logger.info(
                    f"stopped by a signal after step {global_step} of {max_steps}; newest checkpoint: {newest}. "
                    f"Resume with:\n  {resume_command(sys.argv[1:])}",
                    main_process_only=True,
                )
                accelerator.end_training()
                return newest
            if global_step >= max_steps:
                break
    progress.close()

    # -- latent normalisation and export -----------------------------------------------------------------------
    return finish(accelerator, cfg, vae, ema, data, global_step, val_metrics, started, normalization)


if __name__ == "__main__":
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    config, given = parse_config()
    try:
        main(config, given)
    except (MissingWeightsError, FileNotFoundError, ValueError, NonFiniteTrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
