"""VA-VAE's vision-foundation (VF) alignment loss: the latent, projected by a 1x1 conv, is pulled towards the patch
features of a frozen DINOv2 (Yao et al. 2025, "Reconstruction vs. Generation: Taming Optimization Dilemma with
Vision Foundation Model Aligned Latent Diffusion Models"; code: hustvl/LightningDiT, folder `vavae/`).

    z' = W z + b                                   (`LatentProjection`, trainable; z the sampled latent)
    f  = DINOv2(x) patch tokens                    (`FoundationFeatures`, frozen, not in checkpoints)
    L_mcos = mean_ij relu(1 - m1 - cos(z'_ij, f_ij))
    L_mdms = mean_ij relu(|cos(z'_i, z'_j) - cos(f_i, f_j)| - m2)        (i, j over all h*w positions)
    L_vf   = w_mdms * L_mdms + w_mcos * L_mcos                           (`vf_loss`)
    L_ae  += vf_weight * lambda_vf * L_vf,  lambda_vf = ||grad_w L_rec|| / ||grad_w L_vf||   (`adaptive_align_weight`)

with w the encoder's last weight (`encoder.conv_out.weight`). The margins m1, m2 stop pulling once a position (or a
pair) is close enough, which leaves the latent room for reconstruction.

transformers is imported by `load_align_model` only (it takes seconds to import, and only alignment needs it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from torch import Tensor, nn

from latentvae.pretrained import OFFLINE_ENV, offline_mode

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Short names for the DINOv2 backbones on the Hugging Face Hub. VA-VAE aligns with ViT-L (`dinov2-large`, 1024
# channels; timm's `vit_large_patch14_dinov2.lvd142m` in vavae/ldm/models/foundation_models.py is the same weights).
# Register variants (facebook/dinov2-with-registers-*) load too, by repo id: FoundationFeatures drops their tokens.
ALIGN_MODELS: dict[str, str] = {
    "dinov2-small": "facebook/dinov2-small",
    "dinov2-base": "facebook/dinov2-base",
    "dinov2-large": "facebook/dinov2-large",
    "dinov2-giant": "facebook/dinov2-giant",
}
# ImageNet statistics, the `image_mean` / `image_std` of DINOv2's image processor (BitImageProcessor).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingAlignModelError(FileNotFoundError, RuntimeError):
    """The alignment model is not in the Hugging Face cache, and we are offline or the download failed.

    Attributes:
        model_id (`str`): the Hub repo id that could not be loaded, e.g. `facebook/dinov2-small`.
        cache_dir (`Path`): the Hugging Face cache it was looked for in.
    """

    def __init__(self, model_id: str, cache_dir: Path, reason: str):
        super().__init__(
            f"Missing alignment model: the vision foundation model '{model_id}' is not in the Hugging Face cache "
            f"{cache_dir} ({reason}).\n"
            f"  Fix: run `hf download {model_id}` on any machine with internet and copy its cache folder "
            f"{cache_dir} here (the folder follows $HF_HUB_CACHE / $HF_HOME; default ~/.cache/huggingface/hub), "
            f"or `hf download {model_id} --local-dir DIR` and pass --align_model DIR. It is downloaded into the "
            f"cache on first use when the network is reachable and neither {OFFLINE_ENV}=1 nor --offline is set.\n"
            "  Or: train without the alignment loss (leave out --align_model)."
        )
        self.model_id = model_id
        self.cache_dir = cache_dir


def load_align_model(
    name_or_path: str, *, offline: bool = False, cache_dir: str | Path | None = None
) -> PreTrainedModel:
    """Load a DINOv2 through transformers' own loading path (the Hugging Face cache), frozen.

    Args:
        name_or_path (`str`): a short name from `ALIGN_MODELS` (`"dinov2-large"`), a Hub repo id
            (`"facebook/dinov2-with-registers-base"`) or a local folder written by `save_pretrained` /
            `hf download --local-dir`.
        offline (`bool`): never use the network (as `$HF_HUB_OFFLINE=1` does): only the cache is read.
        cache_dir (`str` or `Path`, *optional*): the Hugging Face cache; default `huggingface_hub`'s
            `HF_HUB_CACHE` (which it reads from the environment once, when it is imported).

    Returns:
        `PreTrainedModel`: the model (a `Dinov2Model` for DINOv2 repos), in eval mode with `requires_grad=False`
        on every parameter.

    Raises:
        `MissingAlignModelError`: a repo id is not in the cache, and we are offline or the download failed.
    """
    from transformers import AutoModel

    local_only = offline_mode(offline)
    is_folder = Path(name_or_path).is_dir()
    model_id = name_or_path if is_folder else ALIGN_MODELS.get(name_or_path, name_or_path)
    cache = Path(cache_dir if cache_dir is not None else hf_constants.HF_HUB_CACHE)
    try:
        with _hub_offline(local_only):
            model = AutoModel.from_pretrained(model_id, cache_dir=cache, local_files_only=local_only)
    except OSError as err:  # not cached, unreachable, a bad repo id: transformers raises OSError for each
        if is_folder:
            raise  # a folder the user points at: transformers' own error says best what is wrong with it
        reason = f"offline: {OFFLINE_ENV}=1 or --offline" if local_only else f"the download failed: {err}"
        raise MissingAlignModelError(model_id, cache, reason) from err
    model.eval()
    model.requires_grad_(False)
    return model


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Tell huggingface_hub we are offline for the duration. It reads $HF_HUB_OFFLINE once, when it is imported,
    so a later --offline (or environment) would not reach it, and even a `local_files_only` load then asks the Hub
    for its agent-harness registry (best-effort telemetry in the request headers, huggingface_hub 2.x)."""
    previous = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = previous or offline
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = previous


