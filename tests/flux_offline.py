"""Tiny FLUX.1, FLUX.2 [klein] and SD3 pipelines built offline from randomly initialised parts, for pipeline tests.

As `sd_offline` does for Stable Diffusion: nothing touches a model hub. The CLIP tokenizer is `sd_offline`'s
byte-level one; the T5 and Qwen tokenizers are built in memory from a `tokenizers` WordLevel model over the prompt's
words (transformers' fast tokenizers wrap such an object: `tokenizer_object=`), the Qwen one with a one-line chat
template, since Flux2KleinPipeline formats the prompt as a chat. The transformers and text encoders are built from
configs in code at the sizes of diffusers' own fast pipeline tests, so a 64x64 image takes a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
)
from sd_offline import PROMPT, smooth_test_image, tiny_text_encoder, write_byte_level_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    Qwen2TokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

IMAGE_SIZE = 64
MAX_SEQUENCE_LENGTH = 16  # T5 / Qwen tokens (the pipelines' default is 512)
# Flux2KleinPipeline stacks these hidden layers of its text encoder (the released model: 9, 18, 27 of Qwen3).
QWEN_LAYERS = (1, 2, 3)
QWEN_HIDDEN_SIZE = 16


def word_level_tokenizer(tokenizer_class: type, specials: list[str], end: str | None = None, **tokens: str):
    """A `tokenizer_class` (a transformers fast tokenizer) over `specials` and the prompt's words, one id each,
    built in memory; with `end`, every sequence ends in that token (as T5's does)."""
    words = specials + sorted(set(PROMPT.split()) | {"user", "assistant"})
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=tokens["unk_token"]))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    if end is not None:
        model.post_processor = processors.TemplateProcessing(
            single=f"$A {end}", special_tokens=[(end, words.index(end))]
        )
    return tokenizer_class(tokenizer_object=model, **tokens)


def t5_tokenizer() -> T5TokenizerFast:
    return word_level_tokenizer(
        T5TokenizerFast, ["<pad>", "</s>", "<unk>"], end="</s>", pad_token="<pad>", eos_token="</s>",
        unk_token="<unk>", extra_ids=0,
    )  # fmt: skip


def tiny_t5(tokenizer: T5TokenizerFast, d_model: int, seed: int = 0) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


def flux_components(directory: Path, latent_channels: int = 16, seed: int = 0) -> dict[str, Any]:
    """Everything a `FluxPipeline` / `FluxImg2ImgPipeline` needs but the `vae` (of `latent_channels` channels)."""
    tokenizer, tokenizer_2 = write_byte_level_tokenizer(directory / "tokenizer"), t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,  # FLUX.1 [dev]'s guidance-distilled transformer
    ).eval()  # fmt: skip
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": tiny_text_encoder(tokenizer, seed=seed),
        "tokenizer": tokenizer,
        "text_encoder_2": tiny_t5(tokenizer_2, d_model=32, seed=seed),
        "tokenizer_2": tokenizer_2,
        "transformer": transformer,
    }


def sd3_components(directory: Path, latent_channels: int = 16, seed: int = 0) -> dict[str, Any]:
    """Everything a `StableDiffusion3Pipeline` / `StableDiffusion3Img2ImgPipeline` needs but the `vae`: two CLIP
    text encoders with projection (their pooled outputs concatenated: 64 wide), T5 as wide as the two CLIPs' hidden
    states side by side (the pipeline pads those to T5's width)."""
    tokenizer, tokenizer_3 = write_byte_level_tokenizer(directory / "tokenizer"), t5_tokenizer()
    clip = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    text_encoder, text_encoder_2 = CLIPTextModelWithProjection(clip), CLIPTextModelWithProjection(clip)
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 8, patch_size=1, in_channels=latent_channels, out_channels=latent_channels,
        num_layers=1, attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
        pooled_projection_dim=64,
    )  # fmt: skip
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer_2": tokenizer,
        "text_encoder_3": tiny_t5(tokenizer_3, d_model=64, seed=seed),
        "tokenizer_3": tokenizer_3,
        "transformer": transformer.eval(),
    }


def qwen_tokenizer() -> Qwen2TokenizerFast:
    tokenizer = word_level_tokenizer(
        Qwen2TokenizerFast, ["<|endoftext|>", "<unk>"], pad_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<unk>",
    )  # fmt: skip
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant{% endif %}"
    )
    return tokenizer


def flux2_klein_components(latent_channels: int = 32, seed: int = 0) -> dict[str, Any]:
    """Everything a `Flux2KleinPipeline` needs but the `vae`: a three-layer Qwen3, whose stacked hidden states
    (`QWEN_LAYERS`) are the transformer's context, and a step-distilled transformer (no classifier-free guidance)
    on the 2x2-patchified latents (4 x `latent_channels` channels)."""
    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=QWEN_HIDDEN_SIZE, intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
        )
    ).eval()  # fmt: skip
    transformer = Flux2Transformer2DModel(
        in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=QWEN_HIDDEN_SIZE * len(QWEN_LAYERS), timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    ).eval()  # fmt: skip
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
        "is_distilled": True,
    }


def image_to_image() -> dict[str, Any]:
    """The img2img arguments: `smooth_test_image()` noised halfway (strength 0.5 of 4 steps: the last 2 run)."""
    return {"image": smooth_test_image(IMAGE_SIZE), "strength": 0.5, "num_inference_steps": 4}


def generate(pipe: DiffusionPipeline, **kwargs: Any) -> np.ndarray:
    """Two seeded denoising steps at 64x64 of `PROMPT` (`kwargs` add to or override those).

    Returns:
        `np.ndarray`: Images, shape `(1, 64, 64, 3)`, values in [0, 1] (with `output_type="latent"`, the latents).
    """
    kwargs = {
        "num_inference_steps": 2,
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
        "output_type": "np",
        **kwargs,
    }
    return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
