"""What `latentvae evaluate` found, and the files it writes: summary.json, per_image.csv, report.md, PNG grids.

JSON has no infinity (Python's `Infinity` token is not valid JSON), so an infinite PSNR (a reconstruction identical
to its input) is written as the string `"inf"`, and a value that was not computed (or is NaN) as `null`.
"""

from __future__ import annotations

import csv
import heapq
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from latentvae.latent_stats import LatentStats

if TYPE_CHECKING:  # evaluation.py imports this module
    from latentvae.evaluation import EvalSettings, MetricNetworks

METRICS = ("psnr", "ssim", "lpips")
HEAT_MAP_MAX = 64  # mean absolute error (uint8 units) drawn white in the heat maps; larger errors saturate


@dataclass(order=True)
class Example:
    """An image drawn in a grid: its input and one model's reconstruction, uint8 `[H, W, 3]`, ordered by PSNR."""

    psnr: float
    position: int  # index into the evaluated sources, which is the same for every model
    name: str = field(compare=False)
    original: np.ndarray = field(compare=False, repr=False)
    reconstruction: np.ndarray = field(compare=False, repr=False)


@dataclass
class ModelResult:
    """One model's measurements."""

    name: str
    path: str
    downsampling_factor: int
    parameters: dict[str, int]  # encoder, decoder, total
    images: list[str] = field(default_factory=list)
    scores: dict[str, list[float]] = field(default_factory=dict)  # metric -> one value per image
    rfid: float | None = None
    encode_ms: float | None = None
    decode_ms: float | None = None
    peak_mem_mb: float | None = None
    peak_mem_kind: str | None = None
    latent_shape: list[int] | None = None  # (C, h, w) of the first image
    latent_stats: LatentStats | None = None
    config_scaling_factor: float | None = None
    code_counts: np.ndarray | None = None  # VQ models: how often each code was chosen, over all images
    worst: list[Example] = field(default_factory=list)
    best: list[Example] = field(default_factory=list)
    shared: dict[int, Example] = field(default_factory=dict)  # the side-by-side grid's images, by position
    notes: list[str] = field(default_factory=list)

    def add_scores(self, names: list[str], scores: dict[str, list[float]]) -> None:
        self.images.extend(names)
        for metric, values in scores.items():
            self.scores.setdefault(metric, []).extend(values)

    def add_codes(self, indices: Tensor, codebook_size: int) -> None:
        """Count the codebook indices a VQ model chose for a batch."""
        counts = torch.bincount(indices.flatten().cpu(), minlength=codebook_size).numpy()
        self.code_counts = counts if self.code_counts is None else self.code_counts + counts

    def offer_example(self, example: Example, count: int, shared: bool) -> None:
        """Keep `example` if it is among the `count` worst or best by PSNR so far, or drawn side by side."""
        self.worst = heapq.nsmallest(count, [*self.worst, example])
        self.best = heapq.nlargest(count, [*self.best, example])
        if shared:
            self.shared[example.position] = example

    def summary(self) -> dict[str, Any]:
        """This model's entry in summary.json (None where not computed)."""
        out: dict[str, Any] = {"name": self.name, "path": self.path, "n_images": len(self.images)}
        for metric in METRICS:
            out[metric], out[f"{metric}_std"] = mean_std(self.scores.get(metric))
        out["psnr_infinite"] = sum(math.isinf(v) for v in self.scores["psnr"])
        channels = self.latent_shape[0] if self.latent_shape else None
        stats = self.latent_stats
        out.update(
            rfid=self.rfid,
            rfid_n_images=len(self.images) if self.rfid is not None else None,
            encode_ms=self.encode_ms,
            decode_ms=self.decode_ms,
            peak_mem_mb=self.peak_mem_mb,
            peak_mem_kind=self.peak_mem_kind,
            parameters=self.parameters,
            downsampling_factor=self.downsampling_factor,
            latent_shape=self.latent_shape,
            # values in an image / values in its latent: 3 f^2 / C
            compression_factor=3 * self.downsampling_factor**2 / channels if channels else None,
            latent_mean=stats.mean if stats else None,
            latent_std=stats.std if stats else None,
            latent_channel_mean=stats.channel_mean if stats else None,
            latent_channel_std=stats.channel_std if stats else None,
            suggested_scaling_factor=stats.scaling_factor if stats else None,
            config_scaling_factor=self.config_scaling_factor,
            **self._codebook_summary(),
            notes=self.notes,
        )
        return out

    def _codebook_summary(self) -> dict[str, Any]:
        """codebook_size, codes_used, codebook_usage (fraction chosen at least once), codebook_perplexity (exp of
        the code histogram's entropy: the number of equally used codes with the same spread); None for KL models."""
        counts = self.code_counts
        if counts is None:
            return dict(codebook_size=None, codes_used=None, codebook_usage=None, codebook_perplexity=None)
        probs = counts[counts > 0] / counts.sum()
        return dict(
            codebook_size=len(counts),
            codes_used=int((counts > 0).sum()),
            codebook_usage=float((counts > 0).mean()),
            codebook_perplexity=float(np.exp(-(probs * np.log(probs)).sum())),  # exp(-sum p log p)
        )


