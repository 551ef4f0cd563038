"""`latentvae benchmark` / `python eval/benchmark.py`: speed and memory (`latentvae.benchmark.modes`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from latentvae.benchmark.modes import (
    DEFAULT_IMAGES,
    DEFAULT_MODES,
    MODES,
    QUICK,
    VARIANTS,
    child_main,
    run_benchmark,
)


def configure(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--preset", default="sd-kl-f8", help="model shape of the speed and training modes (random weights)")
    add("--model", help="trained VAE (folder or file) for tiling, fp16 and fidelity (default: the preset)")
    add("--modes", nargs="+", choices=list(MODES), default=DEFAULT_MODES,
        help=f"what to measure (default: {' '.join(DEFAULT_MODES)})")  # fmt: skip
    add("--data", action="store_true", help="only the data-loader benchmark (the same as --modes data)")
    add("--data-workers", nargs="+", type=int, default=[0, 1, 2], help="DataLoader worker counts to time")
    add("--data-resolution", type=int, default=256, help="training crop size of the data benchmark")
    add("--data-batches", type=int, default=20, help="batches of 16 timed per worker count")
    add("--train-images-per-s", type=float,
        help="training rate per GPU for the workers-needed line (default: the training mode's, when it runs)")  # fmt: skip
    add("--sizes", nargs="+", type=int, default=[256, 512, 1024], help="encode/decode image sizes in px")
    add("--batch-sizes", nargs="+", type=int, default=[1, 4])
    add("--max-pixels", type=int, help="skip size x batch combinations with more pixels per call than this")
    add("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="NAME",
        help=f"from {', '.join(VARIANTS)} (low: bf16, fp16 on CUDA; cl: channels_last); the first is the baseline")  # fmt: skip
    add("--emulated-bf16", action="store_true",
        help="run the bf16 variants on a CPU without bf16 instructions too (skipped by default: emulated, very slow)")  # fmt: skip
    add("--repeats", type=int, default=5, help="timed rounds per case (median reported)")
    add("--train-sizes", nargs="+", type=int, default=[128, 256])
    add("--train-batch", type=int, default=1)
    add("--tile-sizes", nargs="+", type=int, default=[1024, 2048], help="tiled decode image sizes in px")
    add(
        "--tile", type=int, help="tile size in px for both implementations (default: the model's sample_size)"
    )
    add("--images", type=Path, default=DEFAULT_IMAGES, help="real photos for tiling, fp16 and fidelity")
    add("--fidelity-images", type=int, default=100)
    add("--fp16-images", type=int, default=4)
    add("--fp16-size", type=int, default=256)
    add("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    add("--device", default="auto", help="torch device; auto: cuda if available, else cpu")
    add("--out", type=Path, default=Path("eval/results"), help="folder for benchmark.json and benchmark.md")
    add("--quick", action="store_true", help=f"a subset, about 2 minutes on a CPU (flags given win): {QUICK}")
    add("--child", help=argparse.SUPPRESS)  # one tiling case, run by benchmark.run_child


def run(args: argparse.Namespace) -> int:
    if args.child:
        child_main(json.loads(args.child))
        return 0
    if args.quick:
        defaults = argparse.ArgumentParser()
        configure(defaults)
        for key, value in QUICK.items():
            if getattr(args, key) == defaults.get_default(key):  # flags given explicitly win over --quick
                setattr(args, key, value)
    if args.data:
        args.modes = ["data"]
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return run_benchmark(args)
