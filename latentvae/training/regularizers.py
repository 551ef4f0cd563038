"""Latent-space regularisers beyond the KL, each a flag, each off by default (`RegularizerSettings`):

    equivariance (EQ-VAE):   with probability p per batch, T = a random downscale (and rotation):
                             L_eq = w * NLL(T(x), decode(T(z)))            (the same pixel + LPIPS terms)
    latent low-pass:         L_lp = w * NLL(blur_f(x), decode(blur_f(z)))  (blur_f: down by f, back up, bilinear)
    latent anchoring:        L_anchor = w * sum_{C,h,w} (n(mu) - n(mu_0))^2, mean over the batch
                             (mu_0: the posterior mean of a frozen copy of the starting model, n: its normalisation)
    alignment (VA-VAE):      L_vf = w * lambda_adaptive * VF(proj(z), DINOv2(x))      (`latentvae.training.alignment`)

The image-space terms (equivariance, low-pass) are pairs `(prediction, target)` that `GaussianAutoencoding.forward`
returns and `AutoencoderLoss` scores with the reconstruction loss, so that every decode runs inside DDP's forward
and its gradients are averaged over processes. Their NLL is summed over pixels like the main term's, then scaled
by the ratio of pixel counts, so a weight of 1 gives a pixel of T(x) the weight a pixel of x has.

Where they come from: EQ-VAE (Kouzelis et al. 2025) regularises a VAE so that decoding commutes with scaling and
rotation of the latent; Skorokhodov et al. 2025 ("Improving the diffusability of autoencoders") show that latents
carry high-frequency content the image does not need, and suppress it by asking the decoder to reconstruct
low-passed images from low-passed latents. The low-pass term here keeps the resolution (blur, not downscale): the
downscaling form is the equivariance term with `--equivariance_rotations` off.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentvae.evaluation.latent_health import normalise_latents


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RegularizerSettings:
    """The regularisers' flags (a base of `TrainConfig`: each field is a `training/train.py` flag)."""

    equivariance_prob: float = _f(
        0.0,
        "EQ-VAE equivariance: the share of batches (0..1) on which a random downscale (and rotation) T is applied "
        "to the latent and to the image and decode(T(z)) is trained towards T(x) (0 = off).",
    )
    equivariance_weight: float = _f(
        1.0, "Weight of the equivariance reconstruction term (per pixel, against the main term's 1)."
    )
    equivariance_scales: str = _f(
        "0.25,0.75",
        "Range 'lo,hi' of the equivariance downscaling factor (uniform; the latent keeps at least 1 position).",
    )
    equivariance_anisotropic: bool = _f(
        False, "Draw the equivariance scale of each axis independently (default: one factor for both)."
    )
    equivariance_rotations: bool = _f(
        False, "Also rotate by a random multiple of 90 degrees (0, 90, 180 or 270) in the equivariance term."
    )
    latent_anchor_weight: float = _f(
        0.0,
        "Latent anchoring for encoder fine-tunes: weight of the squared distance (summed over the latent, like the "
        "KL) between the normalised posterior means and those of a frozen copy of the starting model (0 = off).",
    )
    align_model: str | None = _f(
        None,
        "VA-VAE alignment: the frozen vision model whose patch features the latent is aligned to: dinov2-small, "
        "dinov2-base, dinov2-large, dinov2-giant, a Hub id or a local folder (transformers; default: off).",
    )
    align_weight: float = _f(
        0.1,
        "Weight of the alignment (VF) loss, times the adaptive weight when --align_adaptive (VA-VAE: 0.1).",
    )
    align_adaptive: bool = _f(
        True,
        "Scale the alignment loss so its gradient at the encoder's last layer matches the reconstruction's "
        "(VA-VAE's adaptive weight).",
    )
    align_resolution: int = _f(224, "Short side the images are resized to for the vision model.")
    align_cos_margin: float = _f(0.5, "VA-VAE margin m1 of the cosine-similarity loss.")
    align_distmat_margin: float = _f(0.25, "VA-VAE margin m2 of the distance-matrix loss.")
    latent_lowpass_weight: float = _f(
        0.0,
        "Latent low-pass: weight of reconstructing the low-passed image from the low-passed latent (down by "
        "--latent_lowpass_factor and back up), which discourages high-frequency latent content (0 = off).",
    )
    latent_lowpass_factor: int = _f(2, "Factor of the latent low-pass (>= 2).")

    def check_regularizers(self) -> None:
        """Raise `ValueError` naming the flag for values that cannot work."""
        if not 0 <= self.equivariance_prob <= 1:
            raise ValueError(f"--equivariance_prob must be in [0, 1], got {self.equivariance_prob}")
        low, high = equivariance_range(self.equivariance_scales)
        if not 0 < low <= high < 1:
            raise ValueError(
                f"--equivariance_scales must be 'lo,hi' with 0 < lo <= hi < 1 (downscaling), got {self.equivariance_scales!r}"
            )
        for name in ("equivariance_weight", "latent_anchor_weight", "align_weight", "latent_lowpass_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.latent_lowpass_factor < 2:
            raise ValueError(f"--latent_lowpass_factor must be >= 2, got {self.latent_lowpass_factor}")


def check_regularizer_flags(config: Any) -> None:
    """Regulariser flags that cannot act on this run (a `TrainConfig`) stop it (`SystemExit` naming the flag)."""
    try:
        config.check_regularizers()
    except ValueError as error:
        raise SystemExit(str(error)) from None
    encoder_terms = [
        flag
        for flag, on in (
            ("--latent_anchor_weight", config.latent_anchor_weight > 0),
            ("--align_model", config.align_model),
        )
        if on
    ]
    if encoder_terms and config.model == "vq":
        raise SystemExit(
            f"{' and '.join(encoder_terms)} regularise a Gaussian latent: use --model kl or flux2"
        )
    if encoder_terms and config.decoder_only:
        raise SystemExit(
            f"{' and '.join(encoder_terms)} act on the encoder, which --decoder_only freezes (its latent drift is "
            "zero by construction)"
        )
    if config.recipe == "eq-finetune" and not config.pretrained_model_name_or_path:
        raise SystemExit(
            "--recipe eq-finetune fine-tunes an existing VAE: give it with --pretrained_model_name_or_path"
        )
    if config.latent_anchor_weight > 0 and not config.pretrained_model_name_or_path:
        raise SystemExit(
            "--latent_anchor_weight anchors the latents to the starting model's: give it with "
            "--pretrained_model_name_or_path"
        )


def regularized(settings: RegularizerSettings) -> bool:
    """Whether any latent-space regulariser is on."""
    return (
        settings.equivariance_prob > 0
        or settings.latent_anchor_weight > 0
        or bool(settings.align_model)
        or settings.latent_lowpass_weight > 0
    )


def equivariance_range(text: str) -> tuple[float, float]:
    """'lo,hi' (or one number) -> (lo, hi)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--equivariance_scales must be 'lo,hi', e.g. '0.25,0.75', got {text!r}") from None
    if len(values) not in (1, 2):
        raise ValueError(f"--equivariance_scales must be 'lo,hi', e.g. '0.25,0.75', got {text!r}")
    return values[0], values[-1]


# ----- equivariance: one transform T, applied alike to the latent and to the image -----


@dataclass(frozen=True)
class Transform:
    """Downscale to `size` latent positions (h, w), then rotate by `quarter_turns` x 90 degrees."""

    size: tuple[int, int]
    quarter_turns: int = 0

    def __call__(self, t: Tensor, factor: int = 1) -> Tensor:
        """Apply to `t` (B, C, H, W) whose grid is `factor` times the latent's (1: the latent; 8: its image).

        Area interpolation (an average over each output cell's footprint, exact average pooling at integer
        factors), so a downscaled image is not aliased; the latent is resized the same way, so both keep one
        geometry: T(x) has exactly `factor` x the size of T(z)."""
        size = (self.size[0] * factor, self.size[1] * factor)
        if tuple(t.shape[-2:]) != size:
            t = F.interpolate(t, size=size, mode="area")
        return torch.rot90(t, self.quarter_turns, (-2, -1)) if self.quarter_turns else t


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def sample_transform(
    latent_size: tuple[int, int], settings: RegularizerSettings, generator: torch.Generator | None = None
) -> Transform | None:
    """With probability `equivariance_prob`, a random `Transform` for latents of `latent_size` (else None).

    Draws from `generator` (the step's seeded CPU generator, after the posterior noise), so a resumed run applies
    the same transforms."""
    if settings.equivariance_prob <= 0:
        return None
    if float(torch.rand((), generator=generator)) >= settings.equivariance_prob:
        return None
    low, high = equivariance_range(settings.equivariance_scales)
    scale_h = _uniform(generator, low, high)
    scale_w = _uniform(generator, low, high) if settings.equivariance_anisotropic else scale_h
    size = (max(1, round(latent_size[0] * scale_h)), max(1, round(latent_size[1] * scale_w)))
    turns = int(torch.randint(4, (), generator=generator)) if settings.equivariance_rotations else 0
    return Transform(size, turns)


# ----- low-pass -----


def lowpass(t: Tensor, factor: int) -> Tensor:
    """Down by `factor` (area), back up to the same size (bilinear): only frequencies below 1/(2 factor) remain."""
    small = F.interpolate(t, size=(max(1, t.shape[-2] // factor), max(1, t.shape[-1] // factor)), mode="area")
    return F.interpolate(small, size=t.shape[-2:], mode="bilinear", align_corners=False)


# ----- anchoring -----


class FrozenAnchor(nn.Module):
    """A frozen copy of the starting model's encoder (decoder dropped), giving its normalised posterior means.

    Its weights stay out of `state_dict()` (of any module holding it): they are the starting model, which a resumed
    run loads again from `--pretrained_model_name_or_path`, so checkpoints stay as small as without anchoring."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        start = copy.deepcopy(vae)
        start.decoder = None
        if getattr(start, "post_quant_conv", None) is not None:
            start.post_quant_conv = None
        self.start = start.eval().requires_grad_(False)
        self.register_state_dict_post_hook(_drop_own_keys)
        self.register_load_state_dict_pre_hook(_fill_own_keys)

    def train(self, mode: bool = True) -> FrozenAnchor:
        return super().train(False)  # always eval

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Normalised posterior means of the starting model, `(B, C, h, w)`, in fp32."""
        mean = self.start.encode(images).latent_dist.mean.float()
        return normalise_latents(self.start, mean)

    def normalise(self, mean: Tensor) -> Tensor:
        """Another model's posterior means in the starting model's normalisation (what its diffusion model sees)."""
        return normalise_latents(self.start, mean.float())


def anchor_distance(mean: Tensor, anchor: Tensor) -> Tensor:
    """Squared distance between normalised latents, summed over C, h, w and averaged over the batch (as the KL)."""
    return (mean.float() - anchor.float()).pow(2).sum() / mean.shape[0]


def _drop_own_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _fill_own_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    # A checkpoint without these keys loads strictly: the frozen weights are supplied from the module itself.
    # (named_parameters / named_buffers, not state_dict(), whose hook above would drop them.)
    for name, value in [*module.named_parameters(), *module.named_buffers()]:
        state_dict.setdefault(prefix + name, value)


def pixel_ratio(full: Tensor, part: Tensor) -> float:
    """How many pixels `full` has per pixel of `part` (both `(B, C, H, W)`)."""
    return math.prod(full.shape[-2:]) / math.prod(part.shape[-2:])
