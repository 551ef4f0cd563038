"""`latentvae convert IN OUT --to diffusers|ldm`: rewrite a VAE in the other key layout (optionally another dtype)."""

from __future__ import annotations

import argparse
from pathlib import Path

from latentvae.cli.common import DTYPE_NAMES, UsageError, add_allow_pickle


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="VAE folder or weights file to read")
    parser.add_argument("output", help="--to diffusers: a folder; --to ldm: a .safetensors file")
    parser.add_argument("--to", required=True, choices=("diffusers", "ldm"), help="key layout to write")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="stored dtype (default: that of the input)")
    add_allow_pickle(parser)


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the parser is built without loading torch and diffusers.
    from latentvae.files.card import CardInfo
    from latentvae.files.export import LDM_LAYOUT_CLASSES, save_diffusers, save_ldm, write_model_card
    from latentvae.files.loading import build_vae, read_vae
    from latentvae.models.inference import DTYPES

    output = Path(args.output)
    if args.to == "ldm" and (output.suffix != ".safetensors" or output.is_dir()):
        raise UsageError(f"--to ldm writes one file; OUT must be a .safetensors file path, got {output}")
    if args.to == "diffusers" and output.exists() and not output.is_dir():
        raise UsageError(f"--to diffusers writes a folder; {output} exists and is a file")
    vae_file = read_vae(args.input, allow_pickle=args.allow_pickle)
    # Of the weights: not of an integer buffer (a FLUX.2 VAE's bn.num_batches_tracked, first in a sorted file).
    source_dtype = next(v.dtype for v in vae_file.state_dict.values() if v.is_floating_point())
    model = build_vae(vae_file, dtype=DTYPES[args.dtype] if args.dtype else source_dtype)
    if args.to == "ldm" and type(model).__name__ not in LDM_LAYOUT_CLASSES:
        raise UsageError(
            f"{type(model).__name__} has no ldm single-file layout here; convert it --to diffusers"
        )
    if args.to == "ldm":
        written = save_ldm(model, output)
    else:
        written = save_diffusers(model, output)
        write_model_card(model, output, None, CardInfo())  # a diffusers folder says what it holds
    print(f"wrote {written} ({args.to} layout, {model.dtype}) from {vae_file.file_format} {vae_file.path}")
    return 0
