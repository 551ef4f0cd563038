"""Distil a preview decoder (a TAESD-shaped diffusers.AutoencoderTiny) from a trained VAE.

    accelerate launch training/distill_preview.py VAE --data_dir DIR [--output_dir OUT] [--max_train_steps N] ...
    latentvae distill-preview VAE --data_dir DIR ...                                # the same, one process

The run itself reads top to bottom in `latentvae.training.distill` (it is also the `latentvae distill-preview`
subcommand, which the installed package carries and this folder's scripts are not part of); the flags are
`latentvae.training.preview.PreviewConfig`'s.
"""

import logging
import sys

from latentvae.pretrained import MissingWeightsError
from latentvae.training.distill import main
from latentvae.training.preview import parse_preview_config
from latentvae.training.step import NonFiniteTrainingError

if __name__ == "__main__":
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    config, given = parse_preview_config()
    try:
        main(config, given)
    except (MissingWeightsError, FileNotFoundError, ValueError, NonFiniteTrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
