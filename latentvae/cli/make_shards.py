"""`latentvae make-shards IMAGE_DIR OUT_DIR --shard_size N`: write the shards, print the pattern to train on."""

from __future__ import annotations

import argparse

from latentvae.cli.common import UsageError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image_dir", help="folder of images, searched recursively as training does")
    parser.add_argument("out_dir", help="empty or new folder for shard-000000.tar, shard-000001.tar, ...")
    parser.add_argument("--shard_size", "--shard-size", type=int, default=1000, help="images per shard")
    parser.add_argument(
        "--verify", action="store_true", help="decode every image fully (slow; also catches cut-off JPEGs)"
    )


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the parser is built without loading torch and webdataset.
    from latentvae.data.shards import make_shards, shard_pattern

    try:
        shards, skipped = make_shards(args.image_dir, args.out_dir, args.shard_size, verify=args.verify)
    except (FileExistsError, ValueError) as err:
        raise UsageError(str(err)) from err
    print(f"wrote {len(shards)} shards to {args.out_dir} ({skipped.summary()})")
    print(f"train on them with: --train_shards '{shard_pattern(shards)}'")
    return 0
