"""The VQ autoencoder in the training loop: the module DDP wraps, the quantiser's share of the loss, and the setup.

    autoencoder step:  x -> DDP(encode, quantise, decode) -> x_hat, quantiser terms
                       L_ae = AutoencoderLoss(x, x_hat, posterior=None)          NLL (+ lambda * L_g), no KL term
                              + codebook_weight * C*H*W * L_vq                  L_vq = codebook + beta x commitment

The rest of training is the KL model's: the same `AutoencoderLoss` (LPIPS, discriminator, adaptive weight), the
same `TrainStep`, EMA of the weights, validation and export. What differs lives here:

- `VQReconstruction` replaces `training_step.Reconstruction`: the quantiser runs inside DDP's forward, so its
  codebook gradients (or its all-reduced EMA statistics) are averaged like every other weight's.
- `quantizer_loss` scales the quantiser's per-element mean by the image's C*H*W: `AutoencoderLoss` sums its NLL
  over C, H, W (the CompVis reduction), while taming's `VQLPIPSWithDiscriminator`, whose recipe LDM's VQ models
  use, takes per-element means of both; the factor keeps taming's balance, so `codebook_weight=1.0` means what
  it means in LDM's vq-f4 config.
- `configure_vq_training` attaches the quantiser's training state (EMA codebook, dead-code restarts, usage
  window). That state is not in the model's `state_dict`; register the returned tracker with
  `accelerator.register_for_checkpointing` so a resumed run continues it exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from latentvae.quantizer import CodebookTracker
from latentvae.vq_model import VQModel


class VQReconstruction(nn.Module):
    """x -> (reconstruction through the codebook, the quantiser's loss terms): the module DDP wraps for a VQ model.

    The terms are a dict of scalars (a plain dict survives Accelerate's output conversion and DDP): `loss` (with
    its graph), and detached `codebook_loss`, `commitment_loss`, `perplexity`, `batch_usage` and, with a tracker,
    `codebook_usage` (fraction of codes used in the tracker's window) and `codes_restarted`.
    """

    def __init__(self, vae: VQModel):
        super().__init__()
        self.vae = vae

    def forward(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        # `generator` is the KL module's posterior-noise RNG; quantisation is deterministic and draws nothing.
        h = self.vae.encode(images).latents
        quantized = self.vae.quantize(h, return_dict=True)
        recon = self.vae.decode_quantized(quantized.quantized)
        terms = {
            "loss": quantized.loss,
            "codebook_loss": quantized.codebook_loss,
            "commitment_loss": quantized.commitment_loss,
            "perplexity": quantized.perplexity,
            "batch_usage": quantized.usage,
        }
        tracker = self.vae.quantize.tracker
        if tracker is not None:
            terms["codebook_usage"] = tracker.window_usage()
            terms["codes_restarted"] = torch.tensor(float(tracker.restarted), device=h.device)
        return recon, terms


def quantizer_loss(
    terms: Mapping[str, Tensor], images: Tensor, codebook_weight: float = 1.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """The quantiser's share of the autoencoder loss, on `AutoencoderLoss`'s scale (see the module docstring).

    Args:
        terms: `VQReconstruction`'s second output.
        images: the batch `(B, C, H, W)` (for the C*H*W factor).
        codebook_weight: weight of the quantiser loss relative to the reconstruction NLL (LDM vq-f4: 1.0).

    Returns:
        `(loss, logs)`: `codebook_weight * C*H*W * terms["loss"]` with its graph, and detached logs `vq_loss` (that
        value) plus every other term.
    """
    if codebook_weight < 0:
        raise ValueError(f"codebook_weight must be >= 0, got {codebook_weight}")
    loss = codebook_weight * images[0].numel() * terms["loss"].float()
    logs = {key: value.detach() for key, value in terms.items() if key != "loss"}
    logs["vq_loss"] = loss.detach()
    return loss, logs


def configure_vq_training(
    vae: VQModel,
    *,
    beta: float = 0.25,
    legacy: bool = False,
    ema_decay: float = 0.0,
    restart_after: int = 0,
    usage_window: int = 100,
    decoder_only: bool = False,
    seed: int = 0,
) -> CodebookTracker:
    """Set the quantiser up for training; call before `accelerator.prepare`.

    Args:
        vae: the model to train.
        beta: commitment weight.
        legacy: taming's weighting (beta on the codebook term, 1 on the commitment term), which diffusers' and
            LDM's checkpoints were trained with; default the paper's (1 on the codebook term, beta on commitment).
        ema_decay: update the codebook by EMA with this decay instead of by the codebook loss (0: loss).
        restart_after: re-seed codes unused for this many steps from the batch's encoder outputs (0: never).
        usage_window: steps over which `codebook_usage` counts codes as used.
        decoder_only: the codebook stays fixed (with the encoder, which the caller freezes).
        seed: seed of the restart draws (a function of seed and step, so resumed runs draw the same).

    Returns:
        The `CodebookTracker` to register for checkpointing.
    """
    if decoder_only and (ema_decay > 0 or restart_after > 0):
        raise ValueError(
            "decoder-only training keeps the codebook fixed: EMA codebook updates and code restarts need "
            f"codebook_ema_decay 0 and codebook_restart_steps 0 (got {ema_decay} and {restart_after})"
        )
    tracker = vae.quantize.configure_training(
        beta=beta,
        legacy=legacy,
        ema_decay=ema_decay,
        restart_after=restart_after,
        usage_window=usage_window,
        seed=seed,
    )
    if decoder_only:
        vae.quantize.requires_grad_(False)  # after configure_training, which sets the codebook's flag
    return tracker
