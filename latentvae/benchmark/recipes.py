"""The recipe benchmark: one fixed initial VAE trained with each recipe, at one budget, through training/train.py,
then every result evaluated on the same held-out photos by the evaluation protocol (with the colour metrics).

    python eval/recipes.py --runs diffusers-example from-scratch --seeds 0 1 [--steps 1000]
    python eval/recipes.py --runs "lr3e-4=diffusers-example --learning_rate 3e-4"   (a recipe with changed flags)

A run is `[LABEL=]RECIPE [FLAGS...]`: a `--recipe` name and training flags of its own. Every run gets the same
initial weights (`build_init`: a diffusers AutoencoderKL of `--init_channels`, built after `torch.manual_seed(0)`),
the same data, crop size, batch, steps and mixed precision (the flags after the recipe's cannot change those), and
no LPIPS or GAN unless asked. A finished run (its `final/` folder) is not trained again, so the benchmark resumes
where it stopped and new runs can be added to a finished table. Writes into `--out`: recipes.md (the table:
mean over seeds, and the seed-to-seed spread), recipes.json, curves.png (training loss and validation PSNR
against steps) and recipes.jpg (the most colourful held-out photos, reconstructed by each run's first seed).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from latentvae.benchmark.recipe_report import (
    aggregate,
    colour_picture,
    plot_curves,
    render_markdown,
    render_table,
)
from latentvae.evaluation.evaluate import evaluate, open_data
from latentvae.evaluation.report import write_outputs
from latentvae.evaluation.results import EvalSettings, ModelSpec
from latentvae.models.inference import cpu_has_bf16
from latentvae.training.recipes import RECIPES

TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "training" / "train.py"
# Flags the benchmark sets for every run: a run's own flags may not change them (equal budget, equal data).
FIXED_FLAGS = (
    "--pretrained_model_name_or_path",
    "--train_data_dir",
    "--resolution",
    "--train_batch_size",
    "--max_train_steps",
    "--gradient_accumulation_steps",
    "--mixed_precision",
    "--seed",
    "--output_dir",
)


@dataclass(frozen=True)
class Run:
    """One row of the table: a recipe and the flags that change it."""

    label: str
    recipe: str
    flags: tuple[str, ...] = ()

    def folder(self, seed: int) -> str:
        return f"{self.label}-s{seed}"


def parse_run(text: str) -> Run:
    """`[LABEL=]RECIPE [FLAGS...]`; the label defaults to the recipe's name."""
    label, sep, rest = text.partition("=")
    if not sep or " " in label:
        label, rest = "", text
    words = shlex.split(rest)
    if not words or words[0] not in RECIPES:
        raise SystemExit(f"run {text!r}: give a recipe first, one of {sorted(RECIPES)}")
    recipe, flags = words[0], tuple(words[1:])
    fixed = sorted({flag.split("=")[0] for flag in flags} & set(FIXED_FLAGS))
    if fixed:
        raise SystemExit(f"run {text!r}: {', '.join(fixed)} is set by the benchmark, the same for every run")
    return Run(label or recipe, recipe, flags)


@dataclass
class Budget:
    """What every run gets."""

    steps: int = 1000
    resolution: int = 128
    batch_size: int = 4
    mixed_precision: str = "bf16"
    threads: int = 1
    validation_steps: int = 250
    lpips: bool = False


def build_init(channels: tuple[int, ...], folder: Path) -> Path:
    """The fixed initial weights: a diffusers AutoencoderKL with `channels` (1 layer per block, 4 latent channels,
    up to 32 groups), built after `torch.manual_seed(0)`, saved as a diffusers folder (once)."""
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    vae = DiffusersAutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=min(32, *channels),
    )
    vae.save_pretrained(folder)
    return folder


def train_command(run: Run, seed: int, init: Path, train_dir: str, folder: Path, budget: Budget) -> list[str]:
    """`accelerate launch training/train.py ...` for one run and seed, in one process."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
        "--num_cpu_threads_per_process", str(budget.threads), str(TRAIN_SCRIPT),
        "--recipe", run.recipe,
        "--pretrained_model_name_or_path", str(init),
        "--train_data_dir", train_dir,
        "--resolution", str(budget.resolution),
        "--train_batch_size", str(budget.batch_size),
        "--max_train_steps", str(budget.steps),
        "--gradient_accumulation_steps", "1",
        "--mixed_precision", budget.mixed_precision,
        "--seed", str(seed),
        "--output_dir", str(folder),
        "--report_to", "tensorboard",
        "--validation_steps", str(budget.validation_steps),
        "--num_validation_images", "8",
        "--checkpointing_steps", str(budget.steps),
        "--scaling_factor_images", "64",
        "--cache_images", "--dataloader_num_workers", "0",
        "--disc_weight", "0",
    ]  # fmt: skip
    if not budget.lpips:
        command += ["--perceptual_weight", "0"]
    if any(
        folder.glob("checkpoint-*")
    ):  # an interrupted run goes on where it stopped (the trainer's exact resume)
        command += ["--resume_from_checkpoint", "latest"]
    return command + list(run.flags)


def read_curves(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """The run's logged scalars (`train/loss`, `val/psnr`, ...) from its TensorBoard events, as (step, value)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for events in sorted((folder / "logs").rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            curves.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
        wall = [e.wall_time for tag in accumulator.Tags()["scalars"] for e in accumulator.Scalars(tag)]
        if wall:
            curves.setdefault("wall_time", []).extend([(0, min(wall)), (0, max(wall))])
    return curves


def training_minutes(curves: dict[str, list[tuple[int, float]]]) -> float | None:
    times = [t for _, t in curves.get("wall_time", [])]
    return (max(times) - min(times)) / 60 if times else None


