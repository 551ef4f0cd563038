"""One converter between the diffusers VAE key layout (ours) and the original Stable Diffusion ("ldm") layout.

The two layouts name the same tensors differently (diffusers, as `AutoencoderKL.state_dict()`, -> original SD /
CompVis latent-diffusion):

    encoder.down_blocks.{i}.resnets.{j}       -> encoder.down.{i}.block.{j}
    encoder.down_blocks.{i}.downsamplers.0    -> encoder.down.{i}.downsample
    decoder.up_blocks.{i}.resnets.{j}         -> decoder.up.{n-1-i}.block.{j}   (decoder levels reversed)
    decoder.up_blocks.{i}.upsamplers.0        -> decoder.up.{n-1-i}.upsample
    *.mid_block.resnets.{0,1}                 -> *.mid.block_{1,2}
    *.mid_block.attentions.0.group_norm       -> *.mid.attn_1.norm
    *.mid_block.attentions.0.to_{q,k,v}       -> *.mid.attn_1.{q,k,v}           (Linear [C, C] -> conv [C, C, 1, 1])
    *.mid_block.attentions.0.to_out.0         -> *.mid.attn_1.proj_out          (Linear [C, C] -> conv [C, C, 1, 1])
    *.conv_shortcut (inside a resnet)         -> *.nin_shortcut
    *.conv_norm_out                           -> *.norm_out

`conv_in`, `conv_out`, `quant_conv` and `post_quant_conv` are the same in both, and so are a VQ model's codebook
`quantize.embedding.weight` and the FLUX.2 VAE's `bn.*` statistics (which pass through): CompVis latent-diffusion's `VQModel` (the vq-f4 / vq-f8 first stages) uses the same
encoder and decoder as its `AutoencoderKL`, so one converter serves both kinds. Keys that match no rule pass through
unchanged, so a loader's strict check reports them as unexpected instead of losing them silently.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from typing import NamedTuple

from torch import Tensor

DIFFUSERS = "diffusers"
LDM = "ldm"

# Whole checkpoints keep the VAE under one of these prefixes: SD 1.x/2.x/SDXL `first_stage_model.`, some
# merged or pipeline-flattened files `vae.`. The same list as diffusers' `LDM_VAE_KEYS`.
VAE_PREFIXES = ("first_stage_model.", "vae.")

# The original CompVis autoencoder checkpoints also store their training loss (LPIPS, discriminator, logvar)
# under `loss.`; those are not part of the autoencoder.
_LDM_NON_MODEL_PREFIXES = ("loss.",)

# The codebook of a VQ model: the same name in the diffusers and the ldm layout (LDM's and taming's VQModel).
CODEBOOK_KEY = "quantize.embedding.weight"

# The FLUX.2 VAE's latent statistics (BatchNorm2d buffers over patchified latents): the mark of an AutoencoderKLFlux2.
BATCH_NORM_KEY = "bn.running_mean"

# Keys of the diffusion transformer that mark a whole checkpoint's model family, as diffusers' single-file loader tells
# them apart (`CHECKPOINT_KEY_NAMES` in diffusers/loaders/single_file_utils.py: "sd3", "sd35_large", "flux"); each
# with and without the `model.diffusion_model.` prefix of ComfyUI-style whole checkpoints.
FAMILY_MARKS = {
    "SD3": (
        "joint_blocks.0.context_block.adaLN_modulation.1.bias",  # SD3 / SD3.5 medium
        "joint_blocks.37.x_block.mlp.fc1.weight",  # SD3.5 large
    ),
    "FLUX.1": ("double_blocks.0.img_attn.norm.key_norm.scale",),
}
_DIFFUSION_PREFIX = "model.diffusion_model."

# Norm group counts tried, largest first, when the config has to be inferred from shapes (see `infer_config`).
_GROUP_CANDIDATES = (32, 16, 8, 4, 2, 1)


class _Rule(NamedTuple):
    """One module-path correspondence. `{side}` is encoder/decoder, `{i}` a level, `{r}` the same level counted
    from the other end (decoder only), `{j}` a layer within a level."""

    diffusers: str
    ldm: str
    projection: bool = False  # a q/k/v/out projection: Linear [C, C] in diffusers, conv [C, C, 1, 1] in ldm


_RULES = (
    _Rule("encoder.down_blocks.{i}.resnets.{j}", "encoder.down.{i}.block.{j}"),
    _Rule("encoder.down_blocks.{i}.downsamplers.0", "encoder.down.{i}.downsample"),
    _Rule("decoder.up_blocks.{i}.resnets.{j}", "decoder.up.{r}.block.{j}"),
    _Rule("decoder.up_blocks.{i}.upsamplers.0", "decoder.up.{r}.upsample"),
    _Rule("{side}.mid_block.resnets.0", "{side}.mid.block_1"),
    _Rule("{side}.mid_block.resnets.1", "{side}.mid.block_2"),
    _Rule("{side}.mid_block.attentions.0.group_norm", "{side}.mid.attn_1.norm"),
    _Rule("{side}.mid_block.attentions.0.to_q", "{side}.mid.attn_1.q", projection=True),
    _Rule("{side}.mid_block.attentions.0.to_k", "{side}.mid.attn_1.k", projection=True),
    _Rule("{side}.mid_block.attentions.0.to_v", "{side}.mid.attn_1.v", projection=True),
    _Rule("{side}.mid_block.attentions.0.to_out.0", "{side}.mid.attn_1.proj_out", projection=True),
    _Rule("{side}.conv_norm_out", "{side}.norm_out"),
)
# Inside a resnet the 1x1 shortcut conv has its own name in each layout.
_SHORTCUT = {DIFFUSERS: "conv_shortcut", LDM: "nin_shortcut"}

# diffusers < 0.14 named the attention projections differently (e.g. stabilityai/sd-vae-ft-mse still does);
# diffusers itself renames them on load, and so do we.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_ATTENTION_RE = re.compile(
    r"^((?:encoder|decoder)\.mid_block\.attentions\.0\.)(query|key|value|proj_attn)\."
)


_PLACEHOLDERS = {
    "{side}": r"(?P<side>encoder|decoder)",
    "{i}": r"(?P<level>\d+)",
    "{r}": r"(?P<level>\d+)",
    "{j}": r"(?P<j>\d+)",
}


@functools.cache
def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for placeholder, group in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape(placeholder), group)
    return re.compile(rf"^{pattern}\.(?P<rest>.+)$")


def _translate(key: str, to_ldm: bool, num_levels: int) -> tuple[str, _Rule | None]:
    """Rename one key; returns the new key and the rule that matched (None: key passes through unchanged)."""
    src, dst = (DIFFUSERS, LDM) if to_ldm else (LDM, DIFFUSERS)
    for rule in _RULES:
        source, target = (rule.diffusers, rule.ldm) if to_ldm else (rule.ldm, rule.diffusers)
        match = _template_regex(source).match(key)
        if match is None:
            continue
        fields = match.groupdict()
        level = fields.get("level")
        if "{r}" in rule.ldm:
            level = str(num_levels - 1 - int(level))  # decoder levels count from opposite ends
        head = target.format(side=fields.get("side"), i=level, r=level, j=fields.get("j"))
        first, _, tail = fields["rest"].partition(".")
        if "resnets" in rule.diffusers and first == _SHORTCUT[src]:
            first = _SHORTCUT[dst]
        return ".".join(part for part in (head, first, tail) if part), rule
    return key, None


def _count_levels(keys: list[str], pattern: str) -> int:
    indices = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(indices) + 1 if indices else 0


def diffusers_to_ldm(state_dict: Mapping[str, Tensor], num_levels: int | None = None) -> dict[str, Tensor]:
    """Rename a diffusers-layout `AutoencoderKL` state dict into the original Stable Diffusion (ldm) layout.

    Args:
        state_dict: diffusers-layout tensors (no prefix).
        num_levels: number of resolution levels (`len(block_out_channels)`); counted from the decoder keys when
            None. Needed because the two layouts number decoder levels from opposite ends.

    Returns:
        A new dict with ldm key names; attention projection weights reshaped from `[C, C]` to `[C, C, 1, 1]`.
    """
    keys = list(state_dict)
    n = num_levels if num_levels is not None else _count_levels(keys, r"^decoder\.up_blocks\.(\d+)\.")
    out = {}
    for key, tensor in state_dict.items():
        new_key, rule = _translate(key, to_ldm=True, num_levels=n)
        if rule is not None and rule.projection and key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
        out[new_key] = tensor
    return out


def ldm_to_diffusers(state_dict: Mapping[str, Tensor], num_levels: int | None = None) -> dict[str, Tensor]:
    """Rename an original Stable Diffusion (ldm) layout VAE state dict into the diffusers layout.

    Args:
        state_dict: ldm-layout tensors (prefix already removed, see `split_vae_prefix`).
        num_levels: number of resolution levels; counted from the decoder keys when None.

    Returns:
        A new dict with diffusers key names; attention projection weights reshaped from `[C, C, 1, 1]` to `[C, C]`.
    """
    keys = list(state_dict)
    n = num_levels if num_levels is not None else _count_levels(keys, r"^decoder\.up\.(\d+)\.")
    out = {}
    for key, tensor in state_dict.items():
        new_key, rule = _translate(key, to_ldm=False, num_levels=n)
        if rule is not None and rule.projection and key.endswith(".weight") and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]  # 1x1 conv [C, C, 1, 1] -> Linear [C, C]
        out[new_key] = tensor
    return out


def split_vae_prefix(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """Take the VAE part of a whole checkpoint.

    Args:
        state_dict: a bare VAE state dict, or a whole checkpoint whose VAE keys start with one of
            `VAE_PREFIXES` (other keys - UNet, text encoder, EMA - are ignored).

    Returns:
        `(vae_state_dict, prefix)`: the VAE tensors with the prefix removed, and the prefix found ("" if none).
    """
    for prefix in VAE_PREFIXES:
        vae = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if vae:
            return vae, prefix
    return dict(state_dict), ""


def detect_layout(state_dict: Mapping[str, Tensor]) -> str:
    """Tell whether an (unprefixed) VAE state dict uses diffusers or ldm key names.

    Returns:
        `DIFFUSERS` or `LDM`.

    Raises:
        ValueError: if the keys look like neither layout, or like both.
    """
    ldm_marks = (r"^encoder\.down\.\d+\.", r"^decoder\.up\.\d+\.", r"^(encoder|decoder)\.mid\.")
    diffusers_marks = (
        r"^encoder\.down_blocks\.",
        r"^decoder\.up_blocks\.",
        r"^(encoder|decoder)\.mid_block\.",
    )
    is_ldm = any(re.match(p, k) for p in ldm_marks for k in state_dict)
    is_diffusers = any(re.match(p, k) for p in diffusers_marks for k in state_dict)
    if is_ldm == is_diffusers:
        sample = ", ".join(sorted(state_dict)[:5]) or "(no keys)"
        what = "both diffusers and ldm" if is_ldm else "neither diffusers nor ldm VAE"
        raise ValueError(
            f"The state dict has {what} key names, e.g. {sample}; it is not a VAE state dict we know."
        )
    return LDM if is_ldm else DIFFUSERS


def to_diffusers_layout(
    state_dict: Mapping[str, Tensor], num_levels: int | None = None
) -> tuple[dict[str, Tensor], str, str]:
    """Bring any supported VAE state dict into the diffusers layout of `AutoencoderKL.state_dict()`.

    Strips a `first_stage_model.` / `vae.` prefix (keeping only the VAE keys), detects the layout, converts ldm
    keys, drops the CompVis `loss.*` training tensors and renames legacy diffusers attention keys.

    Args:
        state_dict: the tensors as read from a file.
        num_levels: number of resolution levels, if known (see `ldm_to_diffusers`).

    Returns:
        `(diffusers_state_dict, layout, prefix)` where `layout` is what the input used (`DIFFUSERS` or `LDM`) and
        `prefix` the prefix that was removed ("" if none).
    """
    vae, prefix = split_vae_prefix(state_dict)
    layout = detect_layout(vae)
    if layout == LDM:
        vae = {k: v for k, v in vae.items() if not k.startswith(_LDM_NON_MODEL_PREFIXES)}
        return ldm_to_diffusers(vae, num_levels), layout, prefix
    renamed = {
        _LEGACY_ATTENTION_RE.sub(lambda m: f"{m[1]}{_LEGACY_ATTENTION[m[2]]}.", k): v for k, v in vae.items()
    }
    return renamed, layout, prefix


def _layer_count(keys: list[str], prefix: str) -> int:
    return _count_levels(keys, rf"^{re.escape(prefix)}(\d+)\.")


def infer_config(state_dict: Mapping[str, Tensor]) -> dict:
    """Infer the `AutoencoderKL`, (with `bn.running_mean`) `AutoencoderKLFlux2` or (with a
    `quantize.embedding.weight` codebook) `VQModel` constructor arguments from tensor shapes alone.

    Recovered exactly: in/out channels, block_out_channels, layers_per_block, latent_channels,
    mid_block_add_attention and the block types; for a KL model use_quant_conv and use_post_quant_conv, for a VQ
    model num_vq_embeddings and vq_embed_dim, for a FLUX.2 one also decoder_block_out_channels and a square
    patch_size (its batch_norm_eps and momentum are not in the shapes: the defaults apply). Not visible in the
    shapes:

    - `norm_num_groups`: GroupNorm weights have one value per channel whatever the group count, so we pick the
      largest of 32, 16, 8, 4, 2, 1 that divides every channel count (32 for SD-shaped VAEs). A VAE trained with
      fewer groups than that loads without error but computes different outputs: ship a config with it.
    - `act_fn`, `sample_size`, `scaling_factor`, `shift_factor`, `latents_mean/std`, `force_upcast`: left out, so
      the model's defaults apply (SD's 0.18215 scaling factor among them).

    Args:
        state_dict: a VAE state dict in the diffusers layout (see `to_diffusers_layout`).

    Returns:
        A config dict with `_class_name` "AutoencoderKL" or "VQModel", usable with that class's `from_config`.

    Raises:
        ValueError: naming the tensor that is needed but missing.
    """
    keys = list(state_dict)

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise ValueError(f"Cannot infer the VAE architecture from the shapes: tensor {key!r} is missing.")
        return tuple(state_dict[key].shape)

    num_levels = _layer_count(keys, "encoder.down_blocks.")
    if num_levels == 0:
        raise ValueError("Cannot infer the VAE architecture: no encoder.down_blocks.* tensors found.")
    block_out_channels = [
        shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(num_levels)
    ]
    # Decoder level i (counted from the top, as the encoder's) ends in up_blocks.{n-1-i}, at this width.
    decoder_widths = [
        shape(f"decoder.up_blocks.{num_levels - 1 - i}.resnets.0.conv2.weight")[0] for i in range(num_levels)
    ]
    widths = block_out_channels + decoder_widths
    groups = next(g for g in _GROUP_CANDIDATES if all(c % g == 0 for c in widths))
    config = {
        "in_channels": shape("encoder.conv_in.weight")[1],
        "out_channels": shape("decoder.conv_out.weight")[0],
        "down_block_types": ["DownEncoderBlock2D"] * num_levels,
        "up_block_types": ["UpDecoderBlock2D"] * num_levels,
        "block_out_channels": block_out_channels,
        "layers_per_block": _layer_count(keys, "encoder.down_blocks.0.resnets."),
        "latent_channels": shape("decoder.conv_in.weight")[1],
        "norm_num_groups": groups,
        "mid_block_add_attention": any(k.startswith("encoder.mid_block.attentions.") for k in keys),
    }
    if CODEBOOK_KEY in state_dict:
        num_codes, code_dim = shape(CODEBOOK_KEY)
        return {"_class_name": "VQModel", **config, "num_vq_embeddings": num_codes, "vq_embed_dim": code_dim}
    config |= {
        "use_quant_conv": "quant_conv.weight" in state_dict,
        "use_post_quant_conv": "post_quant_conv.weight" in state_dict,
    }
    if BATCH_NORM_KEY in state_dict:
        patch_area, rest = divmod(
            shape(BATCH_NORM_KEY)[0], config["latent_channels"]
        )  # bn over p*p*C channels
        side = math.isqrt(patch_area)
        if rest or side * side != patch_area:
            raise ValueError(
                f"Cannot infer the FLUX.2 patch size: {BATCH_NORM_KEY} has {shape(BATCH_NORM_KEY)[0]} channels, "
                f"not a square patch of {config['latent_channels']} latent channels; ship a config.json with it."
            )
        return {
            "_class_name": "AutoencoderKLFlux2",
            **config,
            "decoder_block_out_channels": decoder_widths if decoder_widths != block_out_channels else None,
            "patch_size": [side, side],
        }
    return {"_class_name": "AutoencoderKL", **config}


def released_family(keys: list[str], config: dict, layout: str, prefix: str) -> tuple[str | None, str]:
    """The released model whose VAE a file without a config holds, for its normalisation constants: a 16-channel
    `AutoencoderKL` without quant convs is FLUX.1's or SD3's (the same shape, other constants).

    Told by the whole checkpoint's diffusion-transformer keys (`FAMILY_MARKS`, as diffusers tells them), else, for a
    bare file with original-SD key names, FLUX.1: that is the layout of Black Forest Labs' `ae.safetensors` (SD3's
    VAE ships as a diffusers folder or inside the whole checkpoint).

    Args:
        keys: every key of the file (the VAE's and the rest).
        config: the config inferred from the VAE tensors (`infer_config`).
        layout: the VAE keys' layout, `DIFFUSERS` or `LDM`; prefix: the VAE prefix removed ("" for a bare file).

    Returns:
        `(family, why)`: "FLUX.1" or "SD3" and the reason, or `(None, "")` when the file does not tell.
    """
    if (
        config.get("_class_name") != "AutoencoderKL"
        or config["latent_channels"] != 16
        or config["use_quant_conv"]
    ):
        return None, ""
    found = set(keys)
    for family, marks in FAMILY_MARKS.items():
        if any(mark in found or _DIFFUSION_PREFIX + mark in found for mark in marks):
            return family, f"a whole {family} checkpoint (its transformer keys)"
    if layout == LDM and not prefix:
        return (
            "FLUX.1",
            "a bare 16-channel ldm-keyed file without quant convs: the layout of FLUX.1's ae.safetensors",
        )
    return None, ""
