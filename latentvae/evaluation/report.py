"""The files `latentvae evaluate` writes from what it found (`latentvae.evaluation.results`): summary.json, per_image.csv, report.md, PNG grids.

JSON has no infinity (Python's `Infinity` token is not valid JSON), so an infinite PSNR (a reconstruction identical
to its input) is written as the string `"inf"`, and a value that was not computed (or is NaN) as `null`.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from latentvae.evaluation.normalization import short
from latentvae.evaluation.results import METRICS, Evaluation, ModelResult, json_safe

HEAT_MAP_MAX = 64  # mean absolute error (uint8 units) drawn white in the heat maps; larger errors saturate


def write_outputs(evaluation: Evaluation, out_dir: str | Path) -> dict[str, Path]:
    """Write summary.json, per_image.csv, report.md and the PNG grids into `out_dir` (created if needed).

    Returns:
        `dict[str, Path]`: what was written, by kind (`"summary"`, `"per_image"`, `"report"`, `"grid:..."`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {
        "summary": out / "summary.json",
        "per_image": out / "per_image.csv",
        "report": out / "report.md",
    }
    summary = {
        "protocol": evaluation.protocol,
        "models": [model.summary() for model in evaluation.models],
        "skipped_images": evaluation.skipped_images,
        "skipped_metrics": evaluation.skipped_metrics,
    }
    written["summary"].write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
    with open(written["per_image"], "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["model", "image", *METRICS])
        for model in evaluation.models:
            for i, image in enumerate(model.images):
                cells = [
                    model.scores[m][i] if m in model.scores else "" for m in METRICS
                ]  # "" = not computed
                writer.writerow([model.name, image, *cells])
    written.update(write_grids(evaluation.models, out))
    written["report"].write_text(render_report(evaluation, summary["models"], written))
    return written


# ----- report.md -----

# (header, summary key, which is better, format); PSNR / SSIM / LPIPS also show their standard deviation
RANKED_COLUMNS = (
    ("PSNR ↑", "psnr", max, "{:.2f}"),
    ("SSIM ↑", "ssim", max, "{:.4f}"),
    ("LPIPS ↓", "lpips", min, "{:.4f}"),
    ("PSNR Y ↑", "psnr_y", max, "{:.2f}"),
    ("PSNR CbCr ↑", "psnr_c", max, "{:.2f}"),
    (
        "Colourfulness ratio →1",
        "colourfulness_ratio",
        lambda values: min(values, key=lambda v: abs(v - 1)),
        "{:.3f}",
    ),
    ("ΔE00 ↓", "ciede2000", min, "{:.2f}"),
    ("rFID ↓", "rfid", min, "{:.2f}"),
    ("Encode ms/img ↓", "encode_ms", min, "{:.1f}"),
    ("Decode ms/img ↓", "decode_ms", min, "{:.1f}"),
    ("Peak MB ↓", "peak_mem_mb", min, "{:.0f}"),
)


def _number(value: float | None, fmt: str) -> str:
    if value is None:
        return "–"
    return "inf" if value == math.inf else fmt.format(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def comparison_table(summaries: list[dict[str, Any]]) -> str:
    """The models side by side, best value per ranked column in bold (when two or more models have one)."""
    titles = [title for title, *_ in RANKED_COLUMNS]
    with_codebook = any(s["codebook_size"] is not None for s in summaries)
    header = [
        "Model",
        "Images",
        *titles,
        "Params (M)",
        "Latent",
        "Compression",
        *(["Codebook usage (perplexity)"] if with_codebook else []),
        "Scaling factor (suggested / config)",
    ]
    best = {}
    for _, key, better, _ in RANKED_COLUMNS:
        values = [s[key] for s in summaries if s[key] is not None and not math.isnan(s[key])]
        best[key] = better(values) if len(values) >= 2 else None
    rows = []
    for s in summaries:
        row = [s["name"], str(s["n_images"])]
        for _, key, _, fmt in RANKED_COLUMNS:
            cell = _number(s[key], fmt)
            if best[key] is not None and s[key] == best[key]:
                cell = f"**{cell}**"
            if f"{key}_std" in s and s[f"{key}_std"] is not None:
                cell += f" ± {_number(s[f'{key}_std'], fmt)}"
            row.append(cell)
        latent = "×".join(map(str, s["latent_shape"])) if s["latent_shape"] else "–"
        row += [f"{s['parameters']['total'] / 1e6:.2f}", latent, _number(s["compression_factor"], "{:.0f}x")]
        if with_codebook:
            row.append(_codebook_cell(s))
        row.append(
            f"{_number(s['suggested_scaling_factor'], '{:.4f}')} / {_number(s['config_scaling_factor'], '{:.5g}')}"
        )
        rows.append(row)
    return _table(header, rows)


def card_evaluation(evaluation: Evaluation, summaries: list[dict[str, Any]], command_line: str) -> str:
    """The evaluation as a model card shows it: the comparison table, the protocol in brief, the command."""
    protocol = "\n".join(f"- {key}: {value}" for key, value in evaluation.protocol.items())
    return (
        f"{summaries[0]['n_images']} images: {evaluation.protocol['data']}. Mean ± standard deviation over "
        f"images; rFID on this many images compares only with rFID on the same images.\n\n"
        f"{comparison_table(summaries)}\n\n<details>\n<summary>Protocol and command</summary>\n\n{protocol}\n\n"
        f"```bash\n{command_line}\n```\n\n</details>"
    )


def _codebook_cell(summary: dict[str, Any]) -> str:
    if summary["codebook_size"] is None:
        return "–"
    usage, size = summary["codebook_usage"], summary["codebook_size"]
    return f"{100 * usage:.1f}% of {size} ({summary['codebook_perplexity']:.1f})"


def render_report(evaluation: Evaluation, summaries: list[dict[str, Any]], written: dict[str, Path]) -> str:
    """report.md: the comparison table, latent statistics, the protocol, what was skipped and why, the grids."""
    n = summaries[0]["n_images"]
    parts = [
        "# Reconstruction report",
        f"{n} images: {evaluation.protocol['data']}. Best value per column in **bold** (↑ higher is better, "
        "↓ lower).",
        comparison_table(summaries),
        "Metrics: mean ± standard deviation over images. PSNR Y / CbCr: luma and chroma (BT.601 YCbCr) on their own; "
        "colourfulness ratio: Hasler-Suesstrunk colourfulness of the reconstruction over the original's (below 1: "
        "colour lost); ΔE00: mean CIEDE2000 colour difference. Params: encoder + decoder. Compression: values "
        "in an image per value in its latent (3 f² / C). Latent: C×h×w of the first image. Scaling factor: 1 / std of posterior samples (VQ: "
        "encoder outputs) of these images, next to the one in the model's config."
        + (
            " Codebook usage (VQ models): share of the codes chosen at least once over all latent positions of "
            "these images; in brackets the perplexity, exp(entropy) of the code histogram, i.e. the number of "
            "equally often used codes that would spread as widely."
            if any(s["codebook_size"] is not None for s in summaries)
            else ""
        ),
    ]
    computed = (
        "computed here" if any(s["rfid"] is not None for s in summaries) else "when computed (see Skipped)"
    )
    parts.append(
        f"**rFID caveat:** {computed} on {n} images. Published rFID figures use 5,000 (COCO 2017 val) or 50,000 "
        "images, and FID is biased upwards on small sets, so compare these values only with each other (same "
        "images, same count), never with published ones."
    )
    parts += [
        "## Latent statistics",
        _latent_table(summaries),
        *_normalisation_tables(summaries),
        "## Protocol",
    ]
    parts.append("\n".join(f"- **{key}**: {value}" for key, value in evaluation.protocol.items()))
    parts += ["## Skipped", _skipped(evaluation, summaries), "## Grids", _grid_section(written)]
    return "\n\n".join(parts) + "\n"


def _latent_table(summaries: list[dict[str, Any]]) -> str:
    def listing(values: list[float] | None) -> str:
        return ", ".join(f"{v:.3f}" for v in values) if values else "–"

    header = [
        "Model",
        "Mean per channel",
        "Std per channel",
        "Std",
        "Suggested 1/std",
        "Config scaling factor",
    ]
    rows = [
        [
            s["name"],
            listing(s["latent_channel_mean"]),
            listing(s["latent_channel_std"]),
            _number(s["latent_std"], "{:.4f}"),
            _number(s["suggested_scaling_factor"], "{:.5f}"),
            _number(s["config_scaling_factor"], "{:.5g}"),
        ]
        for s in summaries
    ]
    return _table(header, rows)


def _normalisation_tables(summaries: list[dict[str, Any]]) -> list[str]:
    """Per model: the constants each latent normalisation convention would set from these images, next to those its
    config holds (lists by their range and length; summary.json has every value)."""
    parts = [
        "### Latent normalisation: suggested from these images, and held by the config",
        "scale: SD (z * scaling_factor); shift_scale: FLUX.1 / SD3 ((z - shift_factor) * scaling_factor); "
        "per_channel: pipelines that read latents_mean / latents_std (SDXL's change behaviour when they are set); "
        "batchnorm: FLUX.2 (bn statistics of 2x2-patchified latents). Write one with `latentvae normalize`.",
    ]
    for s in summaries:
        found = s.get("latent_normalization")
        if not found:
            continue
        modes = list(found["suggested"])
        keys = list(dict.fromkeys([*found["held"], *(k for v in found["suggested"].values() for k in v)]))
        header = ["Constant", f"Config ({found['held_mode']})"]
        header += [f"{m} (default)" if m == found["default_mode"] else m for m in modes]
        rows = [
            [f"`{key}`", short(found["held"].get(key))]
            + [short(found["suggested"][m][key]) if key in found["suggested"][m] else "–" for m in modes]
            for key in keys
        ]
        parts += [f"**{s['name']}**", _table(header, rows)]
    return parts


def _skipped(evaluation: Evaluation, summaries: list[dict[str, Any]]) -> str:
    lines = []
    if evaluation.skipped_images:
        lines.append(
            f"Images that could not be decoded ({len(evaluation.skipped_images)}), left out of every metric:"
        )
        lines += [
            f"- `{name}`: {reason.replace('_', ' ')}" for name, reason in evaluation.skipped_images.items()
        ]
    for metric, reason in evaluation.skipped_metrics.items():
        title = {"lpips": "LPIPS", "rfid": "rFID"}.get(metric, metric)
        lines.append(f"{title} not computed (the column is empty):\n\n```\n{reason}\n```")
    lines += [f"{s['name']}: {note}" for s in summaries for note in s["notes"]]
    return "\n\n".join(lines) if lines else "Nothing was skipped."


def _grid_section(written: dict[str, Path]) -> str:
    lines = [
        f"Per model, the worst and best images by PSNR as input | reconstruction | error heat map (mean absolute "
        f"error over RGB, black 0 to white {HEAT_MAP_MAX}/255 or more); then the same images across all models."
    ]
    for kind, path in written.items():
        if kind.startswith("grid:"):
            lines.append(f"{kind.removeprefix('grid:')}:\n\n![{kind}]({path.name})")
    return "\n\n".join(lines)


# ----- grids -----


def heat_map(original: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    """Mean absolute error over RGB as a black-red-yellow-white image, white at `HEAT_MAP_MAX` or more."""
    error = np.abs(original.astype(np.float32) - reconstruction.astype(np.float32)).mean(-1)
    t = np.clip(error / HEAT_MAP_MAX, 0, 1)[..., None]
    rgb = np.clip(3 * t - np.array([0, 1, 2]), 0, 1)  # "hot": red rises first, then green, then blue
    return (rgb * 255).round().astype(np.uint8)


def compose_grid(header: list[str], rows: list[tuple[str, list[np.ndarray]]], gap: int = 4) -> Image.Image:
    """Cells in columns under `header`, each row under its label; smaller cells sit top-left in their slot."""
    cell_h = max(cell.shape[0] for _, cells in rows for cell in cells)
    cell_w = max(cell.shape[1] for _, cells in rows for cell in cells)
    text_h = 12
    canvas = Image.new(
        "RGB",
        (gap + len(header) * (cell_w + gap), text_h + gap + len(rows) * (text_h + cell_h + gap)),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    chars = max(4, (cell_w + gap) // 6)  # the default bitmap font is about 6 px per character
    for j, title in enumerate(header):
        draw.text((gap + j * (cell_w + gap), 1), title[:chars], fill="black")
    y = text_h + gap
    for label, cells in rows:
        draw.text((gap, y), label[: chars * len(header)], fill="black")
        y += text_h
        for j, cell in enumerate(cells):
            canvas.paste(Image.fromarray(cell), (gap + j * (cell_w + gap), y))
        y += cell_h + gap
    return canvas


def slug(name: str) -> str:
    """`name` made safe as part of a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def write_grids(models: list[ModelResult], out: Path) -> dict[str, Path]:
    """worst_<model>.png and best_<model>.png per model, and side_by_side.png across models."""
    written = {}
    stems: set[str] = set()
    for model in models:
        stem = slug(model.name)
        while stem in stems:  # distinct names can share a slug ("a b", "a_b")
            stem += "_"
        stems.add(stem)
        for kind, examples in (("worst", model.worst), ("best", sorted(model.best, reverse=True))):
            rows = [
                (
                    f"{ex.name}  PSNR {_number(ex.psnr, '{:.2f}')}",
                    [ex.original, ex.reconstruction, heat_map(ex.original, ex.reconstruction)],
                )
                for ex in examples
            ]
            path = out / f"{kind}_{stem}.png"
            compose_grid(["input", "reconstruction", "error"], rows).save(path)
            written[f"grid:{kind} {model.name}"] = path
    positions = sorted(set.intersection(*(set(model.shared) for model in models)))
    if positions:
        rows = []
        for position in positions:
            first = models[0].shared[position]
            cells = [first.original, *(model.shared[position].reconstruction for model in models)]
            psnrs = ", ".join(_number(model.shared[position].psnr, "{:.1f}") for model in models)
            rows.append((f"{first.name}  PSNR {psnrs}", cells))
        path = out / "side_by_side.png"
        compose_grid(["input", *(model.name for model in models)], rows).save(path)
        written["grid:side by side"] = path
    return written
