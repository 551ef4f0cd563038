"""The KL-regularised autoencoder of Stable Diffusion, as a drop-in for `diffusers.AutoencoderKL`."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import Tensor, nn

from latentvae.blocks import Decoder, Encoder
from latentvae.distributions import DiagonalGaussianDistribution
from latentvae.presets import PRESETS
from latentvae.tiling import tiled_apply


class AutoencoderKL(ModelMixin, ConfigMixin):
    r"""A VAE with a KL-regularised diagonal-Gaussian latent: images in [-1, 1] <-> unscaled latents.

    Constructor arguments, defaults, `state_dict()` keys and outputs are those of `diffusers.AutoencoderKL`, so weights
    move between the two with `strict=True` and a diffusers pipeline accepts this model as its `vae`.

    Args:
        in_channels / out_channels (`int`): image channels (3).
        down_block_types / up_block_types (`tuple[str]`): one entry per level ("DownEncoderBlock2D" /
            "UpDecoderBlock2D"); the number of levels L gives a downsampling factor of 2^(L-1).
        block_out_channels (`tuple[int]`): width of each level.
        layers_per_block (`int`): resnets per encoder level (the decoder has one more).
        act_fn (`str`): activation in the resnets.
        latent_channels (`int`): channels of z; the encoder predicts twice as many (mean and log-variance).
        norm_num_groups (`int`): GroupNorm groups.
        sample_size (`int`): images larger than this are tiled when tiling is enabled.
        scaling_factor (`float`): pipelines multiply latents by this (1 / std of the latents on training data).
        shift_factor, latents_mean, latents_std: optional latent normalisation read by some pipelines (SD3, FLUX).
        force_upcast (`bool`): tells pipelines to run this VAE in fp32 even when the rest runs in fp16.
        use_quant_conv / use_post_quant_conv (`bool`): the 1x1 convs around the latent.
        mid_block_add_attention (`bool`): self-attention in the bottleneck.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["ResnetBlock"]

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
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        levels = len(block_out_channels)
        for name, types, kind in (
            ("down", down_block_types, "DownEncoderBlock2D"),
            ("up", up_block_types, "UpDecoderBlock2D"),
        ):
            if len(types) != levels or any(t != kind for t in types):
                raise ValueError(
                    f"{name}_block_types must be {levels} x {kind!r} (one per level), got {tuple(types)}"
                )
        # Shared by encoder and decoder: (widths, resnets per level, norm groups, activation, mid attention).
        shape = (
            tuple(block_out_channels),
            layers_per_block,
            norm_num_groups,
            act_fn,
            mid_block_add_attention,
        )
        self.encoder = Encoder(in_channels, latent_channels, *shape)
        self.decoder = Decoder(latent_channels, out_channels, *shape)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

        self.use_slicing = False
        self.use_tiling = False
        size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        self.tile_sample_size = int(size)
        self.tile_overlap = 0.25

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> AutoencoderKL:
        """A randomly initialised model of the named shape (see `latentvae.PRESETS`), with any argument overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_diffusers(cls, vae: ModelMixin) -> AutoencoderKL:
        """This class with the weights and config of a `diffusers.AutoencoderKL` (strict key match)."""
        model = cls.from_config(vae.config)
        model.load_state_dict(vae.state_dict(), strict=True)
        return model.to(device=vae.device, dtype=vae.dtype)

    def to_diffusers(self) -> ModelMixin:
        """The same weights in a stock `diffusers.AutoencoderKL`.

        Use it before `pipeline.save_pretrained(...)`: diffusers records each component's library in
        `model_index.json`, and a folder that names `diffusers` loads anywhere, without latentvae installed.
        """
        import diffusers

        model = diffusers.AutoencoderKL.from_config(self.config)
        model.load_state_dict(self.state_dict(), strict=True)
        return model.to(device=self.device, dtype=self.dtype)

    @property
    def downsampling_factor(self) -> int:
        """Pixels per latent position along each side: 2^(levels - 1), as pipelines compute `vae_scale_factor`."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    # -- memory-saving switches -------------------------------------------------------------------------------------

    def enable_slicing(self) -> None:
        """Encode and decode one batch element at a time (identical results, lower peak memory)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, tile_size: int | None = None, overlap: float | None = None) -> None:
        """Encode and decode images larger than `tile_size` pixels as overlapping, blended tiles.

        Args:
            tile_size: tile side in image pixels (default `config.sample_size`); a multiple of the downsampling factor.
            overlap: fraction of a tile shared with each neighbour (default 0.25).
        """
        if tile_size is not None:
            if tile_size % self.downsampling_factor:
                raise ValueError(f"tile_size {tile_size} must be a multiple of {self.downsampling_factor}")
            self.tile_sample_size = int(tile_size)
        if overlap is not None:
            self.tile_overlap = float(overlap)
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    # -- encode / decode --------------------------------------------------------------------------------------------

    def _encode(self, x: Tensor) -> Tensor:
        """Image -> moments [mean, logvar] (B, 2C, H/f, W/f)."""
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_size:
            f = self.downsampling_factor
            return tiled_apply(self._encode_tile, x, self.tile_sample_size, self.tile_overlap, 1 / f, align=f)
        return self._encode_tile(x)

    def _encode_tile(self, x: Tensor) -> Tensor:
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _decode(self, z: Tensor) -> Tensor:
        """Unscaled latent -> image."""
        f = self.downsampling_factor
        tile = self.tile_sample_size // f
        if self.use_tiling and max(z.shape[-2:]) > tile:
            return tiled_apply(self._decode_tile, z, tile, self.tile_overlap, f)
        return self._decode_tile(z)

    def _decode_tile(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    @apply_forward_hook
    def encode(
        self, x: Tensor, return_dict: bool = True
    ) -> AutoencoderKLOutput | tuple[DiagonalGaussianDistribution]:
        """Encode images into the posterior q(z|x).

        Args:
            x (`Tensor`): images (B, C, H, W) in [-1, 1].
            return_dict (`bool`): return an `AutoencoderKLOutput` (else a 1-tuple).

        Returns:
            `AutoencoderKLOutput` whose `latent_dist` is a `DiagonalGaussianDistribution`.
        """
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode(part) for part in x.split(1)])
        else:
            moments = self._encode(x)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    @apply_forward_hook
    def decode(
        self, z: Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> DecoderOutput | tuple[Tensor]:
        """Decode unscaled latents into images.

        Args:
            z (`Tensor`): latents (B, latent_channels, h, w), already divided by `scaling_factor`.
            return_dict (`bool`): return a `DecoderOutput` (else a 1-tuple).
            generator: accepted for pipeline compatibility; decoding is deterministic.

        Returns:
            `DecoderOutput` whose `sample` is the image batch in (approximately) [-1, 1].
        """
        if self.use_slicing and z.shape[0] > 1:
            images = torch.cat([self._decode(part) for part in z.split(1)])
        else:
            images = self._decode(z)
        return DecoderOutput(sample=images) if return_dict else (images,)

    def forward(
        self,
        sample: Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> DecoderOutput | tuple[Tensor]:
        """Reconstruct: encode, take the posterior mode (or a sample), decode.

        Args:
            sample (`Tensor`): images in [-1, 1].
            sample_posterior (`bool`): decode z ~ q(z|x) instead of its mode.
            return_dict (`bool`): return a `DecoderOutput` (else a 1-tuple).
            generator: RNG for the posterior sample.
        """
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)
