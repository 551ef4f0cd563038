"""The PatchGAN discriminator of pix2pix, as taming-transformers / latent-diffusion train their autoencoders with.

It maps an image to a grid of real/fake logits, one per overlapping receptive-field patch (70x70 for 3 layers), so
the GAN term judges local texture and leaves global structure to the reconstruction and perceptual losses.
Module names (`main.0`, `main.2`, ...) follow the CompVis layout, so a discriminator stored in an original
checkpoint under `loss.discriminator.` loads with `load_state_dict` after stripping that prefix.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator: `n_layers` stride-2 4x4 convolutions, one stride-1, then 1-channel patch logits.

    BatchNorm and distributed training: the CompVis recipe trains this discriminator with plain BatchNorm under
    DDP, i.e. each process normalises with its own batch statistics. Keep it that way: do not convert it with
    `nn.SyncBatchNorm.convert_sync_batchnorm` (it would add collective calls to every discriminator forward, of
    which there are three per step, and it does not run on CPU processes). The running statistics are never used
    because the discriminator is only ever run in train mode; DDP broadcasting them from rank 0 is harmless.
    With very small per-process batches, `norm="none"` removes the dependence on batch statistics altogether.

    Args:
        input_nc (`int`): image channels.
        ndf (`int`): channels of the first convolution; doubled at each further layer, capped at 8 x ndf.
        n_layers (`int`): number of stride-2 convolutions (3 gives the 70x70-patch discriminator).
        norm (`str`): `"batch"` (the recipe) or `"none"`.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "none"):
            raise ValueError(f"norm must be 'batch' or 'none', got {norm!r}")
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {n_layers}")
        # A conv followed by BatchNorm needs no bias: BatchNorm's shift replaces it.
        use_bias = norm == "none"

        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        channels = ndf
        for n in range(1, n_layers + 1):
            out_channels = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden conv keeps the resolution
            layers.append(nn.Conv2d(channels, out_channels, 4, stride=stride, padding=1, bias=use_bias))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.LeakyReLU(0.2, True))
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: Tensor) -> Tensor:
        """Patch logits: `(B, input_nc, H, W)` -> `(B, 1, H', W')`; positive means "real"."""
        return self.main(images)


def _init_weights(module: nn.Module) -> None:
    # DCGAN / pix2pix initialisation, as in the CompVis code: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02).
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss: 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]).

    Args:
        logits_real (`Tensor`): discriminator logits on real images (any shape).
        logits_fake (`Tensor`): discriminator logits on reconstructions (any shape).

    Returns:
        `Tensor`: scalar loss.
    """
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Non-saturating (binary cross-entropy) discriminator loss: 0.5 * (E[softplus(-D(x))] + E[softplus(D(x_hat))]).

    Args:
        logits_real (`Tensor`): discriminator logits on real images (any shape).
        logits_fake (`Tensor`): discriminator logits on reconstructions (any shape).

    Returns:
        `Tensor`: scalar loss.
    """
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
