"""What each latent-space regulariser costs in reconstruction and gains in latent quality, at an equal budget.

    python eval/regularizers.py --start VAE --train_dir DIR --val_dir DIR [--steps 400] [--out runs/regularizers]

Every variant is the same fine-tune of `--start` (the quickstart recipe's optimiser and loss, `--steps` steps of 8
crops of 64 px, the same seed) with one regulariser added; `plain` is the fine-tune without one, `plain-seed1` the
same with another seed (the seed-to-seed spread a gain must beat). Then, on the validation images, side by side:
PSNR / SSIM (`eval/evaluate.py`, 256 px), the equivariance PSNRs, the latent spectrum's share above half Nyquist and
the diffusion probe's loss (`latentvae diagnose`, 128 px, the same probe seed for all), and the latent drift from
the start (mean squared difference of normalised posterior means, and PSNR of decoding the start's latents with the
new decoder). Runs already finished under `--out` are reused. Writes `regularizers.json` and `regularizers.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from latentvae.evaluation.evaluate import iterate_batches, open_data
from latentvae.files.loading import load_vae
from latentvae.training.regularizers import FrozenAnchor
from latentvae.training.validation import latent_space_metrics

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, list[str]] = {
    "plain": [],
    "plain-seed1": ["--seed", "1"],
    "equivariance": ["--equivariance_prob", "0.5", "--equivariance_rotations"],
    "lowpass": ["--latent_lowpass_weight", "0.5"],
    "anchor": ["--latent_anchor_weight", "1.0"],
}
DESCRIPTIONS = {
    "plain": "no regulariser",
    "plain-seed1": "no regulariser, seed 1",
    "equivariance": "--equivariance_prob 0.5 --equivariance_rotations (weight 1, scales 0.25-0.75)",
    "lowpass": "--latent_lowpass_weight 0.5 (factor 2)",
    "anchor": "--latent_anchor_weight 1.0",
}


def run(command: list[str], log: Path) -> None:
    print("$", " ".join(command), flush=True)
    with open(log, "w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}); see {log}")


def train(args, name: str, out: Path) -> Path:
    final = out / name / "final"
    if (final / "config.json").is_file():
        return final
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
        "--num_cpu_threads_per_process", str(args.threads), "--mixed_precision", "no", "--dynamo_backend", "no",
        "training/train.py", "--recipe", "quickstart", "--pretrained_model_name_or_path", args.start,
        "--train_data_dir", args.train_dir, "--val_data_dir", args.val_dir, "--max_train_steps", str(args.steps),
        "--validation_steps", str(args.steps), "--checkpointing_steps", str(args.steps), "--report_to", "none",
        "--output_dir", str(out / name), *VARIANTS[name],
    ]  # fmt: skip
    (out / name).mkdir(parents=True, exist_ok=True)
    run(command, out / name / "train.log")
    return final


@torch.no_grad()
def drift_from_start(start: str, final: Path, val_dir: str, resolution: int) -> dict[str, float]:
    anchor = FrozenAnchor(load_vae(start).float().eval())
    vae = load_vae(str(final)).float().eval()
    data = open_data(val_dir, None)
    batches = (b.images.float() / 127.5 - 1 for b in iterate_batches(data, resolution, batch_size=8))
    found = latent_space_metrics(vae, batches, anchor)
    return {k: found[k] for k in ("latent_drift_mse", "latent_drift_psnr")}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", required=True, help="the VAE every variant fine-tunes")
    parser.add_argument("--train_dir", required=True)
    parser.add_argument("--val_dir", required=True)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="runs/regularizers")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    finals = {name: train(args, name, out) for name in args.variants}
    models = [f"{name}={path}" for name, path in finals.items()]

    evaluate = out / "evaluate"
    if not (evaluate / "summary.json").is_file():
        flags = [x for m in models for x in ("--model", m)]
        run(
            [sys.executable, "eval/evaluate.py", *flags, "--data_dir", args.val_dir, "--no_fid", "--no_lpips",
             "--output_dir", str(evaluate)],
            out / "evaluate.log",
        )  # fmt: skip
    diagnose = out / "diagnose"
    if not (diagnose / "diagnostics.json").is_file():
        run(
            ["latentvae", "diagnose", *models, "--data_dir", args.val_dir, "--resolution", "128",
             "--output_dir", str(diagnose)],
            out / "diagnose.log",
        )  # fmt: skip
    scores = {m["name"]: m for m in json.loads((evaluate / "summary.json").read_text())["models"]}
    diagnosed = {m["name"]: m for m in json.loads((diagnose / "diagnostics.json").read_text())["models"]}
    rows = []
    for name, final in finals.items():
        d = diagnosed[name]
        rows.append(
            {
                "variant": name,
                "flags": DESCRIPTIONS[name],
                "psnr": scores[name]["psnr"],
                "ssim": scores[name]["ssim"],
                **{f"equivariance_{k}": v for k, v in d["equivariance"].items()},
                "latent_energy_above_half_nyquist": d["spectra"]["latent"]["high_frequency_share"],
                "probe_loss": d["probe"]["val_loss"],
                **drift_from_start(args.start, final, args.val_dir, 128),
            }
        )
    command = " ".join(["python", "eval/regularizers.py", *argv])
    (out / "regularizers.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    lines = [
        f"`{command}`",
        "",
        "| variant | flags | PSNR | SSIM | equivariance PSNR 2x / 4x / rot 90 | latent energy > ½ Nyquist | probe loss "
        "| latent drift MSE | start latents decoded, PSNR |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['flags']} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
            f"{r['equivariance_downscale_2x']:.2f} / {r['equivariance_downscale_4x']:.2f} / "
            f"{r['equivariance_rotate_90']:.2f} | {r['latent_energy_above_half_nyquist']:.3f} | "
            f"{r['probe_loss']:.4f} | {r['latent_drift_mse']:.4f} | {r['latent_drift_psnr']:.2f} |"
        )
    markdown = "\n".join(lines)
    (out / "regularizers.md").write_text(markdown + "\n")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
