"""One training step of the KL autoencoder under Accelerate: the autoencoder update, then the discriminator update.

    autoencoder:    x -> DDP(encode, sample z = mu + sigma * eps, decode) -> L_ae -> backward -> clip -> step
    discriminator:  (x, x_hat.detach()) -> DDP(D) -> L_d -> backward -> step

Two optimizers stepped explicitly (no `optimizer_idx` switch). What makes it correct on many processes:
- the autoencoder forward runs through the prepared (DDP-wrapped) module, so its backward all-reduces gradients
  (calling the unwrapped model would skip that, and the processes would drift apart);
- the loss's learned log-variance lives outside DDP and is all-reduced by hand before clipping;
- the generator loss runs the discriminator with its parameters frozen, so the autoencoder step writes nothing
  into the discriminator; the discriminator step sees detached reconstructions, so it writes nothing into the
  autoencoder;
- both models share one `accelerator.accumulate` block: each block counts one micro-batch, so two blocks per
  batch would count double and, with gradient accumulation, shift which micro-batches step which optimizer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from latentvae.distributions import DiagonalGaussianDistribution
from latentvae.losses import AutoencoderLoss


class Reconstruction(nn.Module):
    """x -> (reconstruction from a posterior sample, posterior moments): the module DDP wraps, so that every
    autoencoder parameter that gets a gradient is reached through DDP's forward."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        moments = self.vae.encode(images).latent_dist.parameters  # (B, 2 * latent_channels, h, w)
        z = DiagonalGaussianDistribution(moments).sample(generator)  # z = mu + sigma * eps
        return self.vae.decode(z).sample, moments


@contextmanager
def frozen(module: nn.Module | None) -> Iterator[None]:
    """Inside the block, `module`'s parameters do not require gradients (each one's flag is restored after)."""
    if module is None:
        yield
        return
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@dataclass
class TrainStep:
    """The per-batch update: call it once per (micro-)batch inside the training loop.

    Args:
        accelerator: the run's `Accelerator` (gradient accumulation, autocast, scaler, DDP).
        model: the prepared `Reconstruction` (DDP-wrapped when there are several processes).
        loss_fn: the `AutoencoderLoss`; its trainable `logvar` (if any) must be in `optimizer`.
        optimizer, scheduler: the prepared autoencoder optimizer and learning-rate scheduler.
        max_grad_norm: clip the autoencoder's gradient norm to this (0: no clipping).
        discriminator, disc_optimizer, disc_scheduler: the prepared PatchGAN and its optimizer and scheduler, or
            None without a GAN.
    """

    accelerator: Accelerator
    model: nn.Module
    loss_fn: AutoencoderLoss
    optimizer: torch.optim.Optimizer
    scheduler: Any
    max_grad_norm: float = 0.0
    discriminator: nn.Module | None = None
    disc_optimizer: torch.optim.Optimizer | None = None
    disc_scheduler: Any = None
    params: list[Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.vae = self.accelerator.unwrap_model(self.model).vae
        # Clip exactly what the optimizer steps: the trainable autoencoder weights and the loss's logvar.
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]

    def gan_active(self, global_step: int) -> bool:
        return self.discriminator is not None and self.loss_fn.discriminator_active(global_step)

    def __call__(self, images: Tensor, global_step: int, generator: torch.Generator | None = None) -> dict:
        """Both updates for one batch. Returns detached scalar logs (the last micro-batch's under accumulation);
        the optimizers step only when `accelerator.sync_gradients` is True after the call."""
        models = [self.model] + ([self.discriminator] if self.discriminator is not None else [])
        with self.accelerator.accumulate(*models):
            recon, logs = self.autoencoder_step(images, global_step, generator)
            if self.gan_active(global_step):
                logs.update(self.discriminator_step(images, recon, global_step))
        return logs

    def autoencoder_step(
        self, images: Tensor, global_step: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict]:
        """Forward through the prepared model, backward, (at a sync step) all-reduce logvar, clip and step.

        Returns:
            The detached reconstructions (for the discriminator step) and the loss logs.
        """
        gan_on = self.gan_active(global_step)
        critic = self.accelerator.unwrap_model(self.discriminator) if gan_on else None
        recon, moments = self.model(images, generator=generator)
        with frozen(critic):
            with self.accelerator.autocast():
                loss, logs = self.loss_fn.autoencoder_loss(
                    images,
                    recon,
                    DiagonalGaussianDistribution(moments.float()),
                    global_step,
                    last_layer=self.vae.decoder.conv_out.weight if gan_on else None,
                    discriminator=critic,
                )
            self.accelerator.backward(loss)
        if self.accelerator.sync_gradients:
            self.loss_fn.all_reduce_logvar_grad()  # before clipping, so every process clips the same gradient
            if self.max_grad_norm > 0:
                # Unscale (fp16) this optimizer's gradients only: `accelerator.clip_grad_norm_` would unscale every
                # prepared optimizer's, including the discriminator's half-accumulated ones, which its own step
                # would then unscale a second time.
                self.accelerator.unscale_gradients(self.optimizer)
                logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        # Prepared optimizers and schedulers skip these calls on accumulation micro-steps.
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return recon.detach(), logs

    def discriminator_step(self, images: Tensor, recon: Tensor, global_step: int) -> dict:
        """Hinge loss on real images and detached reconstructions through the prepared discriminator, then step."""
        with self.accelerator.autocast():
            loss, logs = self.loss_fn.discriminator_loss(
                images, recon.detach(), self.discriminator, global_step
            )
        self.accelerator.backward(loss)
        self.disc_optimizer.step()
        self.disc_scheduler.step()
        self.disc_optimizer.zero_grad(set_to_none=True)
        return logs
