"""What the subcommands share: the usage error, the dtype names, the `--allow-pickle` flag."""

from __future__ import annotations

import argparse

DTYPE_NAMES = ("fp32", "fp16", "bf16")  # torch dtypes: latentvae.models.inference.DTYPES


class UsageError(ValueError):
    """Arguments that parse but cannot be honoured (e.g. an output path of the wrong kind)."""


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures the command line reports in one line (exit 2) instead of a traceback."""
    from latentvae.data.images import BadImageError
    from latentvae.files.loading import VAEFileError

    return (FileNotFoundError, VAEFileError, UsageError, BadImageError)


def add_allow_pickle(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read .ckpt/.pt/.pth/.bin files with torch.load(weights_only=True); only for files you trust",
    )
