"""The module DDP wraps: images -> (reconstruction, the latent regulariser's loss, its logs), one interface for the
Gaussian latent of `AutoencoderKL` and the codebook latent of `VQModel`, so the training step never asks which.

    Gaussian:  x -> encode -> q(z|x) = N(mu, diag sigma^2) -> z = mu + sigma * eps -> decode -> x_hat
               L_reg = kl_weight * KL(q(z|x) || N(0, I)), summed over the latent's C, H, W, averaged over the batch
    VQ:        x -> encode -> z_q = nearest code (straight-through gradient) -> decode -> x_hat
               L_reg = codebook_weight * C*H*W * (codebook + beta x commitment)

The training loss is `AutoencoderLoss` (NLL + GAN) of `(x, x_hat)` plus `L_reg`. Both regularisers are computed
inside `forward`, so every weight with a gradient (encoder, decoder, codebook) is reached through DDP's forward
and its gradient is averaged over processes.

Reductions: `AutoencoderLoss` sums its NLL over C, H, W (the CompVis reduction, which `kl_weight=1e-6` assumes);
taming's `VQLPIPSWithDiscriminator`, whose recipe LDM's VQ models use, takes per-element means of both its NLL and
its quantiser loss. The C*H*W factor keeps taming's balance, so `codebook_weight=1.0` means what it does in LDM's
vq-f4 config.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from latentvae.models.autoencoder_kl import AutoencoderKL
from latentvae.models.distributions import DiagonalGaussianDistribution
from latentvae.models.vq_model import VQModel
from latentvae.training.config import TrainConfig


class Autoencoding(nn.Module):
    """`forward(images, generator=None) -> (reconstruction, regulariser loss, detached logs)` around `vae`.

    `training_state()` lists the objects beyond the model's `state_dict` that a resumed run needs (register each
    with `accelerator.register_for_checkpointing`).
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def training_state(self) -> list[Any]:
        return []

    def last_layer(self) -> Tensor:
        """The decoder's last weight, where the GAN's adaptive weight balances its gradient against the NLL's."""
        return self.vae.decoder.conv_out.weight


def gaussian_kl(moments: Tensor) -> Tensor:
    """KL(q(z|x) || N(0, I)) in fp32 from the encoder's moments `(B, 2C, h, w)`: the closed form
    0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2) over C, h, w, averaged over the batch."""
    return DiagonalGaussianDistribution(moments.float()).kl().float().sum() / moments.shape[0]


class GaussianAutoencoding(Autoencoding):
    """A KL autoencoder (`AutoencoderKL`, ours or diffusers', `AutoencoderKLFlux2` too): reconstruct from a posterior
    sample, KL-regularised.

    Args:
        vae: the model to train.
        kl_weight: weight of the KL term (SD kl-f8: 1e-6, with the reductions in the module docstring).
    """

    def __init__(self, vae: nn.Module, kl_weight: float = 1e-6):
        super().__init__(vae)
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
        self.kl_weight = kl_weight

    def forward(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        moments = self.vae.encode(images).latent_dist.parameters  # (B, 2 * latent_channels, h, w)
        z = DiagonalGaussianDistribution(moments).sample(generator)  # z = mu + sigma * eps
        kl = gaussian_kl(moments)
        return self.vae.decode(z).sample, self.kl_weight * kl, {"kl_loss": kl.detach()}


class VQAutoencoding(Autoencoding):
    """A VQ autoencoder (`VQModel`): reconstruct through the codebook; the quantiser's loss regularises.

    Sets the quantiser up for training (call before `accelerator.prepare`). Its training state (EMA codebook,
    dead-code restarts, usage window) is not in the model's `state_dict`: it is `training_state()`.

    Args:
        vae: the model to train (after freezing its encoder, for a decoder-only run).
        codebook_weight: weight of the quantiser loss relative to the NLL (LDM vq-f4: 1.0).
        beta: commitment weight.
        legacy: taming's weighting (beta on the codebook term, 1 on the commitment term), which diffusers' and
            LDM's checkpoints were trained with; default the paper's (1 on the codebook term, beta on commitment).
        ema_decay: update the codebook by EMA with this decay instead of by the codebook loss (0: loss).
        restart_after: re-seed codes unused for this many steps from the batch's encoder outputs (0: never).
        usage_window: steps over which `codebook_usage` counts codes as used.
        decoder_only: the codebook stays fixed (with the encoder, which the caller freezes).
        seed: seed of the restart draws (a function of seed and step, so resumed runs draw the same).
    """

    def __init__(
        self,
        vae: VQModel,
        codebook_weight: float = 1.0,
        *,
        beta: float = 0.25,
        legacy: bool = False,
        ema_decay: float = 0.0,
        restart_after: int = 0,
        usage_window: int = 100,
        decoder_only: bool = False,
        seed: int = 0,
    ):
        super().__init__(vae)
        if codebook_weight < 0:
            raise ValueError(f"codebook_weight must be >= 0, got {codebook_weight}")
        if decoder_only and (ema_decay > 0 or restart_after > 0):
            raise ValueError(
                "decoder-only training keeps the codebook fixed: EMA codebook updates and code restarts need "
                f"codebook_ema_decay 0 and codebook_restart_steps 0 (got {ema_decay} and {restart_after})"
            )
        self.codebook_weight = codebook_weight
        self.tracker = vae.quantize.configure_training(
            beta=beta,
            legacy=legacy,
            ema_decay=ema_decay,
            restart_after=restart_after,
            usage_window=usage_window,
            seed=seed,
        )
        if decoder_only:
            vae.quantize.requires_grad_(False)  # after configure_training, which sets the codebook's flag

    def training_state(self) -> list[Any]:
        return [self.tracker]

    def forward(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        # `generator` is the Gaussian posterior's noise; quantisation is deterministic and draws nothing.
        h = self.vae.encode(images).latents
        quantized = self.vae.quantize(h, return_dict=True)
        recon = self.vae.decode_quantized(quantized.quantized)
        loss = self.codebook_weight * images[0].numel() * quantized.loss.float()
        logs = {
            "vq_loss": loss,
            "codebook_loss": quantized.codebook_loss,
            "commitment_loss": quantized.commitment_loss,
            "perplexity": quantized.perplexity,
            "batch_usage": quantized.usage,
            "codebook_usage": self.tracker.window_usage(),  # share of codes used in the tracker's window
            "codes_restarted": torch.tensor(float(self.tracker.restarted), device=h.device),
        }
        return recon, loss, {key: value.detach() for key, value in logs.items()}


def build_autoencoding(vae: nn.Module, cfg: TrainConfig) -> Autoencoding:
    """The module to train for `vae`, its regulariser configured from `cfg`."""
    if isinstance(vae, VQModel):
        return VQAutoencoding(
            vae,
            cfg.codebook_weight,
            beta=cfg.commitment_beta,
            legacy=cfg.legacy_vq_loss,
            ema_decay=cfg.codebook_ema_decay,
            restart_after=cfg.codebook_restart_steps,
            usage_window=cfg.codebook_usage_window,
            decoder_only=cfg.decoder_only,
            seed=cfg.seed,
        )
    if isinstance(vae, AutoencoderKL):
        return GaussianAutoencoding(vae, cfg.kl_weight)
    raise TypeError(
        f"cannot train a {type(vae).__name__}: training/train.py trains AutoencoderKL (AutoencoderKLFlux2 too) and VQModel"
    )
