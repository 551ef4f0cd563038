"""`latentvae push PATH REPO_ID`: upload an export folder to a Hugging Face Hub model repository."""

from __future__ import annotations

import argparse

from latentvae.cli.common import ensure_model_card


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path", help="an export folder (config.json + weights, as training and export_vae write)"
    )
    parser.add_argument("repo_id", help="the Hub model repository, user/name (created if it does not exist)")
    parser.add_argument(
        "--token", help="a Hub token with write access (default: HF_TOKEN or `hf auth login`'s)"
    )
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--commit_message", default="Upload VAE", help="(default: Upload VAE)")


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the parser is built without loading torch and diffusers.
    from latentvae.files.card import CARD_NAME, CardInfo
    from latentvae.files.hub import check_can_push, check_export_folder, push_folder

    check_can_push()
    files = check_export_folder(args.path)
    if (
        CARD_NAME not in files
    ):  # exported before exports had cards: write one, so the repository says what it is
        print(f"wrote a model card: {ensure_model_card(args.path, CardInfo(repo_id=args.repo_id))}")
        files = check_export_folder(args.path)
    url = push_folder(
        args.path, args.repo_id, token=args.token, private=args.private, commit_message=args.commit_message
    )
    print(f"pushed {len(files)} files ({', '.join(files)}) to {args.repo_id}: {url}")
    return 0
