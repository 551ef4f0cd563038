"""`latentvae distill-preview VAE --data_dir DIR`: distil a preview decoder (a TAESD-shaped
`diffusers.AutoencoderTiny`) from a trained VAE (`latentvae.training.distill`; with several processes:
`accelerate launch -m latentvae distill-preview ...` or `accelerate launch training/distill_preview.py ...`)."""

from __future__ import annotations

import argparse
import logging
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    # The flags are the config's fields (this loads torch: only for this subcommand's parser).
    from latentvae.training.preview import add_preview_arguments

    add_preview_arguments(parser)


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the parser is built without loading the training loop.
    from latentvae.pretrained import MissingWeightsError
    from latentvae.training.distill import main
    from latentvae.training.preview import preview_config
    from latentvae.training.step import NonFiniteTrainingError

    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    cfg, explicit = preview_config(args)
    try:
        main(cfg, explicit)
    except (MissingWeightsError, ValueError, NonFiniteTrainingError) as error:
        print(f"latentvae distill-preview: error: {error}", file=sys.stderr)
        return 2
    return 0
