"""What the subcommands share: the usage error, the dtype names, the `--allow-pickle` flag, a folder's model card."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from latentvae.files.card import CardInfo

DTYPE_NAMES = ("fp32", "fp16", "bf16")  # torch dtypes: latentvae.models.inference.DTYPES


class UsageError(ValueError):
    """Arguments that parse but cannot be honoured (e.g. an output path of the wrong kind)."""


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures the command line reports in one line (exit 2) instead of a traceback."""
    from latentvae.data.images import BadImageError
    from latentvae.files.hub import PushError
    from latentvae.files.loading import VAEFileError

    return (FileNotFoundError, VAEFileError, UsageError, BadImageError, PushError)


def add_allow_pickle(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read .ckpt/.pt/.pth/.bin files with torch.load(weights_only=True); only for files you trust",
    )


def ensure_model_card(folder: str | Path, info: CardInfo) -> Path:
    """`folder/README.md`; an export folder without one (written before exports had cards) gets a fresh card from
    its model and `info`."""
    from latentvae.files.card import CARD_NAME
    from latentvae.files.export import WEIGHTS_NAME, write_model_card
    from latentvae.files.loading import load_vae

    folder = Path(folder)
    if not (folder / CARD_NAME).is_file():
        # the card names the single-file export: the .safetensors beside the diffusers weights
        singles = sorted(p.name for p in folder.glob("*.safetensors") if p.name != WEIGHTS_NAME)
        write_model_card(load_vae(folder), folder, singles[0] if singles else None, info)
    return folder / CARD_NAME
