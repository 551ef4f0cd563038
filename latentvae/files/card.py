"""The model card of an export: `README.md` in the Hugging Face format (YAML front matter, then Markdown).

What it says, from the model alone: the architecture, parameters, latent shape and normalisation constants, and how
to use it (diffusers `from_pretrained` into a pipeline; the single file for ComfyUI / AUTOMATIC1111). From a
`CardInfo` when given: the license, the model it was fine-tuned from, how the constants were measured, how it was
trained (`TrainingRecord`) and its evaluation (attached later by `latentvae evaluate --update_card`, between two
markers, so that it can be replaced). The front matter is written by `huggingface_hub.ModelCardData`: `library_name:
diffusers` (the Hub then offers the diffusers snippet), `tags`, `license` and `base_model` when known; no
`pipeline_tag`, since a VAE is a pipeline's component, not a pipeline.

Building the card is pure (`model_card` returns a `ModelCard`); `latentvae.files.export` writes it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from latentvae.models.base import parameter_counts
from latentvae.models.presets import PRESETS

CARD_NAME = "README.md"
CARD_TAG = "latentvae"  # in every card we write: a re-export replaces only a card carrying it
EVALUATION_BEGIN = "<!-- latentvae:evaluation:begin -->"
EVALUATION_END = "<!-- latentvae:evaluation:end -->"
USAGE_HEADING = "## Use\n"
# The original-SD VAE files that Stability published, by file stem, and the Hub repositories that hold them (only
# names no other well-known VAE uses: `sdxl_vae.safetensors`, for one, is also the name of the fp16-fix VAE's file).
KNOWN_BASE_MODELS = {
    "vae-ft-mse-840000-ema-pruned": "stabilityai/sd-vae-ft-mse-original",
    "vae-ft-ema-560000-ema-pruned": "stabilityai/sd-vae-ft-ema-original",
}
# The constructor arguments that make a VAE "SD-shaped": what AUTOMATIC1111 and ComfyUI build for a VAE file.
_SD_SHAPE = {
    key: PRESETS["sd-kl-f8"][key]
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups")
}


@dataclass
class TrainingRecord:
    """How a VAE was trained, as its card tells it (values as the training config holds them).

    Args:
        recipe: the named recipe the configuration started from.
        steps: optimizer steps taken.
        images_per_step: images per optimizer step (batch x processes x accumulation).
        resolution: training crop size in pixels.
        data: what the training images were, in words.
        losses: loss settings, name -> value (e.g. `{"kl_weight": 1e-6}`).
        optimizer: optimiser settings, name -> value.
        validation: final validation metrics, name -> value.
        num_validation_images: the images they were measured on.
        grid: a validation grid image inside the export folder (its file name), shown in the card.
        script: the training script.
    """

    recipe: str
    steps: int
    images_per_step: int
    resolution: int
    data: str
    losses: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)
    num_validation_images: int = 0
    grid: str | None = None
    script: str = "training/train.py"


@dataclass
class CardInfo:
    """What a card says beyond the model itself (every field optional).

    Args:
        title: the card's title (default: the export folder's name).
        license: a Hub license id (e.g. `"openrail++"`, `"apache-2.0"`), written only when given.
        base_model: the Hub id of the model this one was fine-tuned from.
        repo_id: where the model is (or will be) on the Hub, used in the usage snippets.
        normalisation: how the latent normalisation constants were found, e.g. "1 / std over 512 training images".
        training: how it was trained.
        evaluation: Markdown of an evaluation, placed between the evaluation markers.
    """

    title: str | None = None
    license: str | None = None
    base_model: str | None = None
    repo_id: str | None = None
    normalisation: str | None = None
    training: TrainingRecord | None = None
    evaluation: str | None = None


def known_base_model(path: str | None) -> str | None:
    """The Hub id of a pretrained VAE given as a local path: a Hugging Face cache snapshot
    (`.../models--owner--name/snapshots/...`) or one of Stability's published VAE files (`KNOWN_BASE_MODELS`)."""
    if not path:
        return None
    cached = re.search(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots", str(path))
    if cached:
        return f"{cached[1]}/{cached[2]}"
    return KNOWN_BASE_MODELS.get(Path(path).stem)


def sd_shaped(config: dict) -> bool:
    """Whether the VAE has the SD 1.x/2.x/SDXL architecture (so AUTOMATIC1111 and ComfyUI can load its file)."""
    return config.get("_class_name") == "AutoencoderKL" and all(
        list(config.get(k)) == list(v) if isinstance(v, (list, tuple)) else config.get(k) == v
        for k, v in _SD_SHAPE.items()
    )


def _table(rows: dict[str, Any], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    return "\n".join(lines + [f"| {k} | {_value(v)} |" for k, v in rows.items()])


def _value(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back as the same float
    if isinstance(value, (list, tuple)):
        return ", ".join(_value(v) for v in value)
    return "–" if value is None else str(value)


def model_section(model: Any, config: dict, info: CardInfo) -> str:
    """The card's "## Model" section: the architecture, parameters, latent shape and normalisation constants (a
    FLUX.2 VAE's: its bn running statistics), and how the constants were found (`info.normalisation`)."""
    counts = parameter_counts(model)
    factor = 2 ** (len(config["block_out_channels"]) - 1)  # as diffusers pipelines compute it
    channels = config["latent_channels"]
    size = 256
    rows = {
        "class": f"`{config['_class_name']}` (diffusers)",
        "block_out_channels": config["block_out_channels"],
        "layers_per_block": config["layers_per_block"],
        "parameters": f"encoder {counts['encoder'] / 1e6:.2f} M, decoder {counts['decoder'] / 1e6:.2f} M, "
        f"total {counts['total'] / 1e6:.2f} M",
        "latent": f"{channels} channels, {factor}x downsampling: a {size}x{size} image -> {channels}x"
        f"{size // factor}x{size // factor} ({3 * factor * factor / channels:.0f}x fewer values)",
    }
    if "num_vq_embeddings" in config:
        rows["codebook"] = f"{config['num_vq_embeddings']} codes"
    bn = getattr(model, "bn", None)
    if bn is None:
        rows["scaling_factor"] = config.get("scaling_factor")
    for key in ("shift_factor", "latents_mean", "latents_std"):
        if config.get(key) is not None:
            rows[key] = config[key]
    if bn is not None:  # FLUX.2: the statistics its pipelines normalise the 2x2-patchified latents with
        rows["bn.running_mean"] = bn.running_mean.tolist()
        rows["bn.running_var"] = bn.running_var.tolist()
    rows["force_upcast"] = config.get("force_upcast")
    measured = info.normalisation or "as set in the config (not measured at export)"
    how = (
        "FLUX.2 pipelines patchify the latents 2x2 and normalise them with the bn running statistics, (z - "
        "running_mean) / sqrt(running_var + batch_norm_eps), before diffusion, and undo it before decoding."
        if bn is not None
        else "Pipelines multiply the latents by `scaling_factor` before diffusion and divide by it before decoding "
        "(FLUX.1 / SD3-style pipelines also subtract `shift_factor`; pipelines that read `latents_mean` / "
        "`latents_std` normalise per channel)."
    )
    return (
        "## Model\n\n" + _table(rows, ("property", "value")) + f"\n\nLatent normalisation: {measured}. {how}"
    )


def replace_model_section(text: str, section: str) -> str:
    """The card text `text` with its "## Model" section replaced by `section` (the others kept as they are)."""
    pattern = re.compile(r"^## Model\n.*?(?=\n\n(?:## |<!-- latentvae:)|\Z)", re.DOTALL | re.MULTILINE)
    if not pattern.search(text):
        raise ValueError("the model card has no '## Model' section to update")
    return pattern.sub(lambda _: section, text, count=1)


def _training_section(record: TrainingRecord) -> str:
    parts = [
        "## Training\n",
        f"Trained with latentvae's `{record.script}`, recipe `{record.recipe}`: {record.steps} optimizer steps "
        f"of {record.images_per_step} images at {record.resolution} px. Data: {record.data}.",
    ]
    if record.losses:
        parts.append("\n" + _table(record.losses, ("loss setting", "value")))
    if record.optimizer:
        parts.append("\n" + _table(record.optimizer, ("optimiser setting", "value")))
    if record.validation:
        parts.append(
            f"\n### Validation (end of training, {record.num_validation_images} held-out images)\n\n"
            + _table(record.validation, ("metric", "value"))
        )
    if record.grid:
        parts.append(f"\n![validation: input | reconstruction | error]({record.grid})")
    return "\n".join(parts)


def _usage_section(config: dict, name: str, ldm_filename: str | None, info: CardInfo) -> str:
    where = json.dumps(info.repo_id or f"path/to/{name}")
    cls = config["_class_name"]
    lines = [
        USAGE_HEADING,
        f"```python\nfrom diffusers import {cls}\n\nvae = {cls}.from_pretrained({where})\n```",
    ]
    if sd_shaped(config):
        lines += [
            "\nAs the VAE of a Stable Diffusion pipeline (the latent space must be the one the diffusion model "
            "was trained on: a fine-tune of the SD VAE's decoder keeps it, a VAE trained from scratch does not):\n",
            "```python\nimport torch\nfrom diffusers import StableDiffusionPipeline\n\n"
            f"vae = {cls}.from_pretrained({where}, torch_dtype=torch.float16)\n"
            'pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", '
            "vae=vae, torch_dtype=torch.float16)\n```",
            f"\nComfyUI / AUTOMATIC1111: `{ldm_filename}` is the same VAE in the original Stable Diffusion key "
            "layout: put it in `ComfyUI/models/vae/` or `stable-diffusion-webui/models/VAE/`."
            if ldm_filename
            else "\nComfyUI / AUTOMATIC1111 read the original Stable Diffusion key layout: write that single file "
            f"with `latentvae convert {name} {name}.safetensors --to ldm`.",
        ]
    elif ldm_filename:
        lines.append(
            f"\n`{ldm_filename}` holds the same weights in the original latent-diffusion key layout, with the "
            "config in its metadata (`latentvae.load_vae` reads it). AUTOMATIC1111 and ComfyUI build the fixed SD "
            "architecture, which this VAE does not have: use it through diffusers or latentvae."
        )
    return "\n".join(lines)


def evaluation_block(markdown: str) -> str:
    """`markdown` between the evaluation markers, as the card holds it."""
    return f"{EVALUATION_BEGIN}\n## Evaluation\n\n{markdown.strip()}\n{EVALUATION_END}"


def replace_evaluation(text: str, markdown: str) -> str:
    """The card text `text` with its evaluation block replaced by `markdown`; a card without one gets it before its
    usage section (or at the end)."""
    block = evaluation_block(markdown)
    pattern = re.compile(re.escape(EVALUATION_BEGIN) + ".*?" + re.escape(EVALUATION_END), re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    head, usage, tail = text.partition(USAGE_HEADING)
    if usage:
        return f"{head}{block}\n\n{usage}{tail}"
    return text.rstrip() + "\n\n" + block + "\n"


def model_card(
    model: Any, config: dict, name: str, ldm_filename: str, info: CardInfo | None = None
) -> ModelCard:
    """The card of `model` exported as folder `name` with the single file `ldm_filename`.

    Args:
        model: the `AutoencoderKL` or `VQModel`.
        config: its full config (`latentvae.files.export.model_config`).
        name: the export folder's name, the card's title.
        ldm_filename: the original-layout single file beside it, if there is one.
        info: what the model itself cannot say.

    Returns:
        `huggingface_hub.ModelCard`; `str(card)` is the README.md text.
    """
    info = info or CardInfo()
    kind = "vq-vae" if "num_vq_embeddings" in config else "vae"
    tags = [CARD_TAG, "autoencoder", kind, config["_class_name"].lower()]
    if sd_shaped(config):
        tags.append("stable-diffusion")
    data = ModelCardData(
        library_name="diffusers", tags=tags, license=info.license, base_model=info.base_model
    )
    what = "A VQ-regularised (codebook)" if kind == "vq-vae" else "A KL-regularised (Gaussian)"
    cls = config["_class_name"]
    intro = (
        f"# {info.title or name}\n\n{what} convolutional image autoencoder in the Stable Diffusion style, written by latentvae "
        f"as a diffusers `{cls}`: it loads with `diffusers.{cls}.from_pretrained` and serves as a diffusers "
        f"pipeline's `{getattr(model, 'pipeline_component', 'vae')}`."
    )
    if info.base_model:
        intro += f" Fine-tuned from [{info.base_model}](https://huggingface.co/{info.base_model})."
    sections = [intro, model_section(model, config, info)]
    if info.training is not None:
        sections.append(_training_section(info.training))
    if info.evaluation:
        sections.append(evaluation_block(info.evaluation))
    sections.append(_usage_section(config, name, ldm_filename, info))
    body = "\n\n".join(sections)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def preview_card(
    model: Any, config: dict, name: str, teacher: str, record: TrainingRecord, license: str | None = None
) -> ModelCard:
    """The card of a preview decoder (an `AutoencoderTiny` distilled by `latentvae distill-preview`) exported as
    folder `name`; `teacher` names the VAE it previews (its path or Hub id)."""
    data = ModelCardData(
        library_name="diffusers", tags=[CARD_TAG, "autoencoder", "taesd", "autoencodertiny"], license=license
    )
    counts = parameter_counts(model)
    factor = 2 ** (len(config["decoder_block_out_channels"]) - 1)
    rows = {
        "class": "`AutoencoderTiny` (diffusers; TAESD's architecture)",
        "encoder_block_out_channels": config["encoder_block_out_channels"],
        "decoder_block_out_channels": config["decoder_block_out_channels"],
        "parameters": f"encoder {counts['encoder'] / 1e6:.3f} M, decoder {counts['decoder'] / 1e6:.3f} M",
        "latent": f"{config['latent_channels']} channels, {factor}x downsampling (the VAE's)",
        "scaling_factor": config["scaling_factor"],
        "shift_factor": config["shift_factor"],
        "latent_magnitude": config["latent_magnitude"],
        "latent_shift": config["latent_shift"],
    }
    where = json.dumps(f"path/to/{name}")
    body = [
        f"# {name}\n\nA preview decoder for the VAE `{teacher}`: a diffusers `AutoencoderTiny` (TAESD's architecture) "
        "distilled from it, whose decoder turns that VAE's latents into (an approximation of) the VAE's own decode, "
        "many times faster, and whose encoder approximates the VAE's posterior mean.",
        "## Model\n\n"
        + _table(rows, ("property", "value"))
        + "\n\nLatents: it works on the *normalised* latent "
        "the diffusion model sees, z_n = (z - shift_factor) * scaling_factor with the VAE's constants (as TAESD for "
        "SD / SDXL), so its own scaling_factor is 1 and shift_factor 0: a pipeline's `vae.decode(latents / "
        "scaling_factor + shift_factor)` hands it z_n unchanged. `latent_magnitude` / `latent_shift` map z_n to "
        "[0, 1] for the byte form (`scale_latents`): +-3 std around the mean measured on the training images.",
        _training_section(record),
        USAGE_HEADING
        + f"\n```python\nfrom diffusers import AutoencoderTiny\n\ntiny = AutoencoderTiny.from_pretrained({where})\n"
        "pipe.vae = tiny  # a pipeline whose diffusion model works in the VAE's latent space: fast decodes\n"
        "image = tiny.decode(latents).sample  # or preview the normalised latents of a step directly\n```",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(body) + "\n")
