"""`latentvae diagnose` / `python eval/evaluate.py --diagnostics`: the latent health, artefact checks and diffusion
probe of one or more VAEs on the same images -> diagnostics.json, diagnostics.md and plots in OUT."""

from __future__ import annotations

import argparse

from latentvae.cli.common import DTYPE_NAMES, UsageError

# (flag, type, default, help) of the counts, each at least 1
COUNTS = (
    ("resolution", 256, "resize the shorter side to N (PIL bicubic) and center-crop NxN (default: 256)"),
    ("batch_size", 8, "images per batch (default: 8)"),
    ("drift_images", 8, "images encoded and decoded k = 1, 2, 4, 8 times (default: 8)"),
    ("seam_images", 2, "images decoded whole and tiled at twice the tile size (default: 2)"),
    ("grid_samples", 8, "prior samples and probe samples drawn per model (default: 8)"),
    ("interpolation_steps", 8, "images along each interpolation (default: 8)"),
    ("probe_steps", 400, "training steps of the diffusion probe (default: 400)"),
    ("probe_batch_size", 16, "latents per probe step (default: 16)"),
    ("probe_width", 16, "channels of the probe UNet's first level per 4 latent channels (default: 16)"),
    ("probe_timesteps", 8, "fixed times of the probe's held-out loss (default: 8)"),
    ("probe_images", 64, "training images of the probe: the first N (default: 64)"),
    (
        "probe_val_images",
        16,
        "held-out images of the probe: the last N, at most half the images (default: 16)",
    ),
    ("probe_views", 2, "random crops (with flips) per probe training image (default: 2)"),
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the `diagnose` arguments to `parser`."""
    parser.add_argument(
        "paths",
        nargs="*",
        metavar="MODEL",
        help="[NAME=]PATH of a VAE (anything load_vae reads); several: side by side",
    )
    parser.add_argument("--model", dest="models", action="append", default=[], metavar="[NAME=]PATH",
                        help="a model, as in `evaluate` (may be repeated; joins the MODEL arguments)")  # fmt: skip
    parser.add_argument("--data_dir", help="folder of images, searched recursively")
    parser.add_argument("--dataset_name", help="or a Hugging Face dataset (Hub name or local folder)")
    parser.add_argument("--image_column", default="image", help="the dataset's image column (default: image)")
    parser.add_argument("--split", default="train", help="the dataset split (default: train)")
    parser.add_argument(
        "--output_dir", required=True, help="for diagnostics.json, diagnostics.md and the plots"
    )
    parser.add_argument("--max_images", type=int, help="only the first N image files, in name order")
    for flag, default, text in COUNTS:
        parser.add_argument(f"--{flag}", type=int, default=default, help=text)
    parser.add_argument("--probe_lr", type=float, default=1e-3, help="the probe's AdamW learning rate (1e-3)")
    parser.add_argument("--no_probe", action="store_true", help="leave the diffusion probe out")
    parser.add_argument(
        "--seed", type=int, default=0, help="for posterior samples, crops and the probe (default: 0)"
    )
    parser.add_argument("--device", default="auto", help="torch device; auto: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="model dtype (default: fp32)")
    parser.add_argument(
        "--allow_pickle", action="store_true", help="read .ckpt/.pt/.bin model files; only files you trust"
    )


def run(args: argparse.Namespace) -> int:
    """Run `diagnose` from parsed arguments; returns the exit code."""
    # Imported here, not at the top: the parser is built without loading torch and diffusers.
    import torch

    from latentvae.evaluation.diagnostics import DiagnoseSettings, describe, diagnose
    from latentvae.evaluation.diagnostics_report import write_diagnostics
    from latentvae.evaluation.evaluate import open_data
    from latentvae.evaluation.probe import ProbeSettings
    from latentvae.evaluation.results import EvaluationError, parse_model_arg
    from latentvae.models.inference import DTYPES

    for flag in [name for name, *_ in COUNTS] + ["max_images"]:
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be at least 1, got {value}")
    specs = [parse_model_arg(text) for text in [*args.paths, *args.models]]
    if not specs:
        raise UsageError(
            "name one or more VAEs: latentvae diagnose MODEL [MODEL ...] --data_dir DIR --output_dir OUT"
        )
    for spec in specs:
        if not spec.path.exists():
            raise FileNotFoundError(f"model {spec.name}: no such VAE file or folder: {spec.path}")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    probe = ProbeSettings(
        steps=args.probe_steps,
        batch_size=args.probe_batch_size,
        learning_rate=args.probe_lr,
        width=args.probe_width,
        timesteps=args.probe_timesteps,
        eval_every=max(1, args.probe_steps // 10),
        seed=args.seed,
    )
    settings = DiagnoseSettings(
        resolution=args.resolution,
        batch_size=args.batch_size,
        seed=args.seed,
        device=device,
        dtype=DTYPES[args.dtype],
        allow_pickle=args.allow_pickle,
        drift_images=args.drift_images,
        seam_images=args.seam_images,
        grid_samples=args.grid_samples,
        interpolation_steps=max(2, args.interpolation_steps),
        probe=None if args.no_probe else probe,
        probe_images=args.probe_images,
        probe_val_images=args.probe_val_images,
        probe_views=args.probe_views,
    )
    try:
        data = open_data(args.data_dir, args.dataset_name, args.image_column, args.split, args.max_images)
        results = diagnose(specs, data, settings)
    except EvaluationError as err:
        raise UsageError(str(err)) from err
    written = write_diagnostics(results, describe(settings, data), args.output_dir, args.command_line)
    print(written["report"].read_text().split("## Per channel")[0])
    print(f"wrote {', '.join(path.name for path in written.values())} to {args.output_dir}")
    return 0
