"""The preview decoder against the full decoder: decode speed at 512 px and PSNR on held-out images.

    python eval/preview.py --vae VAE --preview PREVIEW [--images DIR] [--size 512] [--fidelity_size 256]
                           [--threads 1] [--out DIR]

`latentvae.benchmark.preview` says what is measured. Prints Markdown; with --out writes preview.json and preview.md.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderTiny

from latentvae.benchmark.modes import DEFAULT_IMAGES, list_images
from latentvae.benchmark.preview import decode_fidelity, decode_speed, render
from latentvae.files.loading import load_vae


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", required=True, help="the full VAE (any path latentvae.load_vae reads)")
    parser.add_argument("--preview", required=True, help="the preview decoder's folder (AutoencoderTiny)")
    parser.add_argument(
        "--images", default=str(DEFAULT_IMAGES), help="held-out images (default: BSDS500 val)"
    )
    parser.add_argument("--size", type=int, default=512, help="decode size of the speed measurement (px)")
    parser.add_argument(
        "--fidelity_size", type=int, default=256, help="crop size of the fidelity images (px)"
    )
    parser.add_argument("--max_images", type=int, default=None, help="use only the first N images")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="folder for preview.json and preview.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    vae = load_vae(args.vae).float().eval()
    preview = AutoencoderTiny.from_pretrained(args.preview).float().eval()
    images = list_images(Path(args.images))[: args.max_images]
    if not images:
        raise SystemExit(f"no images in {args.images}")
    speed = decode_speed(vae, preview, images[0], args.size, args.repeats)
    fidelity = decode_fidelity(vae, preview, images, args.fidelity_size)
    markdown = render(speed, fidelity)
    print(markdown)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        record = {
            "command": " ".join(["python", "eval/preview.py", *argv]),
            "threads": args.threads,
            "speed": speed,
            "fidelity": fidelity,
        }
        (out / "preview.json").write_text(json.dumps(record, indent=2) + "\n")
        (out / "preview.md").write_text(f"`{record['command']}` ({args.threads} thread(s))\n\n{markdown}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
