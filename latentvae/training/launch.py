"""What every training script of latentvae sets up the same way: the `Accelerator` (sharded launches refused, DDP on
CPU-only machines), the LPIPS loss (with the quickstart's loud offline fallback) and the AdamW optimizers with their
schedules, prepared. `training/train.py` and `latentvae.training.distill` (the preview decoder) both use them.

The configs they read are duck-typed: any object with the training flags of the same names (`TrainConfig`,
`PreviewConfig`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    ProjectConfiguration,
    parse_flag_from_env,
)
from diffusers.optimization import get_scheduler
from torch import nn

from latentvae.models.discriminator import NLayerDiscriminator
from latentvae.models.inference import cpu_has_bf16
from latentvae.pretrained import MissingWeightsError, build_lpips

logger = get_logger("latentvae.train", log_level="INFO")


def build_perceptual(cfg: Any, explicit: set[str]) -> nn.Module | None:
    """LPIPS for the loss, its backbone downloaded on first use; offline (or unreachable) without the backbone
    weights: an error, or (quickstart) a loud warning and none."""
    if cfg.perceptual_weight <= 0:
        return None
    try:
        return build_lpips(
            cfg.perceptual_net,
            random_backbone=cfg.perceptual_random_backbone,
            offline=cfg.offline,
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


def refuse_sharding(kind: str) -> None:
    # Not yet: EMA, validation and export run on unsharded weights of the main process only, the GAN's adaptive
    # weight needs the decoder's last layer whole, and two models are prepared. A VAE this size (84 M parameters)
    # trains well with DDP.
    raise ValueError(
        f"{kind} is not supported by latentvae's training scripts: launch with DDP instead (`accelerate launch --multi_gpu "
        "...`, or answer 'multi-GPU' in `accelerate config`); the VAE and its optimizer state fit on one GPU."
    )


def build_optimizers(accelerator, cfg, model, loss_fn, max_steps, lr):
    """AdamW for the autoencoder (and the loss's learned logvar), and for the discriminator when the GAN is on,
    each with its learning-rate schedule; all prepared. Returns `(model, opt_ae, sched_ae, critic, opt_d, sched_d)`
    with the last three None without a GAN."""
    adam = dict(
        betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon
    )

    def schedule(optimizer):
        # Accelerate steps a prepared scheduler once per process, hence the factor (as in the diffusers examples).
        return get_scheduler(
            cfg.lr_scheduler,
            optimizer,
            num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=max_steps * accelerator.num_processes,
        )

    ae_params = [p for p in model.parameters() if p.requires_grad] + loss_fn.autoencoder_parameters()
    opt_ae = torch.optim.AdamW(ae_params, lr=lr, **adam)
    model, opt_ae, sched_ae = accelerator.prepare(model, opt_ae, schedule(opt_ae))
    if cfg.disc_weight <= 0:
        return model, opt_ae, sched_ae, None, None, None
    critic = NLayerDiscriminator()
    opt_d = torch.optim.AdamW(critic.parameters(), lr=cfg.disc_learning_rate or lr, **adam)
    critic, opt_d, sched_d = accelerator.prepare(critic, opt_d, schedule(opt_d))
    return model, opt_ae, sched_ae, critic, opt_d, sched_d


def build_accelerator(cfg: Any) -> Accelerator:
    """The run's `Accelerator`; sharded launches (FSDP, DeepSpeed) are refused before it starts."""
    output_dir = Path(cfg.output_dir)
    # Asked for by `accelerate launch --use_fsdp / --use_deepspeed` or such an `accelerate config` (both set these
    # variables). Checked before Accelerate starts: on CPU-only machines it would silently run DDP instead.
    for kind in ("FSDP", "DEEPSPEED"):
        if parse_flag_from_env(f"ACCELERATE_USE_{kind}"):
            refuse_sharding(kind)
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
    if accelerator.distributed_type in (
        DistributedType.FSDP,
        DistributedType.DEEPSPEED,
    ):  # set some other way
        refuse_sharding(accelerator.distributed_type.value)
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "bf16" and not cpu_has_bf16():
        # Measured on a 2-core AVX2 machine (torch emulates bf16 convolutions there): 40 steps of a (64, 128, 128, 128)
        # VAE on 4 crops of 128 px had not finished after 10 minutes under bf16 autocast; in fp32 they took 3.7.
        logger.warning(
            "--mixed_precision bf16 on a CPU without bf16 instructions (AVX512_BF16 or AMX): torch emulates bf16 "
            "there, and training runs several times slower than in fp32. Use --mixed_precision no on this machine.",
            main_process_only=True,
        )
    return accelerator
