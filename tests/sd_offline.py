"""A tiny Stable Diffusion pipeline built offline from randomly initialised parts, for pipeline tests.

Nothing here touches a model hub: the tokenizer is written to disk from a hand-made byte-level vocabulary with
no merges (every character is its own token), and the UNet, text encoder and scheduler are built from configs
in code. Sizes follow diffusers' own fast pipeline tests, so a 64x64 image takes well under a second on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from PIL import Image
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_PROMPT_TOKENS = 77
PROMPT = "a photo of an astronaut riding a horse"
TEXT_HIDDEN_SIZE = 32

# An SD-shaped VAE at test width: 4 latent channels, mid attention, quant convs. Two levels, so the pipelines'
# vae_scale_factor = 2 ** (len(block_out_channels) - 1) = 2 and a 64x64 image has 32x32 latents, which is the
# tiny UNet's sample_size (the pipelines' default height and width come from unet.sample_size * vae_scale_factor).
TINY_SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 64,
}
IMAGE_SIZE = 64


def write_byte_level_tokenizer(directory: Path) -> CLIPTokenizer:
    """Write a CLIP tokenizer with a byte-level vocabulary and no merges to `directory`, and load it from there.

    The vocabulary holds the 256 byte-level symbols, each again with CLIP's end-of-word suffix `</w>`, then the
    start and end tokens: 514 ids. With an empty merges file every character of a word is one token.

    Args:
        directory (`Path`): Folder to write `vocab.json` and `merges.txt` into (created if missing).

    Returns:
        `CLIPTokenizer`: The tokenizer, loaded by transformers from those files, padding to 77 tokens.
    """
    directory.mkdir(parents=True, exist_ok=True)
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = symbols + [s + "</w>" for s in symbols] + [BOS_TOKEN, EOS_TOKEN]
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(directory, model_max_length=MAX_PROMPT_TOKENS, local_files_only=True)


def tiny_text_encoder(tokenizer: CLIPTokenizer, seed: int = 0) -> CLIPTextModel:
    """A randomly initialised two-layer CLIP text encoder whose special-token ids agree with `tokenizer`.

    Args:
        tokenizer (`CLIPTokenizer`): The tokenizer it will read; sets vocabulary size and special ids.
        seed (`int`): Seed for the initial weights.

    Returns:
        `CLIPTextModel`: In eval mode, hidden size 32 (the UNet's cross-attention width).
    """
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_PROMPT_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    """A randomly initialised two-level conditional UNet on 4-channel 32x32 latents with 32-wide text context.

    Args:
        seed (`int`): Seed for the initial weights.

    Returns:
        `UNet2DConditionModel`: In eval mode.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        norm_num_groups=32,
    )
    return unet.eval()


def tiny_scheduler() -> DDIMScheduler:
    """The SD 1.x noise schedule (scaled-linear betas 0.00085 to 0.012) with a DDIM sampler, built in code."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


@torch.no_grad()
def perturb_weights_(model: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """Add seeded Gaussian noise to every parameter in place, so a test does not rest on the default init.

    Each tensor gets noise of `scale` times its own standard deviation (or `scale` itself where the tensor is
    constant, as GroupNorm weights and biases are at init), which keeps activations in a sane range.

    Args:
        model (`torch.nn.Module`): Model to change in place.
        seed (`int`): Seed for the noise.
        scale (`float`): Noise size relative to each tensor's spread.

    Returns:
        `torch.nn.Module`: The same `model`.
    """
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        spread = param.std().item() if param.numel() > 1 else 0.0
        noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
        param.add_(noise * scale * (spread if spread > 0 else 1.0))
    return model


def shared_sd_components(directory: Path, seed: int = 0) -> dict[str, Any]:
    """Everything a `StableDiffusionPipeline` needs except the `vae`, with no safety checker.

    Args:
        directory (`Path`): Folder the tokenizer files are written to.
        seed (`int`): Seed for the UNet and text encoder weights.

    Returns:
        `dict[str, Any]`: Keyword arguments for `StableDiffusionPipeline(vae=..., **components)`; the same
        objects can be shared by several pipelines, which do not modify them.
    """
    tokenizer = write_byte_level_tokenizer(directory / "tokenizer")
    return {
        "text_encoder": tiny_text_encoder(tokenizer, seed=seed),
        "tokenizer": tokenizer,
        "unet": tiny_unet(seed=seed),
        "scheduler": tiny_scheduler(),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def smooth_test_image(size: int = IMAGE_SIZE) -> Image.Image:
    """A deterministic RGB image of smooth colour ramps and a disc, the img2img starting point."""
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
    disc = ((xs - 0.6) ** 2 + (ys - 0.4) ** 2 < 0.08).astype(np.float64)
    rgb = np.stack([xs, ys, 0.5 * (1 - xs) + 0.5 * disc], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def text_to_image(pipe: DiffusionPipeline) -> np.ndarray:
    """Two seeded denoising steps of a text-to-image pipeline at 64x64.

    Args:
        pipe (`DiffusionPipeline`): A text-to-image Stable Diffusion pipeline.

    Returns:
        `np.ndarray`: Images, shape `(1, 64, 64, 3)`, values in [0, 1].
    """
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=2, generator=generator, output_type="np").images


def image_to_image(pipe: DiffusionPipeline) -> np.ndarray:
    """Two seeded denoising steps of an image-to-image pipeline from `smooth_test_image()`.

    Args:
        pipe (`DiffusionPipeline`): An image-to-image Stable Diffusion pipeline.

    Returns:
        `np.ndarray`: Images, shape `(1, 64, 64, 3)`, values in [0, 1].
    """
    generator = torch.Generator().manual_seed(0)
    # strength 0.5 of 4 steps: noise the encoded init image halfway, then run the last 2 steps.
    return pipe(
        PROMPT,
        image=smooth_test_image(),
        strength=0.5,
        num_inference_steps=4,
        generator=generator,
        output_type="np",
    ).images
