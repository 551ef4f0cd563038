"""The `latentvae` command line (also `python -m latentvae`).

    latentvae info PATH
    latentvae convert IN OUT --to diffusers|ldm [--dtype fp16|bf16|fp32]
    latentvae reconstruct PATH IMAGE... --out DIR [--tile] [--resolution N]

To add a subcommand, add a `Subcommand` to `SUBCOMMANDS`: a help line, a function that adds its arguments to an
`argparse.ArgumentParser`, and a function that runs it from the parsed namespace and returns the exit code.
Expected failures (missing file, refused pickle, weights that do not fit) print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image

from latentvae.evaluate_cli import configure_parser as _configure_evaluate
from latentvae.evaluate_cli import run_evaluate as _run_evaluate
from latentvae.evaluation import prepare_image, reconstruct
from latentvae.export import save_diffusers, save_ldm
from latentvae.images import BadImageError
from latentvae.loading import VAEFileError, build_vae, load_vae, read_vae
from latentvae.metrics import psnr
from latentvae.shards import configure_make_shards, run_make_shards

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UsageError(ValueError):
    """Arguments that parse but cannot be honoured (e.g. an output path of the wrong kind)."""


EXPECTED_ERRORS = (FileNotFoundError, VAEFileError, UsageError, BadImageError)


@dataclass(frozen=True)
class Subcommand:
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _add_allow_pickle(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read .ckpt/.pt/.pth/.bin files with torch.load(weights_only=True); only for files you trust",
    )


# ----- info -----


def _configure_info(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="VAE folder or weights file (diffusers or original-SD layout)")
    _add_allow_pickle(parser)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters of the encoder side (encoder + quant_conv), the decoder side (post_quant_conv + decoder, and a VQ
    model's codebook, which decoding needs), all."""
    counts = {"encoder": 0, "decoder": 0, "total": 0}
    for name, param in model.named_parameters():
        side = "encoder" if name.startswith(("encoder.", "quant_conv.")) else "decoder"
        counts[side] += param.numel()
        counts["total"] += param.numel()
    return counts


def _run_info(args: argparse.Namespace) -> int:
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
        "block_out_channels": f"{list(c.block_out_channels)}, {c.layers_per_block} layers per block",
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
            "scaling_factor": f"{c.scaling_factor}"
            + (f" (shift_factor {c.shift_factor})" if "shift_factor" in c else ""),
            "force_upcast": str(c.force_upcast),
        }
    )
    width = max(map(len, rows)) + 1
    for key, value in rows.items():
        print(f"{key + ':':<{width}} {value}")
    return 0


# ----- convert -----


def _configure_convert(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="VAE folder or weights file to read")
    parser.add_argument("output", help="--to diffusers: a folder; --to ldm: a .safetensors file")
    parser.add_argument("--to", required=True, choices=("diffusers", "ldm"), help="key layout to write")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="stored dtype (default: that of the input)")
    _add_allow_pickle(parser)


def _run_convert(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if args.to == "ldm" and (output.suffix != ".safetensors" or output.is_dir()):
        raise UsageError(f"--to ldm writes one file; OUT must be a .safetensors file path, got {output}")
    if args.to == "diffusers" and output.exists() and not output.is_dir():
        raise UsageError(f"--to diffusers writes a folder; {output} exists and is a file")
    vae_file = read_vae(args.input, allow_pickle=args.allow_pickle)
    source_dtype = next(iter(vae_file.state_dict.values())).dtype
    model = build_vae(vae_file, dtype=DTYPES[args.dtype] if args.dtype else source_dtype)
    written = save_ldm(model, output) if args.to == "ldm" else save_diffusers(model, output)
    print(f"wrote {written} ({args.to} layout, {model.dtype}) from {vae_file.file_format} {vae_file.path}")
    return 0


# ----- reconstruct -----


def _configure_reconstruct(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="VAE folder or weights file")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="images to encode and decode")
    parser.add_argument("--out", required=True, help="folder for the reconstructions (PNG)")
    parser.add_argument("--tile", action="store_true", help="tiled encode/decode (large images, less memory)")
    parser.add_argument(
        "--resolution",
        type=int,
        help="resize the shortest side to N (bicubic) and center-crop NxN; default: native size",
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
    )
    _add_allow_pickle(parser)


