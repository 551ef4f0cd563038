"""Fault injection into training: a folder of broken and odd files, SIGTERM / SIGINT, kill -9 in the middle of a
checkpoint, interrupted file operations, NaN images and NaN losses.

Oracles: the files each fault leaves on disk read back (`latest_checkpoint`, `load_vae`, the state file), exit
codes, an uninterrupted run of the same flags (exact resume), snapshots of weights and optimizer state taken
around the faulty step.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from bad_data_zoo import write_zoo
from safetensors.torch import load_file
from test_train import ROOT, base_flags, checkpoint_tensors, free_port, train, write_images
from train_helpers import assert_identical, reset_accelerate, snapshot, tensors_in

from latentvae.data.skips import TooManyBadImagesError
from latentvae.training.checkpointing import (
    finalize_checkpoint,
    is_complete,
    latest_checkpoint,
    prune_checkpoints,
)

PROBE = ROOT / "tests" / "robustness_probe.py"


@pytest.fixture(autouse=True)
def clean_accelerate_state():
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def image_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("images")
    write_images(root / "train", 16, seed=1)
    write_images(root / "val", 2, seed=2)
    return root / "train", root / "val"


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "final" / "diffusion_pytorch_model.safetensors")


# -- the bad-data zoo -----------------------------------------------------------------------------------------------


@pytest.fixture
def zoo(tmp_path) -> tuple[Path, dict[str, str | None]]:
    expected = write_zoo(tmp_path / "zoo")
    yield tmp_path / "zoo", expected
    (tmp_path / "zoo" / "locked.png").chmod(0o644)


def test_a_zoo_beyond_the_bad_fraction_stops_before_any_model_is_built(zoo, image_dirs, tmp_path):
    folder, expected = zoo
    flags = base_flags((folder, image_dirs[1]), tmp_path / "run") + ["--max_train_steps", "2"]
    from latentvae.training.config import parse_config
    from training.train import main

    started = time.time()
    with pytest.raises(TooManyBadImagesError) as caught:
        main(*parse_config(flags))  # default --max_bad_fraction 0.1
    assert time.time() - started < 10  # before any model or loss is built
    message = str(caught.value)
    for name, reason in expected.items():
        if reason is not None and name != "cut.jpg":  # the header scan cannot see a cut-off JPEG body
            assert f"{folder / name}: {reason.replace('_', ' ')}" in message
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("checkpoint-*"))


def test_training_on_the_zoo_skips_each_broken_file_once_and_sums_them_up(
    zoo, image_dirs, tmp_path, capsys, caplog
):
    folder, expected = zoo
    flags = ["--max_bad_fraction", "0.5", "--max_train_steps", "3", "--scaling_factor_images", "64"]
    with caplog.at_level("WARNING"):
        train((folder, image_dirs[1]), tmp_path, *flags)
    broken = {name: reason for name, reason in expected.items() if reason is not None}
    for name in expected:  # one warning per broken file, none for the odd but valid ones
        warnings = [
            r for r in caplog.records if r.getMessage().startswith(f"Skipping image {folder / name}:")
        ]
        assert len(warnings) == (name in broken), (name, [r.getMessage() for r in warnings])
    summary = capsys.readouterr().out
    counts = {}
    for reason in broken.values():
        counts[reason] = counts.get(reason, 0) + 1
    assert f"skipped images: {len(broken)} images skipped (" in summary
    for reason, count in counts.items():
        assert f"{count} {reason.replace('_', ' ')}" in summary
    assert (tmp_path / "final" / "config.json").is_file()


def test_the_running_check_stops_when_too_many_images_fail_to_decode():
    from latentvae.data.skips import BadDataMonitor, SkipLog

    log = SkipLog()
    monitor = BadDataMonitor(log, max_fraction=0.1, where="photos/", min_tried=20)
    good = {"path": ["x.png"] * 4, "skipped": []}
    for i in range(4):  # 2 failures in 18 tried: not judged yet (< 20)
        monitor.update(good if i % 2 else {"path": ["y.png"] * 4, "skipped": [(f"bad{i}.jpg", "truncated")]})
    monitor.update(
        {"path": ["z.png"] * 4, "skipped": [("bad0.jpg", "truncated")]}
    )  # known: not counted again
    assert monitor.tried == 22 and len(monitor.bad) == 2  # 9.1 %: fine
    with pytest.raises(
        TooManyBadImagesError, match=r"(?s)3 of 24 images in photos/ \(12\.5 %\).*bad4\.jpg: truncated"
    ):
        monitor.update({"path": ["w.png"], "skipped": [("bad4.jpg", "truncated")]})
    assert set(log.reasons) == {"bad0.jpg", "bad2.jpg", "bad4.jpg"}


# -- signals ----------------------------------------------------------------------------------------------------------


def launch_probe(
    mode: str, probe_dir: Path, flags: list[str], seconds: float = 0.5, launcher=()
) -> subprocess.Popen:
    probe_dir.mkdir(parents=True, exist_ok=True)
    # One process: this one's thread count, so that its convolutions round exactly like the in-process runs it is
    # compared with (oneDNN's blocking, and so its summation order, depends on the thread count). Two: one each.
    threads = 1 if launcher else torch.get_num_threads()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": str(threads),
        "PROBE_STEP_SECONDS": str(seconds),
    }
    command = [*launcher, str(PROBE), mode, str(probe_dir), *flags] if launcher else None
    command = command or [sys.executable, str(PROBE), mode, str(probe_dir), *flags]
    out = open(probe_dir / "output.txt", "w")
    return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def wait_for(condition, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended early (exit {process.returncode})"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def steps_done(probe_dir: Path, rank: int = 0) -> list[int]:
    path = probe_dir / f"steps-{rank}"
    return [int(line) for line in path.read_text().split()] if path.is_file() else []


def test_sigterm_finishes_the_step_checkpoints_exits_0_and_resumes_exactly(image_dirs, tmp_path):
    flags = ["--max_train_steps", "4", "--checkpointing_steps", "100", "--ema_decay", "0.9"]
    out, probe_dir = tmp_path / "run", tmp_path / "probe"
    run = launch_probe("steps", probe_dir, base_flags(image_dirs, out) + flags, seconds=0.3)
    wait_for(lambda: len(steps_done(probe_dir)) >= 1, run)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == 0
    log = (probe_dir / "output.txt").read_text()
    assert "received SIGTERM" in log and "--resume_from_checkpoint latest" in log
    (checkpoint,) = out.glob("checkpoint-*")
    stopped_at = int(checkpoint.name.split("-")[1])
    assert steps_done(probe_dir)[-1] == stopped_at < 4  # the step under way was finished, no further one
    assert is_complete(checkpoint) and not (out / "final").exists()

    train(image_dirs, out, *flags, "--resume_from_checkpoint", "latest")
    train(image_dirs, tmp_path / "straight", *flags)
    assert_identical(
        checkpoint_tensors(out / "checkpoint-4"), checkpoint_tensors(tmp_path / "straight" / "checkpoint-4")
    )
    assert_identical(final_weights(out), final_weights(tmp_path / "straight"))


def test_a_second_signal_ends_the_run_at_once(image_dirs, tmp_path):
    out, probe_dir = tmp_path / "run", tmp_path / "probe"
    flags = base_flags(image_dirs, out) + ["--max_train_steps", "6", "--checkpointing_steps", "100"]
    run = launch_probe("steps", probe_dir, flags, seconds=5.0)  # each step then takes over 5 s
    wait_for(lambda: len(steps_done(probe_dir)) >= 1, run)
    run.send_signal(signal.SIGINT)
    time.sleep(0.3)
    sent = time.time()
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=60) == -signal.SIGINT
    assert time.time() - sent < 2.0  # not the rest of the 5-second step, nor a checkpoint
    assert latest_checkpoint(out) is None and not (out / "final").exists()
    assert "received SIGINT" in (probe_dir / "output.txt").read_text()


@pytest.mark.slow
def test_a_signal_to_one_of_two_processes_stops_both_after_the_same_step(image_dirs, tmp_path):
    out, probe_dir = tmp_path / "run", tmp_path / "probe"
    flags = base_flags(image_dirs, out) + ["--max_train_steps", "6", "--checkpointing_steps", "100"]
    launcher = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
    ]  # fmt: skip
    run = launch_probe("steps", probe_dir, flags, launcher=launcher)
    wait_for(lambda: len(steps_done(probe_dir, rank=1)) >= 2, run)
    os.kill(int((probe_dir / "pid-1").read_text()), signal.SIGTERM)  # rank 1 only
    assert run.wait(timeout=180) == 0, (probe_dir / "output.txt").read_text()[-3000:]
    (checkpoint,) = out.glob("checkpoint-*")
    stopped_at = int(checkpoint.name.split("-")[1])
    assert steps_done(probe_dir, 0)[-1] == steps_done(probe_dir, 1)[-1] == stopped_at < 6
    assert sorted(p.name for p in checkpoint.glob("process-*.json")) == ["process-0.json", "process-1.json"]


# -- kill -9 and interrupted checkpoint writes ------------------------------------------------------------------------


def test_kill_9_while_writing_a_checkpoint_leaves_the_previous_one_usable(image_dirs, tmp_path):
    from latentvae.files.loading import load_vae

    flags = ["--max_train_steps", "3", "--checkpointing_steps", "1"]
    out, probe_dir = tmp_path / "run", tmp_path / "probe"
    run = launch_probe("save", probe_dir, base_flags(image_dirs, out) + flags)
    wait_for(lambda: (probe_dir / "saving").exists(), run)
    run.kill()
    assert run.wait(timeout=60) == -signal.SIGKILL
    half = out / ".checkpoint-2.tmp" / "model.safetensors"
    assert half.stat().st_size < (out / "checkpoint-1" / "model.safetensors").stat().st_size  # cut mid-write
    assert latest_checkpoint(out) == out / "checkpoint-1"
    vae = load_vae(out / "checkpoint-1")
    saved = load_file(out / "checkpoint-1" / "model.safetensors")
    assert_identical({f"vae.{k}": v for k, v in vae.state_dict().items()}, saved)

    train(image_dirs, out, *flags, "--resume_from_checkpoint", "latest")
    assert not (out / ".checkpoint-2.tmp").exists()  # the next save cleared the leftovers
    train(image_dirs, tmp_path / "straight", *flags)
    assert_identical(final_weights(out), final_weights(tmp_path / "straight"))


class Crash(BaseException):
    """Stands for the process dying at this point."""


def make_staging(root: Path, step: int, fill: bytes) -> Path:
    staging = root / f".checkpoint-{step}.tmp"
    staging.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl"):
        (staging / name).write_bytes(fill * (100 + step))
    return staging


def test_a_crash_at_any_file_operation_of_a_save_leaves_a_complete_latest(tmp_path, monkeypatch):
    import latentvae.training.checkpointing as checkpointing

    real_replace, real_rmtree = os.replace, shutil.rmtree

    def run_save(root: Path, crash_at: int) -> None:
        """Save step 2 over an existing step 2 (a re-run), then prune to 2 checkpoints, dying at operation N."""
        calls = iter(range(10**6))

        def crashing(real):
            def operation(*args, **kwargs):
                if next(calls) == crash_at:
                    if real is real_rmtree:  # die half-way through a delete
                        files = [p for p in Path(args[0]).rglob("*") if p.is_file()]
                        if files:
                            files[0].unlink()
                    raise Crash
                return real(*args, **kwargs)

            return operation

        monkeypatch.setattr(checkpointing.os, "replace", crashing(real_replace))
        monkeypatch.setattr(checkpointing.shutil, "rmtree", crashing(real_rmtree))
        try:
            finalize_checkpoint(make_staging(root, 2, b"new"), 2, {})
            prune_checkpoints(root, keep=2)
        except Crash:
            pass
        finally:
            monkeypatch.undo()

    outcomes = set()
    for crash_at in range(12):
        root = tmp_path / f"crash-{crash_at}"
        for step, fill in ((0, b"zero"), (1, b"one"), (2, b"old")):
            finalize_checkpoint(make_staging(root, step, fill), step, {})
        run_save(root, crash_at)
        latest = latest_checkpoint(root)
        content = (latest / "model.safetensors").read_bytes()
        assert is_complete(latest)
        assert content in (b"old" * 102, b"new" * 102, b"one" * 101), (crash_at, latest)
        outcomes.add(content[:3])
    assert outcomes == {b"old", b"new", b"one"}  # every stage was hit, the save itself and the prune
    # A file cut short after the rename (a disk error, another tool) is noticed too.
    with open(latest / "optimizer.bin", "r+b") as handle:
        handle.truncate(10)
    assert latest_checkpoint(latest.parent) != latest


# -- NaN --------------------------------------------------------------------------------------------------------------


def test_a_nan_image_skips_its_step_without_touching_weights_optimizer_or_ema(
    image_dirs, tmp_path, monkeypatch, caplog
):
    from diffusers.training_utils import EMAModel

    from latentvae.data.images import ImageDataset
    from latentvae.training.step import TrainStep

    load_item, step, ema_step = ImageDataset.__getitem__, TrainStep.__call__, EMAModel.step
    steps, ema_steps = [], []

    def poisoned_item(self, index):  # a corrupt decode of img03 turns into NaN pixels
        item = load_item(self, index)
        if self.train and item["path"].endswith("img03.png"):
            item["pixel_values"] = torch.full_like(item["pixel_values"], float("nan"))
        return item

    def state(train_step) -> dict[str, torch.Tensor]:  # copies: Adam updates its tensors in place
        adam = tensors_in(train_step.optimizer.state_dict()["state"], "adam")
        return {**snapshot(train_step.vae), **{k: v.clone() for k, v in adam.items()}}

    def recorded_step(self, images, global_step, generator=None):
        before = state(self)
        logs = step(self, images, global_step, generator)
        after = state(self)
        steps.append((global_step + 1, list(self.skipped), before, after))
        return logs

    monkeypatch.setattr(ImageDataset, "__getitem__", poisoned_item)
    monkeypatch.setattr(TrainStep, "__call__", recorded_step)
    monkeypatch.setattr(EMAModel, "step", lambda self, params: ema_steps.append(1) or ema_step(self, params))
    flags = ["--max_train_steps", "8", "--checkpointing_steps", "1", "--ema_decay", "0.9"]
    with caplog.at_level("WARNING"):
        train(image_dirs, tmp_path, *flags)  # 16 images, 2 a step: img03 is in exactly one step

    (bad,) = [number for number, skipped, _, _ in steps if skipped]
    for number, skipped, before, after in steps:
        if number == bad:
            assert skipped == ["autoencoder"]
            assert_identical(after, before)  # weights, Adam moments and step count
        else:
            # Adam stepped (the weights may not move yet: the learning rate warms up from 0)
            assert after["adam.0.step"] == before.get("adam.0.step", 0) + 1
    assert len(ema_steps) == 7  # no EMA update for the skipped step
    warning = next(r.getMessage() for r in caplog.records if "non-finite" in r.getMessage())
    assert f"step {bad}:" in warning and "img03.png" in warning
    names = {p.name for p in tmp_path.glob("checkpoint-*")}
    assert f"checkpoint-{bad}" not in names and len(names) == 3  # none right after the NaN; limit 3 kept
    assert (tmp_path / "final" / "config.json").is_file()


def test_nan_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(image_dirs, tmp_path, monkeypatch):
    from latentvae.training.losses import AutoencoderLoss
    from latentvae.training.step import NonFiniteTrainingError

    loss = AutoencoderLoss.autoencoder_loss

    def diverging(self, *args, **kwargs):  # from the third step on, the loss is NaN
        value, logs = loss(self, *args, **kwargs)
        global_step = args[2] if len(args) > 2 else kwargs["global_step"]
        return (value * float("nan"), logs) if global_step >= 2 else (value, logs)

    monkeypatch.setattr(AutoencoderLoss, "autoencoder_loss", diverging)
    flags = ["--max_train_steps", "10", "--checkpointing_steps", "1", "--max_nonfinite_steps", "2"]
    with pytest.raises(NonFiniteTrainingError, match=r"3 steps in a row.*step 5.*checkpoint-2"):
        train(image_dirs, tmp_path, *flags)
    assert sorted(p.name for p in tmp_path.glob("*checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert json.loads((tmp_path / "checkpoint-2" / "training_state.json").read_text())["global_step"] == 2
    assert not (tmp_path / "final").exists()
