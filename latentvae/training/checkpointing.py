"""Training checkpoints that a crash cannot corrupt: written to a temporary folder, renamed when complete.

A checkpoint is `output_dir/checkpoint-<step>/`: Accelerate's state (models, optimizers, schedulers, scaler, RNG
states, registered objects), each process's own state (`process-<rank>.json`, e.g. its data-stream position), the
model config, and last `training_state.json`, which lists every file with its size. A kill at any moment leaves
either a staging folder `.checkpoint-<step>.tmp` (ignored, removed by the next save) or a complete checkpoint:

- everything is written into the staging folder, flushed to disk (`fsync`), and only then renamed to its final
  name, in one atomic `os.replace`;
- a folder is removed by first renaming it to `.checkpoint-<step>.trash` (atomic) and then deleting it, so a
  half-deleted checkpoint never carries a checkpoint name;
- `latest_checkpoint` only returns folders whose state file exists and whose files all have the listed sizes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"  # written last: its presence marks a complete checkpoint

logger = logging.getLogger(__name__)


def _listed_files(folder: Path) -> dict[str, int]:
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()
    }


def is_complete(checkpoint: Path) -> bool:
    """Whether `checkpoint` has its state file and every file that file lists, at the listed size."""
    try:
        state = read_training_state(checkpoint)
    except (OSError, ValueError):
        return False
    listed = state.get("files", {})
    return all(
        (checkpoint / name).is_file() and (checkpoint / name).stat().st_size == size
        for name, size in listed.items()
    )


def checkpoint_steps(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir`, oldest first; half-written or damaged folders are ignored."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and is_complete(path):
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
    if not is_complete(path):
        raise FileNotFoundError(
            f"{path} is not a complete latentvae checkpoint (no {STATE_FILE}, or files missing or cut short); "
            f"pass a checkpoint-<step> folder from an output_dir, or 'latest'"
        )
    return path


def staging_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f".checkpoint-{step}.tmp"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    # So that a checkpoint renamed into place also survives a machine crash, not only a killed process.
    for path in [*folder.rglob("*"), folder]:
        _fsync(path)


def _remove(folder: Path) -> None:
    """Rename to a trash name first (atomic), then delete: an interrupted delete leaves only trash."""
    trash = folder.parent / f".{folder.name}.trash"
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def finalize_checkpoint(staging: Path, step: int, state: dict[str, Any]) -> Path:
    """Flush the staging folder, write the state file (listing every file and its size) and rename the folder
    to `checkpoint-<step>` in one atomic step."""
    _fsync_tree(staging)
    files = _listed_files(staging)
    with open(staging / (STATE_FILE + ".tmp"), "w") as handle:
        json.dump({"global_step": step, **state, "files": files}, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging / (STATE_FILE + ".tmp"), staging / STATE_FILE)
    final = staging.parent / f"checkpoint-{step}"
    if final.exists():  # a previous run wrote this step; the new one is at least as recent
        _remove(final)
    os.replace(staging, final)
    _fsync(final.parent)  # the rename itself
    return final


def prune_checkpoints(output_dir: str | os.PathLike, keep: int | None) -> list[Path]:
    """Remove the oldest complete checkpoints beyond `keep`, and stale temporary folders. Returns what was removed."""
    removed = []
    root = Path(output_dir)
    for stale in [*root.glob(".checkpoint-*.tmp"), *root.glob(".checkpoint-*.trash")]:
        shutil.rmtree(stale, ignore_errors=True)
        removed.append(stale)
    if keep is not None and keep > 0:
        for _, path in checkpoint_steps(root)[:-keep]:
            _remove(path)
            removed.append(path)
    return removed


def read_training_state(checkpoint: Path) -> dict[str, Any]:
    with open(checkpoint / STATE_FILE) as handle:
        return json.load(handle)


def process_state_file(checkpoint: Path, process_index: int) -> Path:
    return checkpoint / f"process-{process_index}.json"


def read_process_state(checkpoint: Path, process_index: int) -> dict[str, Any] | None:
    """The state this process saved beside the checkpoint (e.g. its data-stream position), or None."""
    path = process_state_file(checkpoint, process_index)
    return json.loads(path.read_text()) if path.is_file() else None


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    step: int,
    state: dict[str, Any],
    process_state: dict[str, Any] | None = None,
    model_config: Any = None,
    keep: int | None = None,
) -> Path:
    """Save a resumable checkpoint from every process; returns `output_dir/checkpoint-<step>`.

    Every process writes its part (Accelerate's per-process RNG state, `process_state`) into the staging folder;
    the main process adds the model config and the state file and renames the folder when all are done. The
    staging folder must be on a file system all processes share.

    Args:
        accelerator: The run's `Accelerator` (models, optimizers etc. registered through `prepare` or
            `register_for_checkpointing`).
        output_dir: Where checkpoints go.
        step: The optimizer step just completed.
        state: JSON-serialisable run state for `training_state.json` (epoch, config, ...).
        process_state: JSON-serialisable state of this process, read back by `read_process_state`.
        model_config: An object with `save_config(folder)` (a diffusers model), so `load_vae` reads the checkpoint.
        keep: Keep at most this many checkpoints (the oldest are removed).
    """
    staging = staging_dir(output_dir, step)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash: start clean, no stale files from it
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if process_state is not None:
        path = process_state_file(staging, accelerator.process_index)
        path.write_text(json.dumps(process_state))
    accelerator.wait_for_everyone()
    final = staging.parent / f"checkpoint-{step}"
    if accelerator.is_main_process:
        if model_config is not None:
            model_config.save_config(staging)  # so load_vae can read the checkpoint's weights directly
        finalize_checkpoint(staging, step, state)
        removed = prune_checkpoints(output_dir, keep)
        logger.info(f"saved {final}" + (f"; removed {', '.join(p.name for p in removed)}" if removed else ""))
    accelerator.wait_for_everyone()
    return final


def resume(accelerator, resume_from: str, output_dir: str | os.PathLike, data: Any = None) -> int:
    """Load a checkpoint into everything registered with `accelerator`, and `data`'s position; returns its step.

    Args:
        accelerator: The run's `Accelerator`, with the same models, optimizers and objects registered as when saved.
        resume_from: `latest` (the newest complete checkpoint in `output_dir`; none yet: start at step 0) or a
            checkpoint folder.
        output_dir: The run's output folder.
        data: An object with `load_state_dict(this_process_state, every_process_state)` for the `"data"` entry of
            the per-process states (`latentvae.data.loaders`), or None.
    """
    path = resolve_resume_path(resume_from, output_dir)
    if path is None:
        if accelerator.is_main_process:
            logger.info(f"no checkpoint in {output_dir} yet: starting from scratch")
        return 0
    accelerator.load_state(str(path))
    step = read_training_state(path)["global_step"]
    if data is not None:
        # Every process's saved state, also those of a run with another number of processes.
        every = [json.loads(p.read_text()).get("data") for p in sorted(path.glob("process-*.json"))]
        mine = read_process_state(path, accelerator.process_index) or {}
        data.load_state_dict(mine.get("data"), [state for state in every if state is not None])
    if accelerator.is_main_process:
        logger.info(f"resumed from {path} at step {step}")
    return step


def resume_command(argv: list[str], script: str = "training/train.py") -> str:
    """The command line of `script` with arguments `argv`, plus `--resume_from_checkpoint latest`."""
    if not any(a.startswith(("--resume_from_checkpoint", "--resume-from-checkpoint")) for a in argv):
        argv = [*argv, "--resume_from_checkpoint", "latest"]
    return f"accelerate launch {script} " + shlex.join(argv)