def describe_protocol(
    settings: EvalSettings, data: str, networks: MetricNetworks, memory_kind: str | None
) -> dict[str, str]:
    """The protocol in words, for summary.json and report.md."""
    size = settings.resolution
    seed = settings.seed
    return {
        "data": data,
        "preprocessing": (
            f"RGB uint8; shorter side resized to {size} px (PIL bicubic), center crop {size}x{size}"
            if size is not None
            else "RGB uint8 at native size, reflect-padded at the bottom and right to a multiple of each model's "
            "downsampling factor, reconstructions cropped back"
        ),
        "latents": (f"posterior sample (seed {seed})" if settings.sample_posterior else "posterior mode")
        + " of KL models; nearest codebook vectors of VQ models' encoder output",
        "output": "decoded, clamped to [-1, 1], uint8 = round((x + 1) * 127.5)",
        "psnr": "per image on uint8 RGB, MAX 255; mean and (population) standard deviation over the images with "
        'finite PSNR; identical reconstructions have infinite PSNR, counted in psnr_infinite and written "inf"',
        "ssim": "torchmetrics structural_similarity_index_measure on uint8 RGB: 11x11 Gaussian window, sigma 1.5, "
        "K1 0.01, K2 0.03, data range 255, borders reflect-padded, mean over pixels and channels",
        "lpips": f"LPIPS v0.1 ({settings.lpips_net}) on [-1, 1], lpips package"
        if networks.lpips is not None
        else "not computed",
        "rfid": "Frechet distance of pytorch-fid InceptionV3 pool3 features (2048-d, FID weights "
        "pt_inception-2015-12-05) between the originals and the reconstructions"
        if networks.inception is not None
        else "not computed",
        "timing": f"wall clock per image of encode and of decode, batches of {settings.batch_size}, after an "
        "untimed warm-up pass over the first batch",
        "memory": "the model's weights plus the largest growth in memory during one batch's encode + decode, "
        f"from {memory_kind or 'nothing: not measured on this device'}",
        "latent_stats": f"posterior samples (seed {seed}; a VQ model: its encoder output) of all evaluated images "
        "(latentvae.latent_stats); "
        "suggested scaling factor = 1 / std over all latent elements",
        "codebook": "VQ models: the encoder output is replaced by its nearest codebook vectors before decoding; "
        "usage = fraction of the codebook chosen at least once over all latent positions of all evaluated images, "
        "perplexity = exp(entropy) of that code histogram",
        "device": f"{settings.device}, {str(settings.dtype).removeprefix('torch.')}",
    }


@dataclass
class Evaluation:
    """Everything `evaluate` found: the protocol in words, one result per model, and what was left out."""

    protocol: dict[str, str]
    models: list[ModelResult]
    skipped_images: dict[str, str]  # name -> reason
    skipped_metrics: dict[str, str]  # metric -> reason


def mean_std(values: list[float] | None) -> tuple[float | None, float | None]:
    """Mean and population standard deviation over the finite values; (inf, None) if all are inf (identical
    reconstructions); (None, None) if there are none."""
    if not values:
        return None, None
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return (math.inf if all(v == math.inf for v in values) else None), None
    return float(np.mean(finite)), float(np.std(finite))


def json_safe(value: Any) -> Any:
    """`value` with +inf as `"inf"` and NaN / -inf as None, so that `json.dumps(allow_nan=False)` accepts it."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value == math.inf else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


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
        "PSNR, SSIM, LPIPS: mean ± standard deviation over images. Params: encoder + decoder. Compression: values "
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
    parts += ["## Latent statistics", _latent_table(summaries), "## Protocol"]
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
