"""Publish an export on the Hugging Face Hub: create the model repository if needed, then upload a folder.

The same two `huggingface_hub.HfApi` calls as the diffusers training examples (`create_repo(exist_ok=True)`, then
`upload_folder`), used by `training/train.py --push_to_hub` and `latentvae push`. The token is the one given, else
huggingface_hub's own (`HF_TOKEN`, or the one `hf auth login` saved).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import HfApi

from latentvae.files.export import CONFIG_NAME
from latentvae.pretrained import OFFLINE_ENV, offline_mode

# Left out of every upload: our temporary and staging files (atomic writes, checkpoints being written) start with
# a dot, as do editor and OS files.
HIDDEN = [".*", "**/.*"]


class PushError(ValueError):
    """A push that cannot start: offline, or not an export folder."""


def check_can_push(offline: bool = False) -> None:
    """Fail now, not after the training, when a push could not happen (offline).

    Raises:
        `PushError`: `offline` or `$HF_HUB_OFFLINE=1`.
    """
    if offline_mode(offline):
        raise PushError(f"cannot push to the Hub offline ({OFFLINE_ENV}=1 or --offline)")


def check_export_folder(folder: str | os.PathLike) -> list[str]:
    """The files of an export folder (one with a `config.json`), as `push_folder` would upload them.

    Raises:
        `PushError`: not a folder, or no `config.json` in it.
    """
    path = Path(folder)
    if not path.is_dir() or not (path / CONFIG_NAME).is_file():
        raise PushError(
            f"{path} is not an export folder (a folder with {CONFIG_NAME}): export one with training, "
            "latentvae.export_vae or `latentvae convert IN OUT --to diffusers`"
        )
    return sorted(
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload VAE",
    path_in_repo: str | None = None,
    allow_patterns: Sequence[str] | None = None,
    offline: bool = False,
) -> str:
    """Create model repository `repo_id` if it does not exist and upload `folder` into it in one commit.

    Args:
        folder: the folder to upload (hidden files left out).
        repo_id: `user/name` (or `name`, under the token's account).
        token: a Hub token with write access (default: huggingface_hub's).
        private: create the repository private (an existing one keeps its visibility).
        commit_message: the commit's message.
        path_in_repo: upload into this folder of the repository (default: its root).
        allow_patterns: upload only the files matching these patterns (fnmatch, relative to `folder`).
        offline: refuse, as with `$HF_HUB_OFFLINE=1`.

    Returns:
        The commit's URL on the Hub.

    Raises:
        `PushError`: offline.
    """
    check_can_push(offline)
    api = HfApi(token=token)
    # private=None: the Hub's default for the account (public unless an organisation says otherwise)
    repo = api.create_repo(repo_id, repo_type="model", private=private or None, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo.repo_id,
        repo_type="model",
        folder_path=str(folder),
        path_in_repo=path_in_repo,
        commit_message=commit_message,
        allow_patterns=list(allow_patterns) if allow_patterns is not None else None,
        ignore_patterns=HIDDEN,
    )
    return commit.commit_url