@torch.inference_mode()
def reconstruct_image(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """Encode to the posterior mode and decode; uint8 `[H, W, 3]` in and out, any size.

    The image is reflection-padded at the bottom/right to a multiple of the downsampling factor and the
    reconstruction is cropped back, so the output has the input's size.
    """
    restored, _ = reconstruct(model, torch.from_numpy(image).permute(2, 0, 1)[None])  # HWC -> [1, 3, H, W]
    return restored[0].to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _run_reconstruct(args: argparse.Namespace) -> int:
    if args.resolution is not None and args.resolution <= 0:
        raise UsageError(f"--resolution must be positive, got {args.resolution}")
    model = load_vae(args.path, allow_pickle=args.allow_pickle, device=args.device)
    if args.tile:
        if not hasattr(model, "enable_tiling"):
            raise UsageError(
                f"--tile: {args.path} holds a {type(model).__name__}, which has no tiled decode; drop --tile "
                "(it reconstructs at native size) or pass --resolution to bound the image size"
            )
        model.enable_tiling()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    scores = []
    for source in args.images:
        original = prepare_image(source, args.resolution)
        restored = reconstruct_image(model, original)
        stem, k = Path(source).stem, 1
        while (name := f"{stem}.png" if k == 1 else f"{stem}-{k}.png") in used:  # same stem, other folders
            k += 1
        used.add(name)
        Image.fromarray(restored).save(out_dir / name)
        as_batch = [torch.from_numpy(a).permute(2, 0, 1)[None] for a in (original, restored)]
        score = psnr(*as_batch).item()  # on uint8 values, MAX 255; identical images give inf
        scores.append(score)
        print(f"{source}: PSNR {score:.2f} dB -> {out_dir / name}")
    print(f"mean PSNR over {len(scores)} image(s): {np.mean(scores):.2f} dB")
    return 0


# ----- benchmark: eval/benchmark.py, which ships with the source tree (like eval/evaluate.py) -----


@functools.cache
def _benchmark_script() -> ModuleType | None:
    """eval/benchmark.py of this checkout, loaded as a module; None outside a source checkout."""
    path = Path(__file__).resolve().parents[1] / "eval" / "benchmark.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("latentvae_eval_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _configure_benchmark(parser: argparse.ArgumentParser) -> None:
    if (script := _benchmark_script()) is not None:
        script.configure_parser(parser)


def _run_benchmark(args: argparse.Namespace) -> int:
    if (script := _benchmark_script()) is None:
        raise UsageError("the benchmark is eval/benchmark.py of a source checkout (pip install -e .)")
    return script.run(args)


SUBCOMMANDS: dict[str, Subcommand] = {
    "info": Subcommand("show the format, architecture and size of a VAE file", _configure_info, _run_info),
    "convert": Subcommand(
        "convert a VAE between the diffusers and original-SD (ldm) layouts", _configure_convert, _run_convert
    ),
    "reconstruct": Subcommand(
        "encode and decode images, write the reconstructions and print PSNR",
        _configure_reconstruct,
        _run_reconstruct,
    ),
    "evaluate": Subcommand(
        "PSNR / SSIM / LPIPS / rFID of one or more VAEs on the same images, side by side",
        _configure_evaluate,
        _run_evaluate,
    ),
    "make-shards": Subcommand(
        "write a folder of images into WebDataset tar shards for --train_shards",
        configure_make_shards,
        run_make_shards,
    ),
    "benchmark": Subcommand(
        "speed and memory: encode/decode against diffusers, the fast path, tiling (eval/benchmark.py)",
        _configure_benchmark,
        _run_benchmark,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with one subparser per entry of `SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="latentvae", description="Stable-Diffusion-style image autoencoders."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.configure(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 2 usage or expected failure)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except EXPECTED_ERRORS as err:
        print(f"latentvae {args.command}: error: {err}", file=sys.stderr)
        return 2
