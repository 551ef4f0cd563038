"""The vector-quantised autoencoder of LDM's VQ first stages, as a drop-in for `diffusers.VQModel`."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.autoencoders.vq_model import VQEncoderOutput

# A pipeline saved with this model names this module in model_index.json, and diffusers' loader checks a passed
# component against the base classes it finds here by name (ModelMixin): keep it importable from this module.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import Tensor, nn

from latentvae.models.base import DiffusersTwin
from latentvae.models.blocks import Decoder, Encoder, check_block_types
from latentvae.models.presets import VQ_PRESETS
from latentvae.models.quantizer import VectorQuantizer


class VQModel(DiffusersTwin):
    r"""A VQ-VAE: images in [-1, 1] -> latents -> nearest codebook vectors -> images.

    Constructor arguments, defaults, `state_dict()` keys and outputs are those of `diffusers.VQModel` (with group
    norm), so weights move between the two with `strict=True` and diffusers' LDM pipelines accept it as `vqvae`.
    The encoder and decoder are the same blocks as `AutoencoderKL`'s; the encoder predicts the latent itself (no
    log-variance half), and `quantize` (a `latentvae.VectorQuantizer`) sits between `quant_conv` and
    `post_quant_conv`.

    Args:
        in_channels / out_channels (`int`): image channels (3).
        down_block_types / up_block_types (`tuple[str]`): one "DownEncoderBlock2D" / "UpDecoderBlock2D" per level;
            L levels downsample by 2^(L-1).
        block_out_channels (`tuple[int]`): width of each level.
        layers_per_block (`int`): resnets per encoder level (the decoder has one more).
        act_fn (`str`): activation in the resnets.
        latent_channels (`int`): channels of the encoder output and the decoder input.
        sample_size (`int`): nominal image size (recorded in the config).
        num_vq_embeddings (`int`): codebook size K.
        norm_num_groups (`int`): GroupNorm groups.
        vq_embed_dim (`int`, *optional*): code dimension (default `latent_channels`); `quant_conv` maps to it.
        scaling_factor (`float`): pipelines multiply latents by it.
        norm_type (`str`): "group" only; diffusers' "spatial" (MoVQ, Kandinsky) also needs attention levels that
            these blocks do not build, so such models stay with `diffusers.VQModel`.
        mid_block_add_attention (`bool`): self-attention in the bottleneck.
        lookup_from_codebook (`bool`): `decode(indices, force_not_quantize=True, shape=...)` takes code indices.
        force_upcast (`bool`): tells pipelines to run this model in fp32.
    """

    diffusers_class_name = "VQModel"
    presets = VQ_PRESETS
    pipeline_component = "vqvae"
    _supports_gradient_checkpointing = True
    _no_split_modules = ["ResnetBlock"]
    # As diffusers: layerwise casting (fp8 storage) must leave the codebook alone.
    _skip_layerwise_casting_patterns = ["quantize"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 3,
        sample_size: int | tuple[int, int] = 32,
        num_vq_embeddings: int = 256,
        norm_num_groups: int = 32,
        vq_embed_dim: int | None = None,
        scaling_factor: float = 0.18215,
        norm_type: str = "group",
        mid_block_add_attention: bool = True,
        lookup_from_codebook: bool = False,
        force_upcast: bool = False,
    ):
        super().__init__()
        check_block_types(down_block_types, up_block_types, len(block_out_channels))
        if norm_type != "group":
            raise ValueError(
                f"norm_type={norm_type!r} is not supported by latentvae.VQModel (only 'group'); spatially "
                "conditioned norms (MoVQ) load with diffusers.VQModel"
            )
        # Shared by encoder and decoder: (widths, resnets per level, norm groups, activation, mid attention).
        shape = (
            tuple(block_out_channels),
            layers_per_block,
            norm_num_groups,
            act_fn,
            mid_block_add_attention,
        )
        embed_dim = vq_embed_dim if vq_embed_dim is not None else latent_channels
        # Top-level modules in diffusers' order, so state_dict() lists them as diffusers does.
        self.encoder = Encoder(in_channels, latent_channels, *shape, double_z=False)
        self.quant_conv = nn.Conv2d(latent_channels, embed_dim, 1)
        self.quantize = VectorQuantizer(num_vq_embeddings, embed_dim, beta=0.25)
        self.post_quant_conv = nn.Conv2d(embed_dim, latent_channels, 1)
        self.decoder = Decoder(latent_channels, out_channels, *shape)

    @apply_forward_hook
    def encode(self, x: Tensor, return_dict: bool = True) -> VQEncoderOutput | tuple[Tensor]:
        """Encode images into latents, before quantisation (what LDM's diffusion models are trained on).

        Args:
            x (`Tensor`): images (B, C, H, W) in [-1, 1].
            return_dict (`bool`): return a `VQEncoderOutput` (else a 1-tuple).

        Returns:
            `VQEncoderOutput` whose `latents` are (B, vq_embed_dim, H / f, W / f).
        """
        h = self.quant_conv(self.encoder(x))
        return VQEncoderOutput(latents=h) if return_dict else (h,)

    def decode_quantized(self, quant: Tensor) -> Tensor:
        """`post_quant_conv` and the decoder on latents that are already codebook vectors: what `decode` runs
        after its quantiser (and the training step after calling the quantiser itself)."""
        return self.decoder(self.post_quant_conv(quant))

    @apply_forward_hook
    def decode(
        self,
        h: Tensor,
        force_not_quantize: bool = False,
        return_dict: bool = True,
        shape: tuple[int, ...] | None = None,
    ) -> DecoderOutput | tuple[Tensor, Tensor]:
        """Quantise latents (unless told not to) and decode them.

        Args:
            h (`Tensor`): latents (B, vq_embed_dim, h, w) from `encode` (unscaled), or with `lookup_from_codebook`
                and `force_not_quantize` code indices.
            force_not_quantize (`bool`): decode `h` as given (or look the indices up), without the quantiser.
            return_dict (`bool`): return a `DecoderOutput` (else `(sample, commit_loss)`).
            shape: (B, h, w, vq_embed_dim) of the latent when decoding indices.

        Returns:
            `DecoderOutput` with `sample` (images) and `commit_loss` (the quantiser's loss; zeros of shape (B,)
            when not quantising).
        """
        if not force_not_quantize:
            quant, commit_loss, _ = self.quantize(h)
        else:
            if self.config.lookup_from_codebook:
                quant = self.quantize.get_codebook_entry(h, shape)
            else:
                quant = h
            commit_loss = torch.zeros(h.shape[0], device=h.device, dtype=h.dtype)
        dec = self.decode_quantized(quant)
        return DecoderOutput(sample=dec, commit_loss=commit_loss) if return_dict else (dec, commit_loss)

    def forward(self, sample: Tensor, return_dict: bool = True) -> DecoderOutput | tuple[Tensor, Tensor]:
        """Reconstruct through the codebook: encode, quantise, decode.

        Args:
            sample (`Tensor`): images in [-1, 1].
            return_dict (`bool`): return a `DecoderOutput` (else `(sample, commit_loss)`).
        """
        dec = self.decode(self.encode(sample).latents)
        return dec if return_dict else (dec.sample, dec.commit_loss)
