"""The KL-regularised autoencoder of Stable Diffusion, as a drop-in for `diffusers.AutoencoderKL`."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput

# A pipeline saved with this model names this module in model_index.json, and diffusers' loader checks a passed
# component against the base classes it finds here by name (ModelMixin): keep it importable from this module.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import Tensor, nn

from latentvae.models.base import DiffusersTwin
from latentvae.models.blocks import Decoder, Encoder, check_block_types
from latentvae.models.distributions import DiagonalGaussianDistribution
from latentvae.models.groupnorm_stats import SharedStatistics
from latentvae.models.presets import PRESETS
from latentvae.models.tiling import (
    activation_peak_bytes,
    available_memory_bytes,
    receptive_margin,
    tiled_apply,
)


class AutoencoderKL(DiffusersTwin):
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

    diffusers_class_name = "AutoencoderKL"
    presets = PRESETS
    pipeline_component = "vae"
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
        sample_size: int | tuple[int, int] = 32,
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
        self._build()

    def _build(self) -> None:
        """The encoder, the quant convs, the decoder (whose widths may differ from the encoder's,
        `decoder_block_out_channels`) and the tiling switches, from `self.config`, which @register_to_config fills
        before the constructor's body runs (diffusers' own models read it there too): the body that
        `AutoencoderKLFlux2` shares, around a config of its own."""
        c = self.config
        block_out_channels = tuple(c.block_out_channels)
        decoder_block_out_channels = tuple(c.get("decoder_block_out_channels") or block_out_channels)
        check_block_types(c.down_block_types, c.up_block_types, len(block_out_channels))
        if len(decoder_block_out_channels) != len(block_out_channels):
            raise ValueError(
                f"decoder_block_out_channels {decoder_block_out_channels} must have one width per level, "
                f"as block_out_channels {block_out_channels}"
            )
        # Shared by encoder and decoder: (resnets per level, norm groups, activation, mid attention).
        shape = (c.layers_per_block, c.norm_num_groups, c.act_fn, c.mid_block_add_attention)
        latent = c.latent_channels
        self.decoder_widths = decoder_block_out_channels
        self.encoder = Encoder(c.in_channels, latent, block_out_channels, *shape)
        self.decoder = Decoder(latent, c.out_channels, decoder_block_out_channels, *shape)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if c.use_post_quant_conv else None

        self.use_slicing = False
        self.use_tiling = False
        size = c.sample_size[0] if isinstance(c.sample_size, (list, tuple)) else c.sample_size
        self.tile_sample_size = int(size)
        self.tile_memory_budget: int | str | None = "auto"  # see enable_tiling
        self.tile_statistics = "exact"  # see enable_tiling

    # -- memory-saving switches -------------------------------------------------------------------------------------

    def enable_slicing(self) -> None:
        """Encode and decode one batch element at a time (identical results, lower peak memory)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, tile_size: int | None = None, statistics: str | None = None) -> None:
        """Encode and decode images larger than `tile_size` pixels in tiles that give the untiled result.

        Unlike diffusers' tiling, every tile runs with a halo of its neighbours' input as wide as the receptive field
        of what it runs and keeps only its own box of the output (no blending, no zero padding inside the image), every
        tile is normalised with the GroupNorm statistics of the whole image (measured over the tiles, one GroupNorm
        per pass, each pass stopping at the GroupNorm it measures) and the bottleneck (mid block, with its
        attention) runs on the whole latent: a tiled decode equals the untiled one up to float rounding. The
        measuring passes cost time (eval/results/benchmark.md). Meant for inference: under autograd the
        whole-image statistics are constants.

        Even with tiling off, inference (no autograd) tiles an image when the estimated untiled peak memory
        (`untiled_peak_bytes`) exceeds `tile_memory_budget`: bytes, `"auto"` (the default: half of the memory
        available on the model's device when the call starts; CUDA free memory, or Linux `MemAvailable` on CPU) or
        None (never).

        Args:
            tile_size: tile side in image pixels (default `config.sample_size`); a multiple of the downsampling factor.
            statistics: `"exact"` (the default) measures the whole-image statistics as described; `"sampled"` (the
                fast mode) measures those of the GroupNorms fed by a convolution or an upsampler on every other row
                and column, computing only those outputs of that layer: fewer recomputed FLOPs, statistics with a
                sampling error (57-59 dB PSNR against untiled instead of ~100: eval/results/benchmark.md). Kept for
                later calls, as `tile_memory_budget` is.
        """
        if statistics is not None:
            if statistics not in ("exact", "sampled"):
                raise ValueError(f"statistics must be 'exact' or 'sampled', got {statistics!r}")
            self.tile_statistics = statistics
        if tile_size is not None:
            if tile_size % self.downsampling_factor:
                raise ValueError(f"tile_size {tile_size} must be a multiple of {self.downsampling_factor}")
            self.tile_sample_size = int(tile_size)
        self.use_tiling = True

    def disable_tiling(self) -> None:
        """Stop tiling images by size; set `tile_memory_budget = None` to stop tiling by memory too."""
        self.use_tiling = False

    def untiled_peak_bytes(self, shape: tuple[int, ...], decode: bool = True) -> int:
        """Estimated peak activation memory of an untiled decode (or encode) of images of `shape` (B, C, H, W)."""
        widths = self.decoder_widths if decode else self.config.block_out_channels
        return activation_peak_bytes(widths, shape, self.dtype.itemsize, decoder=decode)

    def _should_tile(self, image_shape: tuple[int, ...], decode: bool) -> bool:
        # Without resampling levels everything runs at the latent's resolution, untiled (see _tiled_encode).
        if self.downsampling_factor == 1 or max(image_shape[-2:]) <= self.tile_sample_size:
            return False
        if self.use_tiling:
            return True
        if torch.is_grad_enabled():  # memory-triggered tiling is for inference only
            return False
        if any(side % self.downsampling_factor for side in image_shape[-2:]):
            return False  # the tile grid needs sides divisible by the downsampling factor: run untiled, as called
        budget = self._memory_budget()
        return budget is not None and self.untiled_peak_bytes(image_shape, decode) > budget

    def _memory_budget(self) -> int | None:
        """`tile_memory_budget` in bytes, `"auto"` resolved now; None: no limit."""
        if self.tile_memory_budget == "auto":
            available = available_memory_bytes(self.device)
            return None if available is None else available // 2
        return self.tile_memory_budget

    # -- encode / decode --------------------------------------------------------------------------------------------

    def _encode(self, x: Tensor) -> Tensor:
        """Image -> moments [mean, logvar] (B, 2C, H/f, W/f)."""
        if self._should_tile(x.shape, decode=False):
            return self._tiled_encode(x)
        return self._encode_whole(x)

    def _encode_whole(self, x: Tensor) -> Tensor:
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _decode(self, z: Tensor) -> Tensor:
        """Unscaled latent -> image."""
        f = self.downsampling_factor
        if self._should_tile((*z.shape[:-2], z.shape[-2] * f, z.shape[-1] * f), decode=True):
            return self._tiled_decode(z)
        return self._decode_whole(z)

    def _decode_whole(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    # Tiled passes follow the order of Encoder.forward / Decoder.forward. Every level above the latent's resolution
    # runs on tiles with whole-image GroupNorm statistics; what runs at the latent's resolution, the bottleneck with
    # its attention included, runs on the whole latent, as untiled. Each pass over the tiles recomputes everything
    # from the last tensor kept whole, so a level runs one residual block at a time (the resampler, the first and the
    # last layers attached to the block next to them), each block's output kept whole, where the memory budget has
    # room for that; otherwise the whole level is one stage, kept whole only at its ends: less memory, more passes.
    # A tile has the same size in pixels of its level at every level: low-resolution levels simply get fewer tiles.

    def _tiled_encode(self, x: Tensor) -> Tensor:
        if any(side % self.downsampling_factor for side in x.shape[-2:]):
            height, width = x.shape[-2:]
            raise ValueError(
                f"tiled encode needs image sides divisible by {self.downsampling_factor}, got {height}x{width}: pad "
                "or crop the image, or call disable_tiling()"
            )
        e, levels = self.encoder, self.encoder.down_blocks
        h = x
        for i, level in enumerate(levels[:-1]):
            width = level.resnets[-1].conv2.out_channels
            stages = [[resnet] for resnet in level.resnets]
            if not self._fits_blocks_whole(h, width, 1):
                stages = [[*level.resnets]]
            stages[0] = [e.conv_in, *stages[0]] if i == 0 else stages[0]
            stages[-1] = [*stages[-1], level.downsamplers[0]]
            for j, stage in enumerate(stages):
                h = self._tiled_stage(stage, h, self.tile_sample_size, 0.5 if j == len(stages) - 1 else 1)
        h = e.conv_out(e.conv_act(e.conv_norm_out(e.mid_block(levels[-1](h)))))
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _tiled_decode(self, z: Tensor) -> Tensor:
        d, levels = self.decoder, self.decoder.up_blocks
        h = self.post_quant_conv(z) if self.post_quant_conv is not None else z
        h = d.mid_block(d.conv_in(h))
        for resnet in levels[0].resnets:
            h = resnet(h)
        for i in range(1, len(levels)):
            width = levels[i].resnets[-1].conv2.out_channels
            stages = [[resnet] for resnet in levels[i].resnets]
            whole = self._fits_blocks_whole(h, width, 2)
            if not whole:
                stages = [[*levels[i].resnets]]
            stages[0] = [levels[i - 1].upsamplers[0], *stages[0]]
            if i == len(levels) - 1:
                # With the last block's output whole, the output norm's statistics are read from it (a stage of
                # its own) instead of recomputing that block in a measuring pass.
                head = [d.conv_norm_out, d.conv_act, d.conv_out]
                stages = [*stages, head] if whole else [*stages[:-1], stages[-1] + head]
            # The upsampling stage tiles its input: tile_sample_size // 2 gives tiles of tile_sample_size after it.
            h = self._tiled_stage(stages[0], h, self.tile_sample_size // 2, scale=2)
            for stage in stages[1:]:
                h = self._tiled_stage(stage, h, self.tile_sample_size, scale=1)
        return h

    def _fits_blocks_whole(self, x: Tensor, channels: int, scale: float) -> bool:
        """Whether the memory budget holds a level's input `x` and two whole outputs of its blocks (`channels` at
        `scale` times `x`'s size): the input and output of a block while the next is computed."""
        budget = self._memory_budget()
        if budget is None:
            return True
        block = x.shape[0] * channels * round(x.shape[-2] * scale) * round(x.shape[-1] * scale)
        return (x.numel() + 2 * block) * x.element_size() <= budget

    def _tiled_stage(self, modules: list[nn.Module], x: Tensor, tile: int, scale: float) -> Tensor:
        stage = nn.Sequential(*modules)
        align = round(1 / scale) if scale < 1 else 1  # a stride-2 downsampler needs even tile offsets
        margin = receptive_margin(stage, x.shape[1], align)
        stride = 2 if self.tile_statistics == "sampled" else 1
        with SharedStatistics(stage, sample_stride=stride) as statistics:
            return tiled_apply(stage, x, tile, margin, scale, align=align, statistics=statistics)

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
