"""The reconstruction objective: the CompVis `LPIPSWithDiscriminator` recipe, as two explicit losses.

    autoencoder step:     L_ae = NLL(x, x_hat) + lambda * disc_factor * L_g   (+ the latent regulariser's L_reg,
                                 the KL or the quantiser loss, from `latentvae.training.autoencoding`)
    discriminator step:   L_d  = disc_factor * hinge(D(x), D(x_hat.detach()))

The trainer owns both optimizers and steps them itself; each loss returns `(loss, logs)` with `logs` a dict of
detached scalar tensors (call `.item()` when logging, not every step on the GPU's critical path).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from latentvae.models.discriminator import D_LOSSES
from latentvae.training.alignment import adaptive_align_weight
from latentvae.training.regularizers import pixel_ratio

PIXEL_LOSSES = ("mse", "l1")
IMAGE_TERMS = ("equivariance", "lowpass")  # auxiliary reconstructions, scored like the main one
# Pixels: LPIPS' VGG, AlexNet and SqueezeNet backbones pool smaller images to nothing.
MIN_PERCEPTUAL_SIZE = 32


def adaptive_gan_weight(
    nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4
) -> Tensor:
    """Weight that balances the GAN term against the reconstruction term at the decoder's last layer.

    lambda = ||grad_w NLL|| / (||grad_w L_g|| + 1e-4), clamped to [0, max_weight], w = `last_layer` (Esser et al.,
    Taming Transformers). Both graphs are kept (`retain_graph=True`) for the caller's backward pass; the
    gradients are taken with `torch.autograd.grad`, so nothing is written into `.grad`.

    Args:
        nll_loss (`Tensor`): scalar reconstruction loss (with its graph).
        g_loss (`Tensor`): scalar generator loss (with its graph).
        last_layer (`Tensor`): the weight both losses are differentiated against, e.g. `decoder.conv_out.weight`.
        max_weight (`float`): upper clamp.

    Returns:
        `Tensor`: detached scalar lambda.
    """
    return adaptive_align_weight(nll_loss, g_loss, last_layer, max_weight)  # the same gradient-norm ratio


class AutoencoderLoss(nn.Module):
    """Reconstruction (pixel + LPIPS) NLL and adaptive-weight PatchGAN losses, for either latent kind.

    Reduction (as in CompVis' `LPIPSWithDiscriminator`, so the SD weights mean the same thing here): the per-element
    reconstruction term `rec = pixel(x, x_hat) + perceptual_weight * LPIPS(x, x_hat)` (the per-image LPIPS distance
    broadcast over the pixels) is turned into `nll = rec / exp(logvar) + logvar` and SUMMED over C, H, W, then
    averaged over the batch; `GaussianAutoencoding` likewise sums the KL over the latent's C, H, W, so
    `kl_weight=1e-6` is the SD kl-f8 regularisation strength (the diffusers training example reduces the same
    way). Per-element means instead would make the same `kl_weight` about C*H*W times stronger. The loss is
    therefore large (~1e4 at 256 px): harmless for Adam, and the 1e4 clamp of the adaptive weight assumes it.

    `logvar` is the scalar log-variance of a Gaussian decoder likelihood (init 0). With `learn_logvar=False` it
    stays 0 and `nll = rec`: this is what CompVis actually trained, because their optimizer never received it.
    With `learn_logvar=True` it is a parameter that the trainer must add to the autoencoder optimizer
    (`autoencoder_parameters()`) and, under DDP, synchronise (`all_reduce_logvar_grad()`).

    The LPIPS module is a frozen submodule: it moves with `.to()`, is kept in eval mode by `.train()`, and is left
    out of `state_dict()` (it is rebuilt from the lpips package and the hub cache), so checkpoints hold `logvar`
    only.

    Args:
        perceptual_loss (`nn.Module`, *optional*): frozen LPIPS (see `latentvae.pretrained.build_lpips`), called
            as `perceptual_loss(x, x_hat) -> (B, 1, 1, 1)`. Required when `perceptual_weight > 0`.
        perceptual_weight (`float`): weight of LPIPS relative to the pixel loss (SD: 1.0; ft-MSE: 0.1). 0 disables.
        recon_loss (`str`): per-element pixel loss, `"mse"` or `"l1"` (the CompVis recipe uses l1).
        chroma_weight (`float`): for RGB images, the error's chroma part (its component orthogonal to grey,
            `e - mean_c(e)`) is scaled by `sqrt(chroma_weight)` before the pixel loss, so that with MSE the loss is
            `|e_grey|^2 + chroma_weight * |e_chroma|^2`. 1.0 is the plain loss.
        learn_logvar (`bool`): learn the scalar log-variance.
        disc_weight (`float`): weight of the GAN term on top of the adaptive weight; 0 disables the GAN entirely
            (the discriminator is then never run).
        disc_start (`int`): first global step at which the discriminator is run and trained.
        disc_factor (`float`): multiplies both the generator and the discriminator loss once active.
        disc_loss (`str`): discriminator loss, `"hinge"` or `"vanilla"`.
        max_adaptive_weight (`float`): clamp of the adaptive weight.
        align_weight (`float`): weight of the alignment (VF) loss when the model returns one (VA-VAE: 0.1).
        align_adaptive (`bool`): times VA-VAE's adaptive weight (gradient-norm ratio at the encoder's last layer).
    """

    def __init__(
        self,
        perceptual_loss: nn.Module | None = None,
        perceptual_weight: float = 1.0,
        recon_loss: str = "mse",
        chroma_weight: float = 1.0,
        learn_logvar: bool = False,
        disc_weight: float = 0.5,
        disc_start: int = 50001,
        disc_factor: float = 1.0,
        disc_loss: str = "hinge",
        max_adaptive_weight: float = 1e4,
        align_weight: float = 0.1,
        align_adaptive: bool = True,
    ):
        super().__init__()
        if recon_loss not in PIXEL_LOSSES:
            raise ValueError(f"recon_loss must be one of {PIXEL_LOSSES}, got {recon_loss!r}")
        if disc_loss not in D_LOSSES:
            raise ValueError(f"disc_loss must be one of {tuple(D_LOSSES)}, got {disc_loss!r}")
        if perceptual_weight > 0 and perceptual_loss is None:
            raise ValueError(
                f"perceptual_weight={perceptual_weight} needs an LPIPS module (latentvae.pretrained.build_lpips); "
                "pass perceptual_weight=0 to train without the perceptual term"
            )
        if perceptual_weight < 0:
            raise ValueError(f"perceptual_weight must be >= 0, got {perceptual_weight}")
        if chroma_weight <= 0:
            raise ValueError(f"chroma_weight must be > 0, got {chroma_weight}")
        self.perceptual_loss = perceptual_loss if perceptual_weight > 0 else None
        self.perceptual_weight = perceptual_weight
        self.recon_loss = recon_loss
        self.chroma_weight = chroma_weight
        self.learn_logvar = learn_logvar
        self.logvar = nn.Parameter(torch.zeros(()), requires_grad=learn_logvar)
        self.disc_weight = disc_weight
        self.disc_start = disc_start
        self.disc_factor = disc_factor
        self.d_loss_fn = D_LOSSES[disc_loss]
        self.max_adaptive_weight = max_adaptive_weight
        self.align_weight, self.align_adaptive = align_weight, align_adaptive
        # Keep the frozen LPIPS weights out of checkpoints: they are constants that build_lpips restores.
        self.register_state_dict_post_hook(_drop_perceptual_keys)
        self.register_load_state_dict_pre_hook(_fill_perceptual_keys)

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        """The loss's own trainable parameters, which belong in the autoencoder optimizer: `[logvar]` or `[]`."""
        return [self.logvar] if self.learn_logvar else []

    def all_reduce_logvar_grad(self) -> None:
        """Average `logvar.grad` over processes; call after backward, before clipping and the optimizer step.

        DDP averages the autoencoder's gradients, but this module is not DDP-wrapped (only its `logvar` trains),
        so without this call each process would step its own `logvar` and the copies would drift apart. It is a
        no-op without `torch.distributed` or when `logvar` has no gradient.
        """
        grad = self.logvar.grad
        if grad is None or not (dist.is_available() and dist.is_initialized()):
            return
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # AVG is NCCL-only; SUM then divide works on gloo too
        grad.div_(dist.get_world_size())

    def train(self, mode: bool = True) -> AutoencoderLoss:
        super().train(mode)
        if self.perceptual_loss is not None:
            # LPIPS has dropout before its linear layers; in train mode the perceptual loss would be random.
            self.perceptual_loss.eval()
        return self

    def discriminator_active(self, global_step: int) -> bool:
        """Whether the GAN is on at `global_step`: `disc_weight > 0`, `disc_factor > 0` and `step >= disc_start`."""
        return self.disc_weight > 0 and self.disc_factor > 0 and global_step >= self.disc_start

    def autoencoder_loss(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        global_step: int,
        *,
        last_layer: Tensor | None = None,
        discriminator: nn.Module | None = None,
        auxiliary: dict[str, Any] | None = None,
        align_layer: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The autoencoder's reconstruction loss: NLL (+ lambda * disc_factor * generator loss once active), plus
        the auxiliary terms of the latent-space regularisers (`latentvae.training.regularizers`).

        Args:
            inputs (`Tensor`): images in [-1, 1], `(B, C, H, W)`.
            reconstructions (`Tensor`): decoder output, same shape, with its graph (LPIPS and GAN gradients flow
                into it).
            global_step (`int`): optimizer step, compared with `disc_start`.
            last_layer (`Tensor`, *optional*): the decoder's last weight (`decoder.conv_out.weight`) for the adaptive
                weight; required while the discriminator is active and gradients are enabled.
            discriminator (`nn.Module`, *optional*): required while the discriminator is active; not called before.
                Its parameters receive gradients from this loss's backward pass (its optimizer is not stepped
                here): zero them before the discriminator's own backward. Under DDP pass the unwrapped module
                here (those gradients are discarded, so there is nothing to all-reduce) and the wrapped one to
                `discriminator_loss`.
            auxiliary (`dict`, *optional*): the model's `aux` output: `"equivariance"` / `"lowpass"` pairs
                `(prediction, target, weight)`, scored with this NLL (scaled by the pixel-count ratio, never the
                GAN), and `"align"`, `(vf_loss, logs)`, added with `align_weight` (times VA-VAE's adaptive weight).
            align_layer (`Tensor`, *optional*): the encoder's last weight, for the alignment's adaptive weight.

        Returns:
            `tuple[Tensor, dict[str, Tensor]]`: the scalar loss and detached logs: `loss`, `pixel_loss` and
            `rec_loss` (per-element means), `perceptual_loss` (mean LPIPS), `nll_loss` (the summed NLL that enters
            the loss), `logvar`, and once the discriminator is
            active `g_loss` and `d_weight` (lambda including `disc_weight`; 0 when gradients are disabled); with
            auxiliary terms `equivariance_loss`, `lowpass_loss`, `align_loss`, `align_weight`, `align_cos`.
        """
        nll_loss, logs = self.nll(inputs, reconstructions)
        loss = nll_loss
        logs["logvar"] = self.logvar
        aux = auxiliary or {}
        for name in IMAGE_TERMS:
            if name in aux:
                prediction, target, weight = aux[name]
                # Summed over fewer pixels than the main term: scaled so a pixel of T(x) weighs what one of x does.
                # LPIPS' backbones need 32 px or more: a smaller T(x) is scored by its pixel loss alone.
                perceptual = min(target.shape[-2:]) >= MIN_PERCEPTUAL_SIZE
                term = self.nll(target, prediction, perceptual=perceptual)[0] * pixel_ratio(inputs, target)
                loss = loss + weight * term
                logs[f"{name}_loss"] = term
        if "align" in aux:
            align_loss, align_logs = aux["align"]
            weight = torch.tensor(self.align_weight, device=loss.device)
            if self.align_adaptive and torch.is_grad_enabled():
                if align_layer is None:
                    raise ValueError(
                        "align_layer (e.g. encoder.conv_out.weight) is needed for the adaptive weight"
                    )
                weight = weight * adaptive_align_weight(nll_loss, align_loss, align_layer)
            loss = loss + weight * align_loss
            logs.update(align_logs, align_loss=align_loss, align_weight=weight)

        if self.discriminator_active(global_step):
            if discriminator is None:
                raise ValueError(f"the discriminator is active at step {global_step} but none was passed")
            g_loss = -discriminator(reconstructions.float()).float().mean()  # generator loss: -E[D(x_hat)]
            if torch.is_grad_enabled():
                if last_layer is None:
                    raise ValueError(
                        "last_layer (e.g. decoder.conv_out.weight) is needed for the adaptive weight"
                    )
                lam = adaptive_gan_weight(nll_loss, g_loss, last_layer, self.max_adaptive_weight)
                d_weight = self.disc_weight * lam
            else:
                # Validation: no gradients to balance; leave the GAN term out, as CompVis does.
                d_weight = torch.zeros((), device=loss.device)
            loss = loss + d_weight * self.disc_factor * g_loss
            logs["g_loss"] = g_loss
            logs["d_weight"] = d_weight

        logs["loss"] = loss
        return loss, {key: value.detach() for key, value in logs.items()}

    def nll(
        self, inputs: Tensor, reconstructions: Tensor, perceptual: bool = True
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The NLL (pixel + LPIPS unless `perceptual` is False, the learned variance), summed over C, H, W and
        averaged over the batch, with its graph; and logs `pixel_loss`, `rec_loss` (per-element means),
        `perceptual_loss`, `nll_loss`."""
        if inputs.shape != reconstructions.shape:
            raise ValueError(
                f"inputs {tuple(inputs.shape)} and reconstructions {tuple(reconstructions.shape)} differ"
            )
        # Losses in fp32 even under autocast: the sums below run over ~1e5 elements per image.
        inputs, reconstructions = inputs.float(), reconstructions.float()
        logs: dict[str, Tensor] = {}
        error = inputs - reconstructions
        if self.chroma_weight != 1.0 and error.shape[1] == 3:
            grey = error.mean(dim=1, keepdim=True)
            error = grey + (error - grey) * self.chroma_weight**0.5
        rec = error.pow(2) if self.recon_loss == "mse" else error.abs()
        logs["pixel_loss"] = rec.mean()
        if self.perceptual_loss is not None and perceptual:
            # Gradients must reach the decoder and encoder through LPIPS: no torch.no_grad() here.
            p_loss = self.perceptual_loss(inputs, reconstructions).float()  # (B, 1, 1, 1)
            rec = rec + self.perceptual_weight * p_loss
            logs["perceptual_loss"] = p_loss.mean()
        logs["rec_loss"] = rec.mean()
        # Gaussian decoder likelihood with a scalar learned variance: nll = rec / sigma^2 + log sigma^2
        nll = rec / torch.exp(self.logvar) + self.logvar
        nll_loss = nll.sum() / inputs.shape[0]
        logs["nll_loss"] = nll_loss
        return nll_loss, logs

    def discriminator_loss(
        self, inputs: Tensor, reconstructions: Tensor, discriminator: nn.Module, global_step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The discriminator's loss on real images and detached reconstructions.

        Inputs and reconstructions are detached here, so its backward pass reaches the discriminator only and
        never writes into the autoencoder's gradients. Before `disc_start` (or with the GAN off) the discriminator
        is not run and the loss is a zero without a graph: skip the backward pass and the step
        (`discriminator_active(global_step)` says which).

        Args:
            inputs (`Tensor`): real images in [-1, 1].
            reconstructions (`Tensor`): decoder output (its graph is ignored).
            discriminator (`nn.Module`): the discriminator (DDP-wrapped or not).
            global_step (`int`): optimizer step, compared with `disc_start`.

        Returns:
            `tuple[Tensor, dict[str, Tensor]]`: the scalar loss and detached logs `disc_loss`, and when active
            `logits_real` and `logits_fake` (mean logits).
        """
        if not self.discriminator_active(global_step):
            zero = torch.zeros((), device=inputs.device)
            return zero, {"disc_loss": zero}
        # Two separate forwards, as CompVis: with BatchNorm each batch is normalised with its own statistics.
        logits_real = discriminator(inputs.detach()).float()
        logits_fake = discriminator(reconstructions.detach()).float()
        loss = self.disc_factor * self.d_loss_fn(logits_real, logits_fake)
        logs = {"disc_loss": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return loss, {key: value.detach() for key, value in logs.items()}


def _drop_perceptual_keys(
    module: AutoencoderLoss, state_dict: dict, prefix: str, local_metadata: dict
) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "perceptual_loss.")]:
        del state_dict[key]


def _fill_perceptual_keys(module: AutoencoderLoss, state_dict: dict, prefix: str, *args) -> None:
    # Loading a checkpoint without the LPIPS keys: supply the module's own (constant) weights, so that strict
    # loading stays strict for every other key.
    if module.perceptual_loss is not None:
        for name, value in module.perceptual_loss.state_dict().items():
            state_dict.setdefault(f"{prefix}perceptual_loss.{name}", value)
