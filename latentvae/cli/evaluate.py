"""`latentvae evaluate` / `python eval/evaluate.py`: flags -> settings and data -> `evaluate` -> files in OUT."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from latentvae.cli.common import DTYPE_NAMES, UsageError, ensure_model_card

if TYPE_CHECKING:
    from latentvae.evaluation.results import ModelSpec


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the `evaluate` arguments to `parser`."""
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        required=True,
        metavar="[NAME=]PATH",
        help="a VAE folder or weights file (anything load_vae reads); repeat it to compare models; "
        "NAME defaults to the folder or file name",
    )
    parser.add_argument("--data_dir", help="folder of images to evaluate on, searched recursively")
    parser.add_argument("--dataset_name", help="or a Hugging Face dataset (Hub name or local folder)")
    parser.add_argument("--image_column", default="image", help="the dataset's image column (default: image)")
    parser.add_argument("--split", default="train", help="the dataset split (default: train)")
    parser.add_argument(
        "--output_dir", required=True, help="for summary.json, per_image.csv, report.md, grids"
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=256,
        help="resize the shorter side to N (PIL bicubic) and center-crop NxN (default: 256)",
    )
    parser.add_argument(
        "--resize",
        choices=("crop", "none"),
        default="crop",
        help="none: native size, reflect-padded to the downsampling factor and cropped back (--resolution unused)",
    )
    parser.add_argument("--batch_size", type=int, default=8, help="images per batch (default: 8)")
    parser.add_argument("--max_images", type=int, help="only the first N image files, in name order")
    parser.add_argument(
        "--lpips_net",
        choices=("alex", "vgg", "squeeze"),
        default="alex",
        help="LPIPS backbone (default: alex)",
    )
    parser.add_argument("--no_lpips", action="store_true", help="leave LPIPS out")
    fid = parser.add_mutually_exclusive_group()
    fid.add_argument("--fid", dest="fid", action="store_true", default=True, help="rFID (the default)")
    fid.add_argument("--no_fid", dest="fid", action="store_false", help="leave rFID out")
    parser.add_argument(
        "--sample_posterior", action="store_true", help="decode a seeded posterior sample, not the mode"
    )
    parser.add_argument("--seed", type=int, default=0, help="for posterior samples (default: 0)")
    parser.add_argument("--device", default="auto", help="torch device; auto: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="model dtype (default: fp32)")
    parser.add_argument(
        "--grid_images", type=int, default=4, help="worst and best images drawn per model (default: 4)"
    )
    parser.add_argument(
        "--allow_pickle", action="store_true", help="read .ckpt/.pt/.bin model files; only files you trust"
    )
    parser.add_argument(
        "--update_card",
        action="store_true",
        help="put the comparison table into each --model folder's model card (README.md), replacing an earlier one",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="never download LPIPS / FID weights (as HF_HUB_OFFLINE=1); a missing one leaves its column empty",
    )


def run(args: argparse.Namespace) -> int:
    """Run `evaluate` from parsed arguments; returns the exit code."""
    # Imported here, not at the top: the parser is built without loading torch and diffusers.
    import torch

    from latentvae.evaluation.evaluate import evaluate, open_data
    from latentvae.evaluation.report import card_evaluation, comparison_table, write_outputs
    from latentvae.evaluation.results import EvalSettings, EvaluationError, parse_model_arg
    from latentvae.models.inference import DTYPES

    for flag in ("resolution", "batch_size", "max_images", "grid_images"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be at least 1, got {value}")
    specs = [parse_model_arg(text) for text in args.models]
    for spec in specs:
        if not spec.path.exists():
            raise FileNotFoundError(f"--model {spec.name}: no such VAE file or folder: {spec.path}")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = EvalSettings(
        resolution=None if args.resize == "none" else args.resolution,
        batch_size=args.batch_size,
        sample_posterior=args.sample_posterior,
        seed=args.seed,
        lpips_net=None if args.no_lpips else args.lpips_net,
        fid=args.fid,
        device=device,
        dtype=DTYPES[args.dtype],
        grid_images=args.grid_images,
        allow_pickle=args.allow_pickle,
        offline=args.offline,
    )
    try:
        data = open_data(args.data_dir, args.dataset_name, args.image_column, args.split, args.max_images)
        evaluation = evaluate(specs, data, settings)
    except EvaluationError as err:
        raise UsageError(str(err)) from err
    written = write_outputs(evaluation, args.output_dir)
    summaries = [model.summary() for model in evaluation.models]
    print(comparison_table(summaries))
    print(f"wrote {', '.join(path.name for path in written.values())} to {args.output_dir}")
    if args.update_card:
        update_cards(specs, card_evaluation(evaluation, summaries, args.command_line))
    return 0


def update_cards(specs: list[ModelSpec], markdown: str) -> None:
    """Attach `markdown` to the model card of every model given as a folder (a folder without a card gets one)."""
    from latentvae.files.card import CardInfo
    from latentvae.files.export import update_card_evaluation

    for spec in specs:
        if not spec.path.is_dir():
            print(f"--update_card: {spec.path} is not a folder, so it has no model card; left out")
            continue
        card = update_card_evaluation(ensure_model_card(spec.path, CardInfo()), markdown)
        print(f"--update_card: the evaluation is in {card}")
