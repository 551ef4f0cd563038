"""One training step of the autoencoder under Accelerate: the autoencoder update, then the discriminator update.

    autoencoder:    x -> DDP(encode, regularise the latent, decode) -> (x_hat, L_reg, aux)
                    L_ae = AutoencoderLoss(x, x_hat, aux) + L_reg -> backward -> clip -> step
                    (L_reg: the KL of a Gaussian latent or the quantiser loss of a VQ one; `latentvae.training
                    .autoencoding`)
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

Non-finite values: an update whose loss (in any micro-batch, on any process) or gradient norm is NaN or inf is
skipped, with no optimizer or scheduler step, and its gradients are dropped; `skipped` names the models whose
update was skipped, so the training loop can leave the EMA alone, log the batch and count consecutive failures.
The autoencoder's failure also skips the discriminator's update (it saw the same, possibly garbage, batch).
Under fp16 loss scaling, an overflowing gradient with a finite loss is left to the `GradScaler`, which skips the
step and lowers the scale by design; `updated` tells the loop whether the autoencoder's weights changed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from latentvae.training.checkpointing import latest_checkpoint
from latentvae.training.losses import AutoencoderLoss

logger = logging.getLogger(__name__)


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
        model: the prepared `Autoencoding` (DDP-wrapped when there are several processes).
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
    skipped: list[str] = field(init=False, default_factory=list)
    updated: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.autoencoding = self.accelerator.unwrap_model(self.model)
        self.vae = self.autoencoding.vae
        # Clip exactly what the optimizer steps: the trainable autoencoder weights and the loss's logvar.
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.disc_params = [] if self.discriminator is None else list(self.discriminator.parameters())
        # Whether a micro-batch of the current accumulation window had a non-finite loss (kept on the device,
        # read once per optimizer step).
        self._bad_loss = {
            "autoencoder": torch.zeros((), dtype=torch.bool),
            "discriminator": torch.zeros((), dtype=torch.bool),
        }

    def gan_active(self, global_step: int) -> bool:
        return self.discriminator is not None and self.loss_fn.discriminator_active(global_step)

    def __call__(
        self,
        images: Tensor,
        global_step: int,
        generator: torch.Generator | None = None,
        *,
        targets: Tensor | None = None,
        **model_inputs: Tensor,
    ) -> dict:
        """Both updates for one batch. Returns detached scalar logs (the last micro-batch's under accumulation);
        the optimizers step only when `accelerator.sync_gradients` is True after the call.

        `targets` are the images the reconstruction is compared with and the discriminator's real images (default:
        `images`; a distillation passes its teacher's decodes); `model_inputs` go to the model's forward beside
        `images` (a distillation's teacher latents)."""
        targets = images if targets is None else targets
        models = [self.model] + ([self.discriminator] if self.discriminator is not None else [])
        with self.accelerator.accumulate(*models):
            if self.accelerator.sync_gradients:
                self.skipped, self.updated = [], False
            recon, logs = self.autoencoder_step(images, global_step, generator, targets, model_inputs)
            if self.gan_active(global_step):
                logs.update(self.discriminator_step(targets, recon, global_step))
        return logs

    def autoencoder_step(
        self,
        images: Tensor,
        global_step: int,
        generator: torch.Generator | None = None,
        targets: Tensor | None = None,
        model_inputs: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict]:
        """Forward through the prepared model, backward, (at a sync step) all-reduce logvar, clip and step.

        Returns:
            The detached reconstructions (for the discriminator step) and the loss logs.
        """
        gan_on = self.gan_active(global_step)
        critic = self.accelerator.unwrap_model(self.discriminator) if gan_on else None
        recon, reg_loss, reg_logs, aux = self.model(images, generator=generator, **(model_inputs or {}))
        with frozen(critic):
            with self.accelerator.autocast():
                loss, logs = self.loss_fn.autoencoder_loss(
                    images if targets is None else targets,
                    recon,
                    global_step,
                    last_layer=self.autoencoding.last_layer() if gan_on else None,
                    discriminator=critic,
                    auxiliary=aux,
                    align_layer=self.autoencoding.encoder_last_layer() if "align" in aux else None,
                )
                loss = loss + reg_loss
                logs.update(reg_logs, loss=loss.detach())
            self.accelerator.backward(loss)
        self._note_loss("autoencoder", loss)
        finite = True  # while accumulating, the prepared optimizer's and scheduler's calls below do nothing
        if self.accelerator.sync_gradients:
            self.loss_fn.all_reduce_logvar_grad()  # before clipping, so every process clips the same gradient
            # The loss is checked before unscaling, so that a skipped step leaves the fp16 GradScaler untouched.
            finite = self._finite_loss("autoencoder")
            if finite and self.max_grad_norm > 0:
                # Unscale (fp16) this optimizer's gradients only: `accelerator.clip_grad_norm_` would unscale
                # every prepared optimizer's, including the discriminator's half-accumulated ones, which its own
                # step would then unscale a second time.
                self.accelerator.unscale_gradients(self.optimizer)
                logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            if finite and self.accelerator.scaler is None:
                # Gradients are all-reduced by now: every process computes the same norm and decides alike.
                norm = logs["grad_norm"] if "grad_norm" in logs else grad_norm(self.params)
                finite = bool(torch.isfinite(norm))
        if self._step_or_skip("autoencoder", finite, self.optimizer, self.scheduler):
            self.updated = self.accelerator.sync_gradients and not getattr(
                self.optimizer, "step_was_skipped", False
            )
        return recon.detach(), logs

    def discriminator_step(self, images: Tensor, recon: Tensor, global_step: int) -> dict:
        """Hinge loss on real images and detached reconstructions through the prepared discriminator, then step."""
        with self.accelerator.autocast():
            loss, logs = self.loss_fn.discriminator_loss(
                images, recon.detach(), self.discriminator, global_step
            )
        self.accelerator.backward(loss)
        self._note_loss("discriminator", loss)
        finite = True
        if self.accelerator.sync_gradients:
            finite = self._finite_loss("discriminator") and "autoencoder" not in self.skipped
            if finite and self.accelerator.scaler is None:
                finite = bool(torch.isfinite(grad_norm(self.disc_params)))
        self._step_or_skip("discriminator", finite, self.disc_optimizer, self.disc_scheduler)
        return logs

    def _note_loss(self, model: str, loss: Tensor) -> None:
        bad = self._bad_loss[model].to(loss.device)
        self._bad_loss[model] = bad | ~torch.isfinite(loss.detach())

    def _finite_loss(self, model: str) -> bool:
        """Whether every micro-batch's loss was finite on every process (a collective call); resets the record."""
        bad = self._bad_loss[model].float().reshape(1)
        self._bad_loss[model] = torch.zeros((), dtype=torch.bool)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad.to(self.accelerator.device), reduction="sum")
        return not bool(bad.item())

    def _step_or_skip(self, model: str, finite: bool, optimizer, scheduler) -> bool:
        """Step `optimizer` and `scheduler` if `finite`, else record the skip; then drop the gradients (prepared
        optimizers and schedulers do nothing of this on accumulation micro-steps)."""
        if finite:
            optimizer.step()
            scheduler.step()
        else:
            self.skipped.append(model)
        optimizer.zero_grad(set_to_none=True)
        return finite


def grad_norm(params: list[Tensor]) -> Tensor:
    """The L2 norm of all gradients of `params` together: sqrt(sum of squared entries); 0 without gradients."""
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient (`--max_nonfinite_steps`)."""


class NonFiniteGuard:
    """Counts consecutive skipped (non-finite) steps: each one is a warning naming the batch's files; more than
    `max_consecutive` in a row is a `NonFiniteTrainingError` naming the last complete checkpoint.

    Args:
        max_consecutive: `--max_nonfinite_steps`.
        output_dir: Where the run's checkpoints are, for the error message.
    """

    def __init__(self, max_consecutive: int, output_dir: str | os.PathLike) -> None:
        self.max_consecutive, self.output_dir = max_consecutive, output_dir
        self.run = 0

    def update(self, step: int, skipped: list[str], files: list[str]) -> None:
        """After optimizer step `step`: `skipped` from `TrainStep`, `files` of this process's batches."""
        if not skipped:
            self.run = 0
            return
        self.run += 1
        logger.warning(
            f"step {step}: non-finite loss or gradient, {' and '.join(skipped)} update skipped ({self.run} in a "
            f"row); this process's batch: {', '.join(files)}"
        )
        if self.run > self.max_consecutive:
            raise NonFiniteTrainingError(
                f"{self.run} steps in a row had a non-finite loss or gradient (more than --max_nonfinite_steps "
                f"{self.max_consecutive}); stopped at step {step}. Last good checkpoint: "
                f"{latest_checkpoint(self.output_dir) or 'none'}. Lower the learning rate or check the files "
                "named in the warnings, then resume with --resume_from_checkpoint latest."
            )
