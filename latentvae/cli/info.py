"""`latentvae info PATH`: the format, architecture and size of a VAE file."""

from __future__ import annotations

import argparse
import math

from latentvae.cli.common import add_allow_pickle


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="VAE folder or weights file (diffusers or original-SD layout)")
    add_allow_pickle(parser)


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: `latentvae info --help` must answer without loading torch and diffusers.
    from latentvae.files.loading import build_vae, read_vae
    from latentvae.models.base import parameter_counts

    vae_file = read_vae(args.path, allow_pickle=args.allow_pickle)
    model = build_vae(vae_file)  # building it checks that every tensor fits
    c = model.config
    counts = parameter_counts(model)
    yes = {True: "yes", False: "no"}
    rows = {
        "path": str(args.path),
        "format": vae_file.file_format,
        "weights": str(vae_file.path),
        "config": vae_file.config_source,
        "class": type(model).__name__,
        "channels": f"in {c.in_channels}, out {c.out_channels}, latent {c.latent_channels}",
        "block_out_channels": f"{list(c.block_out_channels)}, {c.layers_per_block} layers per block"
        + (f" (decoder {list(c.decoder_block_out_channels)})" if c.get("decoder_block_out_channels") else ""),
        "norm_num_groups": str(c.norm_num_groups),
        "mid attention": yes[c.mid_block_add_attention],
    }
    if "num_vq_embeddings" in c:  # VQModel: a codebook between quant_conv and post_quant_conv
        dim = c.vq_embed_dim if c.vq_embed_dim is not None else c.latent_channels
        rows["codebook"] = (
            f"{c.num_vq_embeddings} codes of dimension {dim} ({math.log2(c.num_vq_embeddings):.1f} bits per "
            f"latent position); decode takes indices: {yes[c.lookup_from_codebook]}"
        )
    else:
        rows["quant convs"] = (
            f"quant_conv {yes[c.use_quant_conv]}, post_quant_conv {yes[c.use_post_quant_conv]}"
        )
    rows.update(
        {
            "downsampling": f"{model.downsampling_factor}x",
            "parameters": f"encoder {counts['encoder']:,}, decoder {counts['decoder']:,}, total {counts['total']:,}",
        }
    )
    if "bn" in dict(model.named_children()):  # AutoencoderKLFlux2: pipelines normalise with the BN statistics
        mean, var = model.bn.running_mean, model.bn.running_var
        rows["latent normalisation"] = (
            f"bn over {list(c.patch_size)}-patchified latents ({mean.numel()} channels): running_mean "
            f"{mean.min():.4g}..{mean.max():.4g}, running_var {var.min():.4g}..{var.max():.4g}, eps {c.batch_norm_eps}"
        )
    else:
        rows["scaling_factor"] = f"{c.scaling_factor}" + (
            f" (shift_factor {c.shift_factor})" if "shift_factor" in c else ""
        )
        rows["force_upcast"] = str(c.force_upcast)
    width = max(map(len, rows)) + 1
    for key, value in rows.items():
        print(f"{key + ':':<{width}} {value}")
    return 0
