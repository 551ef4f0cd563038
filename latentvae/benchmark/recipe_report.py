"""The recipe benchmark's outputs: the table (mean over seeds and the seed-to-seed spread), the loss curves and a
picture of the most colourful held-out photos as each run reconstructs them (`latentvae.benchmark.recipes` measures).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from latentvae.data.sources import find_images
from latentvae.evaluation.metrics import to_uint8
from latentvae.evaluation.report import compose_grid
from latentvae.files.loading import load_vae
from latentvae.training.validation import grid_images

# Shown in the table: (key in the evaluation summary, column, format).
COLUMNS = (
    ("psnr", "PSNR", "{:.2f}"),
    ("ssim", "SSIM", "{:.3f}"),
    ("psnr_y", "PSNR Y", "{:.2f}"),
    ("psnr_c", "PSNR CbCr", "{:.2f}"),
    ("colourfulness_ratio", "colourfulness ratio", "{:.3f}"),
    ("ciede2000", "ΔE00", "{:.2f}"),
    ("lpips", "LPIPS", "{:.4f}"),
)


def aggregate(runs: list, seeds: list[int], summaries: dict[str, dict], minutes: dict[str, float | None]):
    """Per run: each metric's mean over seeds (of the per-seed means over images) and its spread (max - min)."""
    rows = []
    for run in runs:
        per_seed = [summaries[run.folder(seed)] for seed in seeds]
        row: dict[str, Any] = {
            "label": run.label,
            "recipe": run.recipe,
            "flags": list(run.flags),
            "seeds": seeds,
        }
        for key, _, _ in COLUMNS:
            values = [s[key] for s in per_seed if s.get(key) is not None]
            row[key] = float(np.mean(values)) if values else None
            row[f"{key}_spread"] = float(np.ptp(values)) if len(values) > 1 else None
            row[f"{key}_per_seed"] = values
        times = [minutes[run.folder(seed)] for seed in seeds if minutes.get(run.folder(seed)) is not None]
        row["train_minutes"] = float(np.mean(times)) if times else None
        rows.append(row)
    return rows


def render_table(rows: list[dict], baseline: str) -> str:
    """Markdown: one row per run, `mean ± spread/2` over seeds, and the PSNR difference to the baseline row."""
    shown = [c for c in COLUMNS if any(row[c[0]] is not None for row in rows)]
    base = next((row for row in rows if row["label"] == baseline), None)
    header = ["run", "recipe and flags", *(name for _, name, _ in shown), "PSNR - baseline", "train min"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [f"**{row['label']}**" if row["label"] == baseline else row["label"]]
        cells.append(" ".join(["`" + row["recipe"], *row["flags"]]) + "`")
        for key, _, fmt in shown:
            value, spread = row[key], row[f"{key}_spread"]
            cell = "–" if value is None else fmt.format(value)
            if spread is not None:
                cell += " ± " + fmt.format(spread / 2)
            cells.append(cell)
        delta = row["psnr"] - base["psnr"] if base and row["psnr"] is not None else None
        cells.append("–" if delta is None else f"{delta:+.2f}")
        cells.append("–" if row["train_minutes"] is None else f"{row['train_minutes']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(runs: list, seeds: list[int], curves: dict[str, dict], path: Path) -> Path:
    """Training loss (smoothed over 50 steps) and validation PSNR against steps, one colour per run."""
    fig = Figure(figsize=(11, 4))  # no pyplot: no global backend or figure state
    ax_loss, ax_psnr = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        for j, seed in enumerate(seeds):
            run_curves = curves[run.folder(seed)]
            label = run.label if j == 0 else None
            if loss := sorted(run_curves.get("train/loss", [])):
                steps, values = np.array(loss).T
                window = min(5, len(values))  # logged every 10 steps: 5 points are 50 steps
                smooth = np.convolve(values, np.ones(window) / window, mode="valid")
                ax_loss.plot(steps[window - 1 :], smooth, color=colour, alpha=0.9 - 0.3 * j, label=label)
            if psnr := sorted(run_curves.get("val/psnr", [])):
                ax_psnr.plot(*np.array(psnr).T, "o-", color=colour, alpha=0.9 - 0.3 * j, label=label)
    ax_loss.set(
        xlabel="step", ylabel="training loss (per image, summed)", yscale="log", title="training loss"
    )
    ax_psnr.set(xlabel="step", ylabel="dB", title="validation PSNR (held-out training photos)")
    for ax in (ax_loss, ax_psnr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


@torch.inference_mode()
def colour_picture(runs: list, seed: int, work: Path, test_dir: str, path: Path, count: int = 4) -> Path:
    """The `count` most colourful test photos (whole, 256 px), reconstructed by each run (seed `seed`)."""
    images = grid_images(find_images(test_dir), count=count, size=256, candidates=200)
    rows = [[_hwc(image[None])] for image in images]
    for run in runs:
        vae = load_vae(work / run.folder(seed) / "final").eval()
        for row, image in zip(rows, images):
            recon = vae(image[None]).sample.clamp(-1, 1)
            row.append(_hwc(recon))
    grid = compose_grid(["original", *(run.label for run in runs)], [("", cells) for cells in rows])
    grid.save(path, quality=90)
    return path


def _hwc(image: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> uint8 (H, W, 3)."""
    return to_uint8(image)[0].permute(1, 2, 0).to(torch.uint8).numpy()


def render_markdown(table: str, result: dict) -> str:
    budget = result["budget"]
    seeds = result["runs"][0]["seeds"]
    return f"""# Recipes at an equal budget

Every run starts from the same weights (a diffusers AutoencoderKL, block_out_channels {tuple(result["init_channels"])},
1 layer per block, 4 latent channels, built after `torch.manual_seed(0)`) and trains through `training/train.py` on
`{result["train_dir"]}` for {budget["steps"]} steps of {budget["batch_size"]} crops of {budget["resolution"]} px, in
{budget["mixed_precision"]} autocast, {"with" if budget["lpips"] else "without"} LPIPS, without a GAN; seeds {seeds}
(init fixed; the seed moves the data order, crops, posterior noise and which training photos are held out for
the trainer's validation, so validation curves of different seeds are of different photos). Evaluated on
{result["protocol"]["data"]}: {result["protocol"]["preprocessing"]}; posterior mode, fp32. Cells: mean over seeds ± half the seed-to-seed range.
Baseline: **{result["baseline"]}**.

{table}

![training loss and validation PSNR](curves.png)

![the most colourful test photos, reconstructed by each run (first seed)](recipes.jpg)

Reproduce: `{result["command"]}`
"""