def train_runs(jobs: list[tuple[str, list[str], Path]], parallel: int) -> None:
    """Run the training commands, `parallel` at a time, each logging to its folder's train.log; a failed run does not
    stop the others, the failures are reported once all have ended."""
    pending, running, failed = list(jobs), [], []
    while pending or running:
        while pending and len(running) < parallel:
            name, command, folder = pending.pop(0)
            print(f"{name}: {shlex.join(command)}", flush=True)
            folder.mkdir(parents=True, exist_ok=True)
            log = open(folder / "train.log", "w")
            running.append(
                (name, folder, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log)
            )
        time.sleep(1)
        for entry in [e for e in running if e[2].poll() is not None]:
            name, folder, process, log = entry
            log.close()
            running.remove(entry)
            if process.returncode != 0:
                failed.append(f"{name} (exit {process.returncode}; see {folder / 'train.log'})")
                print(f"{name}: failed", flush=True)
            else:
                print(f"{name}: trained ({folder / 'final'})", flush=True)
    if failed:
        raise SystemExit("training failed: " + ", ".join(failed))


def evaluate_run(name: str, final: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One run's entry in its evaluation summary, measured once (kept in `<run>/evaluation/` with its report and grids)."""
    out = final.parent / "evaluation"
    key = {"test_dir": str(args.test_dir), "max_test_images": args.max_test_images, "lpips": args.lpips}
    if (out / "summary.json").is_file() and (out / "key.json").is_file():
        if json.loads((out / "key.json").read_text()) == key:
            return json.loads((out / "summary.json").read_text())["models"][0]
    settings = EvalSettings(
        resolution=None, batch_size=1, fid=False, lpips_net="alex" if args.lpips else None
    )
    data = open_data(args.test_dir, None, max_images=args.max_test_images)
    write_outputs(evaluate([ModelSpec(name, final)], data, settings), out)
    (out / "key.json").write_text(json.dumps(key))
    return json.loads((out / "summary.json").read_text())["models"][0]


def run_benchmark(args: argparse.Namespace) -> int:
    runs = [parse_run(text) for text in args.runs]
    if len({run.label for run in runs}) != len(runs):
        raise SystemExit(
            f"run labels must differ: {[run.label for run in runs]} (name them LABEL=RECIPE ...)"
        )
    work, out = Path(args.work_dir), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    init = build_init(tuple(args.init_channels), work / "init")
    budget = Budget(
        steps=args.steps,
        resolution=args.resolution,
        batch_size=args.batch_size,
        mixed_precision=args.mixed_precision,
        threads=max(1, args.threads // args.parallel),
        validation_steps=args.validation_steps,
        lpips=args.lpips,
    )
    jobs = []
    for run in runs:
        for seed in args.seeds:
            folder = work / run.folder(seed)
            if (folder / "final" / "config.json").is_file():
                print(f"{run.folder(seed)}: trained already ({folder / 'final'})")
            else:
                jobs.append(
                    (run.folder(seed), train_command(run, seed, init, args.train_dir, folder, budget), folder)
                )
    train_runs(jobs, args.parallel)

    names = [run.folder(seed) for run in runs for seed in args.seeds]
    summaries = {name: evaluate_run(name, work / name / "final", args) for name in names}
    curves = {name: read_curves(work / name) for name in names}
    minutes = {name: training_minutes(c) for name, c in curves.items()}
    rows = aggregate(runs, args.seeds, summaries, minutes)
    baseline = args.baseline if args.baseline in {run.label for run in runs} else runs[0].label
    table = render_table(rows, baseline)
    plot_curves(runs, args.seeds, curves, out / "curves.png")
    colour_picture(runs, args.seeds[0], work, args.test_dir, out / "recipes.jpg")
    result = {
        "protocol": json.loads((work / names[0] / "evaluation" / "summary.json").read_text())["protocol"],
        "budget": vars(budget),
        "init_channels": args.init_channels,
        "train_dir": args.train_dir,
        "test_dir": args.test_dir,
        "baseline": baseline,
        "command": shlex.join(sys.argv),
        "runs": rows,
    }
    (out / "recipes.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "recipes.md").write_text(render_markdown(table, result))
    print(table)
    print(
        f"wrote {out / 'recipes.md'}, recipes.json, curves.png, recipes.jpg; evaluation reports: {work}/*/evaluation/"
    )
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["diffusers-example", "from-scratch"],
        help="[LABEL=]RECIPE [FLAGS...], one per row (quote each)",
    )
    parser.add_argument(
        "--baseline", default="diffusers-example", help="the label the PSNR differences refer to"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument(
        "--mixed_precision",
        default="bf16" if torch.cuda.is_available() or cpu_has_bf16() else "no",
        choices=("no", "fp16", "bf16"),
        help="autocast of every run (default: bf16 on a GPU or a CPU with bf16 instructions, else no: emulated bf16 "
        "is several times slower than fp32)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads in all")
    parser.add_argument("--parallel", type=int, default=1, help="runs trained at once (sharing --threads)")
    parser.add_argument("--validation_steps", type=int, default=250)
    parser.add_argument("--init_channels", nargs="+", type=int, default=[64, 128, 128, 128])
    parser.add_argument(
        "--lpips", action="store_true", help="train and evaluate with LPIPS (needs its weights)"
    )
    parser.add_argument("--train_dir", default="../shared/data/bsds500/train")
    parser.add_argument("--test_dir", default="../shared/data/bsds500/test")
    parser.add_argument(
        "--max_test_images", type=int, default=None, help="evaluate on the first N (default all)"
    )
    parser.add_argument("--work_dir", default="runs/recipes", help="the runs and their evaluation")
    parser.add_argument("--out", default="eval/results/recipes", help="the table, plot and picture")
