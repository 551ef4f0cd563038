"""`latentvae reconstruct PATH IMAGE... --out DIR`: encode and decode images, write the reconstructions, print PSNR."""

from __future__ import annotations

import argparse
from pathlib import Path

from latentvae.cli.common import UsageError, add_allow_pickle


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="VAE folder or weights file")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="images to encode and decode")
    parser.add_argument("--out", required=True, help="folder for the reconstructions (PNG)")
    parser.add_argument("--tile", action="store_true", help="tiled encode/decode (large images, less memory)")
    parser.add_argument(
        "--resolution",
        type=int,
        help="resize the shortest side to N (bicubic) and center-crop NxN; default: native size",
    )
    parser.add_argument("--device", default="auto", help="torch device; auto: cuda if available, else cpu")
    add_allow_pickle(parser)


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the parser is built without loading torch and diffusers.
    import numpy as np
    import torch
    from PIL import Image

    from latentvae.evaluation.evaluate import prepare_image, reconstruct_image
    from latentvae.evaluation.metrics import psnr
    from latentvae.files.loading import load_vae

    if args.resolution is not None and args.resolution <= 0:
        raise UsageError(f"--resolution must be positive, got {args.resolution}")
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    model = load_vae(args.path, allow_pickle=args.allow_pickle, device=device)
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
