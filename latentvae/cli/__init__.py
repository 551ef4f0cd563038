"""The `latentvae` command line (also `python -m latentvae`): one module per subcommand.

    latentvae info PATH
    latentvae convert IN OUT --to diffusers|ldm [--dtype fp16|bf16|fp32]
    latentvae reconstruct PATH IMAGE... --out DIR [--tile] [--resolution N]
    latentvae evaluate --model [NAME=]PATH ... --data_dir DIR --output_dir OUT
    latentvae diagnose MODEL [MODEL ...] --data_dir DIR --output_dir OUT
    latentvae make-shards IMAGE_DIR OUT_DIR [--shard_size N]
    latentvae benchmark [--quick] [--modes ...]
    latentvae push PATH REPO_ID [--token T] [--private]
    latentvae distill-preview VAE --data_dir DIR [--output_dir OUT] [--max_train_steps N] ...
    latentvae normalize PATH --data_dir DIR [--mode scale|shift_scale|per_channel|batchnorm] [--output PATH]

To add a subcommand, write `latentvae/cli/<name>.py` with `configure(parser)` (adds its arguments) and `run(args)`
(runs it, returns the exit code), and list it in `SUBCOMMANDS`. Only the chosen subcommand's module is imported,
and those modules import torch and diffusers inside `run`, so `latentvae --help` and `latentvae info PATH --help`
answer without loading them. Expected failures (missing file, refused pickle, weights that do not fit) print one
line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from latentvae.cli.common import expected_errors


@dataclass(frozen=True)
class Subcommand:
    help: str
    module: str  # in latentvae.cli


SUBCOMMANDS: dict[str, Subcommand] = {
    "info": Subcommand("show the format, architecture and size of a VAE file", "info"),
    "convert": Subcommand("convert a VAE between the diffusers and original-SD (ldm) layouts", "convert"),
    "reconstruct": Subcommand(
        "encode and decode images, write the reconstructions and print PSNR", "reconstruct"
    ),
    "evaluate": Subcommand(
        "PSNR / SSIM / LPIPS / rFID of one or more VAEs on the same images, side by side", "evaluate"
    ),
    "diagnose": Subcommand(
        "latent health, artefact checks and a diffusion probe of one or more VAEs, side by side", "diagnose"
    ),
    "make-shards": Subcommand(
        "write a folder of images into WebDataset tar shards for --train_shards", "make_shards"
    ),
    "benchmark": Subcommand(
        "speed and memory: encode/decode against diffusers, the fast path, tiling (eval/benchmark.py)",
        "benchmark",
    ),
    "push": Subcommand("upload an export folder to a Hugging Face Hub model repository", "push"),
    "distill-preview": Subcommand(
        "distil a fast preview decoder (diffusers AutoencoderTiny, TAESD's architecture) from a VAE",
        "distill_preview",
    ),
    "normalize": Subcommand(
        "measure a VAE's latent normalisation on images and write it where its pipelines read it", "normalize"
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with one subparser per entry of `SUBCOMMANDS`; only `command`'s arguments are added (none when it
    is None: enough for `latentvae --help`), so building it imports that subcommand's module only."""
    parser = argparse.ArgumentParser(
        prog="latentvae", description="Stable-Diffusion-style image autoencoders."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command_info in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=command_info.help, description=command_info.help)
        if name == command:
            module = importlib.import_module(f"latentvae.cli.{command_info.module}")
            module.configure(sub)
            sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 2 usage or expected failure)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((word for word in argv if not word.startswith("-")), None)
    args = build_parser(command if command in SUBCOMMANDS else None).parse_args(argv)
    args.command_line = " ".join(["latentvae", *argv])  # recorded by commands that write results
    try:
        return args.run(args)
    except Exception as err:
        if not isinstance(err, expected_errors()):
            raise
        print(f"latentvae {args.command}: error: {err}", file=sys.stderr)
        return 2
