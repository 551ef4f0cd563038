"""Every test runs offline: no test may reach the network (the tests of the download path switch this off for
themselves and serve files from local sockets). HF_HUB_OFFLINE is read by huggingface_hub when it is first imported,
and by latentvae.pretrained on every call. `hub`: the Hugging Face Hub's upload calls, recorded instead of made."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: it reads the variable once, then

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from huggingface_hub import CommitInfo, HfApi, RepoUrl  # noqa: E402
from huggingface_hub.utils import filter_repo_objects  # noqa: E402


@pytest.fixture
def hub(monkeypatch):
    """`HfApi.create_repo` and `upload_folder` replaced: each call recorded with the files the upload would send
    (the folder filtered by the patterns it was given, as huggingface_hub filters it)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append({"call": "create_repo", "repo_id": repo_id, "token": self.token, **kwargs})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        root = Path(folder_path)
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        sent = sorted(
            filter_repo_objects(
                files,
                allow_patterns=kwargs.get("allow_patterns"),
                ignore_patterns=kwargs.get("ignore_patterns"),
            )
        )
        calls.append(
            {
                "call": "upload_folder",
                "repo_id": repo_id,
                "folder": root,
                "files": sent,
                "token": self.token,
                **kwargs,
            }
        )
        url = f"https://huggingface.co/{repo_id}/commit/{len(calls):040d}"
        return CommitInfo(
            commit_url=url, commit_message=kwargs["commit_message"], commit_description="", oid="0"
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls
