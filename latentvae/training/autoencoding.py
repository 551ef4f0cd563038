"""The module DDP wraps: images -> (reconstruction, the latent regulariser's loss, its logs), one interface for the
Gaussian latent of `AutoencoderKL` and the codebook latent of `VQModel`, so the training step never asks which.

    Gaussian:  x -> encode -> q(z|x) = N(mu, diag sigma^2) -> z = mu + sigma * eps -> decode -> x_hat
               L_reg = kl_weight * KL(q(z|x) || N(0, I)), summed over the latent's C, H, W, averaged over the batch
    VQ:        x -> encode -> z_q = nearest code (straight-through gradient) -> decode -> x_hat
               L_reg = codebook_weight * C*H*W * (codebook + beta x commitment)

The training loss is `AutoencoderLoss` (NLL + GAN) of `(x, x_hat)` plus `L_reg`. Both regularisers are computed
inside `forward`, so every weight with a gradient (encoder, decoder, codebook) is reached through DDP's forward
and its gradient is averaged over processes. So are the optional latent-space regularisers
(`latentvae.training.regularizers`): latent anchoring joins `L_reg`; the equivariance and low-pass decodes and the
alignment loss are returned as `aux` for `AutoencoderLoss` to score:

    forward(x, generator) -> (x_hat, L_reg, logs, aux)
    aux = {"equivariance": (decode(T(z)), T(x), w), "lowpass": (decode(blur(z)), blur(x), w), "align": (L_vf, logs)}

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
from latentvae.training.alignment import build_alignment, vf_loss
from latentvae.training.config import TrainConfig
from latentvae.training.regularizers import (
    FrozenAnchor,
    RegularizerSettings,
    anchor_distance,
    lowpass,
    sample_transform,
)


class Autoencoding(nn.Module):
    """`forward(images, generator=None) -> (reconstruction, regulariser loss, detached logs, aux)` around `vae`
    (`aux`: the auxiliary terms in the module docstring, `{}` without them).

    `training_state()` lists the objects beyond the model's `state_dict` that a resumed run needs (register each
    with `accelerator.register_for_checkpointing`).
    """

    def __init__(self, vae: nn.Module, settings: RegularizerSettings | None = None):
        super().__init__()
        self.vae = vae
        self.settings = settings

    def training_state(self) -> list[Any]:
        return []

    def last_layer(self) -> Tensor:
        """The decoder's last weight, where the GAN's adaptive weight balances its gradient against the NLL's."""
        return self.vae.decoder.conv_out.weight

    def encoder_last_layer(self) -> Tensor:
        """The encoder's last weight, where the alignment loss's adaptive weight balances it against the NLL."""
        return self.vae.encoder.conv_out.weight

    def image_terms(
        self, z: Tensor, images: Tensor, decode: Any, generator: torch.Generator | None
    ) -> dict[str, tuple[Tensor, Tensor, float]]:
        """The equivariance and low-pass pairs (prediction, target, weight) for latents `z` that `decode` decodes."""
        settings, aux = self.settings, {}
        if settings is None:
            return aux
        transform = sample_transform(tuple(z.shape[-2:]), settings, generator)
        if transform is not None:
            factor = images.shape[-1] // z.shape[-1]
            aux["equivariance"] = (
                decode(transform(z)),
                transform(images, factor),
                settings.equivariance_weight,
            )
        if settings.latent_lowpass_weight > 0:
            f = settings.latent_lowpass_factor
            aux["lowpass"] = (decode(lowpass(z, f)), lowpass(images, f), settings.latent_lowpass_weight)
        return aux


def gaussian_kl(moments: Tensor) -> Tensor:
    """KL(q(z|x) || N(0, I)) in fp32 from the encoder's moments `(B, 2C, h, w)`: the closed form
    0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2) over C, h, w, averaged over the batch."""
    return DiagonalGaussianDistribution(moments.float()).kl().float().sum() / moments.shape[0]


class GaussianAutoencoding(Autoencoding):
    """A KL autoencoder (`AutoencoderKL`, ours or diffusers', `AutoencoderKLFlux2` too): reconstruct from a posterior
    sample, KL-regularised (and with `settings`, the latent-space regularisers).

    Args:
        vae: the model to train (after freezing its encoder, for a decoder-only run).
        kl_weight: weight of the KL term (SD kl-f8: 1e-6, with the reductions in the module docstring).
        settings: the regularisers' flags (default: all off).
        anchor: keep a frozen copy of `vae` as it is now (the start of a fine-tune) even without the anchoring
            loss, for the latent drift reported at validation.
        align_model: a vision model for the alignment term instead of loading `settings.align_model` (tests).
        offline: never download the alignment model.
    """

    def __init__(
        self,
        vae: nn.Module,
        kl_weight: float = 1e-6,
        settings: RegularizerSettings | None = None,
        *,
        anchor: bool = False,
        align_model: nn.Module | None = None,
        offline: bool = False,
    ):
        super().__init__(vae, settings)
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
        self.kl_weight = kl_weight
        self.anchor_weight = settings.latent_anchor_weight if settings is not None else 0.0
        # The start of the fine-tune, frozen (out of the state_dict: a resume rebuilds it from the same file): for
        # the anchoring loss, and for the latent drift that validation reports on any fine-tune of the encoder.
        self.anchor = FrozenAnchor(vae) if anchor or self.anchor_weight > 0 else None
        self.align_features = self.align_projection = None
        if settings is not None and (settings.align_model or align_model is not None):
            self.align_features, self.align_projection = build_alignment(
                settings.align_model,
                vae.config.latent_channels,
                resolution=settings.align_resolution,
                offline=offline,
                model=align_model,
            )

    def forward(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Any]]:
        moments = self.vae.encode(images).latent_dist.parameters  # (B, 2 * latent_channels, h, w)
        posterior = DiagonalGaussianDistribution(moments)
        z = posterior.sample(generator)  # z = mu + sigma * eps
        kl = gaussian_kl(moments)
        reg, logs, aux = self.kl_weight * kl, {"kl_loss": kl.detach()}, {}
        if self.anchor_weight > 0:
            drift = anchor_distance(self.anchor.normalise(posterior.mean), self.anchor(images))
            reg = reg + self.anchor_weight * drift
            logs["anchor_loss"] = drift.detach()
        if self.align_projection is not None:
            aux["align"] = vf_loss(
                self.align_projection(z),
                self.align_features(images),
                cos_margin=self.settings.align_cos_margin,
                distmat_margin=self.settings.align_distmat_margin,
            )
        aux.update(self.image_terms(z, images, lambda t: self.vae.decode(t).sample, generator))
        return self.vae.decode(z).sample, reg, logs, aux


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
        settings: RegularizerSettings | None = None,
    ):
        super().__init__(vae, settings)
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
    ) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Any]]:
        # `generator` is the Gaussian posterior's noise; quantisation is deterministic and draws nothing (the
        # equivariance term draws its transforms from it).
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
        aux = self.image_terms(quantized.quantized, images, self.vae.decode_quantized, generator)
        return recon, loss, {key: value.detach() for key, value in logs.items()}, aux


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
            settings=cfg,
        )
    if isinstance(vae, AutoencoderKL):
        fine_tune = bool(cfg.pretrained_model_name_or_path) and not cfg.decoder_only
        return GaussianAutoencoding(vae, cfg.kl_weight, cfg, anchor=fine_tune, offline=cfg.offline)
    raise TypeError(
        f"cannot train a {type(vae).__name__}: training/train.py trains AutoencoderKL (AutoencoderKLFlux2 too) and VQModel"
    )
