"""eval/recipes.py, the recipe benchmark, for a few steps on a small init: what it trains, what it writes.

Oracles: the diffusers model built directly (the fixed init), the training script's own exported config, the
evaluation summary written beside each run, the files read back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from latentvae.benchmark.recipes import Budget, build_init, parse_run, train_command, train_runs

ROOT = Path(__file__).resolve().parents[1]


def write_photos(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:40, 0:48]
    for i in range(count):
        waves = np.stack([np.sin(xx / (3 + i)), np.cos(yy / 5), np.sin((xx + yy) / (4 + i))], axis=-1)
        pixels = (127.5 + 110 * waves + rng.normal(0, 8, waves.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"p{i}.png")


def test_the_init_is_diffusers_autoencoderkl_after_seed_0(tmp_path):
    folder = build_init((32, 64), tmp_path / "init")
    torch.manual_seed(0)
    expected = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
    ).state_dict()
    got = diffusers.AutoencoderKL.from_pretrained(folder).state_dict()
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_a_run_names_a_recipe_and_cannot_change_the_budget():
    run = parse_run("fast=from-scratch --learning_rate 1e-3")
    assert (run.label, run.recipe, run.flags) == ("fast", "from-scratch", ("--learning_rate", "1e-3"))
    assert parse_run("diffusers-example").label == "diffusers-example"
    with pytest.raises(SystemExit, match="give a recipe first"):
        parse_run("no-such-recipe")
    with pytest.raises(SystemExit, match="--max_train_steps is set by the benchmark"):
        parse_run("diffusers-example --max_train_steps 5")


def test_a_failed_run_lets_the_others_finish_and_an_interrupted_one_resumes(tmp_path):
    done = tmp_path / "slow" / "done"
    jobs = [
        ("broken", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "broken"),
        (
            "slow",
            [sys.executable, "-c", f"import time; time.sleep(2); open({str(done)!r}, 'w')"],
            done.parent,
        ),
    ]
    with pytest.raises(SystemExit, match=r"broken \(exit 3"):
        train_runs(jobs, parallel=2)
    assert done.exists()  # the slow run was not stopped by the broken one

    run, folder = parse_run("from-scratch"), tmp_path / "run"
    assert "--resume_from_checkpoint" not in train_command(run, 0, tmp_path, "data", folder, Budget())
    (folder / "checkpoint-53").mkdir(parents=True)  # what the trainer leaves when it is stopped (SIGTERM)
    command = train_command(run, 0, tmp_path, "data", folder, Budget())
    assert command[command.index("--resume_from_checkpoint") + 1] == "latest"


def test_two_steps_of_two_recipes_give_the_table_curves_and_picture(tmp_path):
    write_photos(tmp_path / "train", 10, seed=0)
    write_photos(tmp_path / "test", 2, seed=1)
    out, work = tmp_path / "out", tmp_path / "work"
    command = [
        sys.executable, str(ROOT / "eval" / "recipes.py"),
        "--runs", "diffusers-example", "fast=from-scratch --learning_rate 1e-3",
        "--seeds", "0", "--steps", "2", "--resolution", "32", "--init_channels", "32", "32",
        "--threads", "2", "--parallel", "2", "--validation_steps", "1",
        "--train_dir", str(tmp_path / "train"), "--test_dir", str(tmp_path / "test"),
        "--work_dir", str(work), "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, check=True, env=env, cwd=tmp_path, capture_output=True, timeout=600)

    # Each run trained with its recipe and flags, from the init, for the budget.
    fast = json.loads((work / "fast-s0" / "checkpoint-2" / "training_state.json").read_text())["config"]
    base = json.loads((work / "diffusers-example-s0" / "checkpoint-2" / "training_state.json").read_text())
    base = base["config"]
    assert fast["learning_rate"] == 1e-3 and fast["lr_scheduler"] == "cosine"
    assert base["learning_rate"] == 1e-4 and base["center_crop"] and not base["random_flip"]
    for config in (fast, base):
        assert (
            config["max_train_steps"] == 2 and config["resolution"] == 32 and config["train_batch_size"] == 4
        )
        assert config["pretrained_model_name_or_path"] == str(work / "init")

    # The table holds each run's evaluation, as written beside the run.
    result = json.loads((out / "recipes.json").read_text())
    for row in result["runs"]:
        summary = json.loads((work / f"{row['label']}-s0" / "evaluation" / "summary.json").read_text())
        (model,) = summary["models"]
        assert row["psnr"] == pytest.approx(model["psnr"]) and model["n_images"] == 2
        assert row["colourfulness_ratio"] == pytest.approx(model["colourfulness_ratio"])
    table = (out / "recipes.md").read_text()
    assert "| **diffusers-example** |" in table and "| fast |" in table
    assert Image.open(out / "curves.png").size[0] > 500
    picture = Image.open(out / "recipes.jpg")
    assert picture.size[0] > 3 * 32  # original + two runs side by side

    # Run again: nothing is trained or evaluated twice.
    stamp = (work / "fast-s0" / "evaluation" / "summary.json").stat().st_mtime_ns
    again = subprocess.run(
        command, check=True, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert again.stdout.count("trained already") == 2
    assert (work / "fast-s0" / "evaluation" / "summary.json").stat().st_mtime_ns == stamp
