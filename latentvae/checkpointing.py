"""Training checkpoints that a crash cannot corrupt: written to a temporary folder, renamed when complete."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"  # written last: its presence marks a complete checkpoint


def checkpoint_steps(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir`, oldest first; half-written temporary folders are ignored."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = checkpoint_steps(output_dir)
    return found[-1][1] if found else None


def resolve_resume_path(resume_from: str, output_dir: str | os.PathLike) -> Path | None:
    """`latest` -> newest complete checkpoint in output_dir (None if there is none yet); else the given folder."""
    if resume_from == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"{path} is not a complete latentvae checkpoint (no {STATE_FILE}); "
            f"pass a checkpoint-<step> folder from an output_dir, or 'latest'"
        )
    return path


def staging_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f".checkpoint-{step}.tmp"


def finalize_checkpoint(staging: Path, step: int, state: dict[str, Any]) -> Path:
    """Write the state file into the staging folder, then rename it to `checkpoint-<step>` in one atomic step."""
    with open(staging / (STATE_FILE + ".tmp"), "w") as handle:
        json.dump({"global_step": step, **state}, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging / (STATE_FILE + ".tmp"), staging / STATE_FILE)
    final = staging.parent / f"checkpoint-{step}"
    if final.exists():  # a previous run wrote this step; the new one is at least as recent
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


def prune_checkpoints(output_dir: str | os.PathLike, keep: int | None) -> list[Path]:
    """Remove the oldest complete checkpoints beyond `keep`, and stale temporary folders. Returns what was removed."""
    removed = []
    root = Path(output_dir)
    for stale in root.glob(".checkpoint-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
        removed.append(stale)
    if keep is not None and keep > 0:
        for _, path in checkpoint_steps(root)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def read_training_state(checkpoint: Path) -> dict[str, Any]:
    with open(checkpoint / STATE_FILE) as handle:
        return json.load(handle)