class FoundationFeatures(nn.Module):
    """Patch features of a frozen DINOv2 for images in [-1, 1]: `(B, 3, H, W) -> (B, D, h, w)`, in fp32.

    The images are mapped to [0, 1], normalised with the ImageNet statistics and resized (bilinear, antialiased) so
    that the short side is `resolution` and both sides are multiples of the patch size, keeping the aspect ratio;
    the CLS and register tokens are dropped. 256 px images at the default 224 give a 16x16 grid, the latent grid of
    an f16 VAE (VA-VAE resizes to 224 x 224 too).

    The model is a constant: it never trains, `.train()` keeps it in eval mode, and its weights are left out of the
    `state_dict()` of any module this one belongs to (`load_align_model` restores them), so training checkpoints
    stay free of DINOv2. It moves with `.to()`.

    Args:
        model (`PreTrainedModel`): a DINOv2 (`Dinov2Model` or `Dinov2WithRegistersModel`), e.g. from
            `load_align_model`; frozen here.
        resolution (`int`): the short side the images are resized to, rounded to a multiple of the patch size.

    Attributes:
        feature_dim (`int`): D, the model's hidden size.
        patch_size (`int`): the model's patch size in pixels.
    """

    def __init__(self, model: PreTrainedModel, resolution: int = 224):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.resolution = resolution
        self.feature_dim: int = model.config.hidden_size
        self.patch_size: int = model.config.patch_size
        # CLS first, then the register tokens (Dinov2WithRegisters), then the patches in row-major order.
        self.num_prefix_tokens = 1 + getattr(model.config, "num_register_tokens", 0)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_state_dict_post_hook(_drop_model_keys)
        self.register_load_state_dict_pre_hook(_fill_model_keys)

    def train(self, mode: bool = True) -> FoundationFeatures:
        super().train(mode)
        self.model.eval()  # DINOv2 has dropout and drop-path; in train mode its features would be random
        return self

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The `(height, width)` the model sees: short side `resolution`, aspect kept, multiples of the patch."""
        scale = self.resolution / min(height, width)
        return tuple(
            max(1, round(side * scale / self.patch_size)) * self.patch_size for side in (height, width)
        )

    def forward(self, images: Tensor) -> Tensor:
        """`images` `(B, 3, H, W)` in [-1, 1] -> patch features `(B, D, h, w)`, fp32, without a graph."""
        size = self.resized_size(*images.shape[-2:])
        with torch.no_grad():
            x = ((images.float() + 1) / 2 - self.mean) / self.std
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            tokens = self.model(pixel_values=x.to(self.model.dtype)).last_hidden_state  # (B, P + h*w, D)
            patches = tokens[:, self.num_prefix_tokens :].float()  # (B, h*w, D)
        h, w = size[0] // self.patch_size, size[1] // self.patch_size
        return patches.transpose(1, 2).reshape(images.shape[0], self.feature_dim, h, w)


class LatentProjection(nn.Module):
    """The trainable 1x1 conv from the latent to the foundation model's channels: `(B, C, h, w) -> (B, D, h, w)`.

    Its weight is `proj.weight` (and `proj.bias` with `bias=True`), so a trainer holding it as `align_projection` checkpoints it
    under `align_projection.proj.weight`. VA-VAE's `linear_proj` (vavae/ldm/models/autoencoder.py, with
    `reverse_proj: true`) is this conv without a bias.

    Args:
        latent_channels (`int`): C, the latent's channels.
        feature_dim (`int`): D, the foundation model's hidden size (`FoundationFeatures.feature_dim`).
        bias (`bool`): learn a bias (VA-VAE's has none).
    """

    def __init__(self, latent_channels: int, feature_dim: int, bias: bool = False):
        super().__init__()
        self.proj = nn.Conv2d(latent_channels, feature_dim, kernel_size=1, bias=bias)

    def forward(self, z: Tensor) -> Tensor:
        return self.proj(z)


def vf_loss(
    latent_proj: Tensor,
    features: Tensor,
    *,
    cos_margin: float = 0.5,
    distmat_margin: float = 0.25,
    cos_weight: float = 1.0,
    distmat_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """VA-VAE's VF loss: marginal cosine similarity plus marginal distance-matrix similarity, in fp32.

    L_mcos = mean_{b,i} relu(1 - cos_margin - cos(z'_i, f_i)); L_mdms = mean_{b,i,j} relu(|cos(z'_i, z'_j) -
    cos(f_i, f_j)| - distmat_margin), cosines over channels, i and j over the N = h*w positions of each image. The
    two N x N matrices hold 2 N^2 floats per image (and as much again for the backward): 8 MiB for a 32x32 latent,
    128 MiB for a 64x64 one.

    The defaults are VA-VAE's released recipe, vavae/configs/f16d32_vfdinov2.yaml in hustvl/LightningDiT
    (`cos_margin: 0.5`, `distmat_margin: 0.25`; `distmat_weight` and `cos_weight` keep the 1.0 of
    `LPIPSWithDiscriminator` in vavae/ldm/modules/losses/contperceptual.py). Its f16d32_vfdinov2_long.yaml trains the
    first two stages with both margins 0 (full alignment) and sets 0.5 / 0.25 for the last fine-tune only.

    Args:
        latent_proj (`Tensor`): the projected latent z', `(B, D, h, w)`, with its graph.
        features (`Tensor`): the foundation features f, `(B, D, h', w')`; bilinearly resized to `(h, w)` if the
            grids differ.
        cos_margin (`float`): m1; a position adds nothing once its cosine exceeds 1 - m1.
        distmat_margin (`float`): m2; a pair adds nothing once its similarities differ by less than m2.
        cos_weight (`float`): weight of L_mcos.
        distmat_weight (`float`): weight of L_mdms.

    Returns:
        `tuple[Tensor, dict[str, Tensor]]`: `distmat_weight * L_mdms + cos_weight * L_mcos` and detached logs:
        `align_cos` (the mean cosine between z' and f, without margin), `align_mcos` and `align_mdms`.
    """
    z, f = latent_proj.float(), features.float()
    if f.shape[-2:] != z.shape[-2:]:
        # antialias changes nothing when upsampling, and averages the features when they are the finer grid
        f = F.interpolate(f, size=z.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
    if f.shape != z.shape:
        raise ValueError(
            f"latent_proj {tuple(z.shape)} and features {tuple(features.shape)} differ in B or D"
        )

    cos = F.cosine_similarity(z, f, dim=1)  # (B, h, w)
    mcos = F.relu(1 - cos_margin - cos).mean()

    z_unit = F.normalize(z.flatten(2), dim=1)  # (B, D, N)
    f_unit = F.normalize(f.flatten(2), dim=1)
    z_sim = z_unit.transpose(1, 2) @ z_unit  # (B, N, N): cos(z'_i, z'_j)
    f_sim = f_unit.transpose(1, 2) @ f_unit
    mdms = F.relu((z_sim - f_sim).abs() - distmat_margin).mean()

    loss = distmat_weight * mdms + cos_weight * mcos
    logs = {"align_cos": cos.mean(), "align_mcos": mcos, "align_mdms": mdms}
    return loss, {key: value.detach() for key, value in logs.items()}


def adaptive_align_weight(
    rec_loss: Tensor, align_loss: Tensor, last_layer: Tensor, max_weight: float = 1e8
) -> Tensor:
    """VA-VAE's adaptive VF weight: ||grad_w L_rec|| / (||grad_w L_vf|| + 1e-4), clamped to [0, max_weight].

    The balance of the GAN's adaptive weight (`latentvae.training.losses.adaptive_gan_weight`, which imports this
    module, hence not shared), taken at the encoder's last layer, `w = encoder.conv_out.weight`, where the
    alignment's gradient enters the encoder. Gradients come from `torch.autograd.grad` with `retain_graph=True`:
    nothing is written into `.grad`. Multiply by the user's weight (VA-VAE: `vf_weight: 0.1`); at validation,
    without gradients, VA-VAE uses 0.

    Args:
        rec_loss (`Tensor`): scalar reconstruction loss (the NLL, with its graph).
        align_loss (`Tensor`): scalar `vf_loss` (with its graph).
        last_layer (`Tensor`): the weight both are differentiated against, e.g. `vae.encoder.conv_out.weight`.
        max_weight (`float`): upper clamp; 1e8 as in `calculate_adaptive_weight_vf`
            (vavae/ldm/modules/losses/contperceptual.py), not the GAN's 1e4: the NLL is summed over pixels and the
            VF loss is a mean, so the ratio can well exceed 1e4.

    Returns:
        `Tensor`: detached scalar lambda.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    align_grad = torch.autograd.grad(align_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (align_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def build_alignment(
    name_or_path: str,
    latent_channels: int,
    *,
    resolution: int = 224,
    offline: bool = False,
    model: PreTrainedModel | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[FoundationFeatures, LatentProjection]:
    """The frozen feature extractor and the trainable projection for a VAE with `latent_channels` channels.

    Args:
        name_or_path (`str`): the foundation model, as `load_align_model` takes it; ignored when `model` is given.
        latent_channels (`int`): the VAE's latent channels.
        resolution (`int`): the short side the foundation model sees (`FoundationFeatures`).
        offline (`bool`): never use the network.
        model (`PreTrainedModel`, *optional*): a model to use instead of loading one (tests: a random tiny DINOv2).
        cache_dir (`str` or `Path`, *optional*): the Hugging Face cache (see `load_align_model`).

    Returns:
        `tuple[FoundationFeatures, LatentProjection]`: the features module and a fresh projection to its channels.

    Raises:
        `MissingAlignModelError`: see `load_align_model`.
    """
    if model is None:
        model = load_align_model(name_or_path, offline=offline, cache_dir=cache_dir)
    features = FoundationFeatures(model, resolution=resolution)
    return features, LatentProjection(latent_channels, features.feature_dim)


def _drop_model_keys(module: FoundationFeatures, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "model.")]:
        del state_dict[key]


def _fill_model_keys(module: FoundationFeatures, state_dict: dict, prefix: str, *args) -> None:
    # Loading a checkpoint without the DINOv2 keys: supply the module's own (constant) weights, so that strict
    # loading stays strict for every other key.
    for name, value in module.model.state_dict().items():
        state_dict.setdefault(f"{prefix}model.{name}", value)
