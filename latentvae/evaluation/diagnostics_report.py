"""The files `latentvae diagnose` writes (`write_diagnostics`): diagnostics.json (every number), diagnostics.md (the
models side by side, best per column in bold) and PNG plots (matplotlib) and grids."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from torch import Tensor

from latentvae.evaluation.diagnostics import ModelDiagnostics
from latentvae.evaluation.report import compose_grid, slug
from latentvae.evaluation.results import json_safe

PROBE_CAVEAT = (
    "The probe loss is a relative signal for VAEs with the same latent shape, measured with the same budget and "
    "seed: lower means a small diffusion model learns these latents more easily. It is not a gFID."
)


def write_diagnostics(
    results: list[ModelDiagnostics], described: dict[str, Any], out_dir: str | Path, command_line: str = ""
) -> dict[str, Path]:
    """Write diagnostics.json, diagnostics.md, the plots and the grids into `out_dir` (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = [{"name": r.name, "path": r.path, **r.numbers} for r in results]
    written = {"json": out / "diagnostics.json", "report": out / "diagnostics.md"}
    document = {"settings": described, "command": command_line, "models": models}
    written["json"].write_text(json.dumps(json_safe(document), indent=2, allow_nan=False) + "\n")
    written.update(write_plots(models, out))
    written.update(write_model_grids(results, out))
    written["report"].write_text(render(models, described, written, command_line))
    return written


# ----- diagnostics.md -----

Column = tuple[str, Callable[[dict[str, Any]], Any], Callable | None, str]  # title, value, best of, format


def _get(*keys: str) -> Callable[[dict[str, Any]], Any]:
    def value(model: dict[str, Any]) -> Any:
        for key in keys:
            if model is None:
                return None
            model = model.get(key)
        return model

    return value


def _mean(*keys: str) -> Callable[[dict[str, Any]], float | None]:
    def value(model: dict[str, Any]) -> float | None:
        values = _get(*keys)(model)
        return sum(values) / len(values) if values else None

    return value


def _format(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return fmt.format(value)


def table(models: list[dict[str, Any]], columns: list[Column]) -> str:
    """Models as rows, `columns` as columns; with two or more values, the best of a ranked column in bold."""
    rows = [[m["name"]] for m in models]
    for _, value, better, fmt in columns:
        values = [value(m) for m in models]
        known = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
        best = better(known) if better is not None and len(known) >= 2 else None
        for row, v in zip(rows, values):
            cell = _format(v, fmt)
            row.append(f"**{cell}**" if best is not None and v == best else cell)
    header = ["Model", *(title for title, *_ in columns)]
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _closest_to_one(values: list[float]) -> float:
    return min(values, key=lambda v: abs(v - 1))


def health_columns(models: list[dict[str, Any]]) -> list[Column]:
    columns: list[Column] = [
        ("Latent", lambda m: "×".join(map(str, m["latent_shape"])), None, "{}"),
        ("KL nats/elem", _get("health", "kl_mean"), None, "{:.4f}"),
        ("Active units ↑", _get("health", "active_units"), max, "{}"),
        ("Posterior std / spread of means ↓", _mean("health", "noise_to_spread_per_channel"), min, "{:.3f}"),
        ("PSNR mode ↑", _get("reconstruction", "psnr_mode"), max, "{:.2f}"),
        ("PSNR sample ↑", _get("reconstruction", "psnr_sample"), max, "{:.2f}"),
        ("Latent energy > ½ Nyquist ↓", _get("spectra", "latent", "high_frequency_share"), min, "{:.3f}"),
    ]
    if any(m["codebook"] for m in models):
        columns += [
            ("Codebook usage ↑", _get("codebook", "codebook_usage"), max, "{:.3f}"),
            ("Perplexity ↑", _get("codebook", "codebook_perplexity"), max, "{:.1f}"),
            ("Unused codes ↓", _get("codebook", "codebook_unused"), min, "{:.3f}"),
        ]
    return columns


def artefact_columns(models: list[dict[str, Any]]) -> list[Column]:
    cycles = list(models[0]["drift"])
    return [
        ("Equivariance PSNR: none", _get("equivariance", "none"), max, "{:.2f}"),
        ("2x down ↑", _get("equivariance", "downscale_2x"), max, "{:.2f}"),
        ("4x down ↑", _get("equivariance", "downscale_4x"), max, "{:.2f}"),
        ("rot 90 ↑", _get("equivariance", "rotate_90"), max, "{:.2f}"),
        *((f"Drift PSNR k={k} ↑", _get("drift", k, "psnr"), max, "{:.2f}") for k in cycles),
        (f"Drift ΔE00 k={cycles[-1]} ↓", _get("drift", cycles[-1], "ciede2000"), min, "{:.2f}"),
        ("Seam PSNR ↑", _get("seams", "psnr"), max, "{:.1f}"),
        ("Worst 8-px band ↑", _get("seams", "worst_band_psnr"), max, "{:.1f}"),
    ]


PROBE_COLUMNS: list[Column] = [
    ("Probe val loss ↓", _get("probe", "val_loss"), min, "{:.4f}"),
    ("Loss at lowest t ↓", lambda m: (m["probe"] or {}).get("val_loss_per_timestep", [None])[0], min, "{:.4f}"),
    ("Loss at highest t ↓", lambda m: (m["probe"] or {}).get("val_loss_per_timestep", [None])[-1], min, "{:.4f}"),
    ("Steps × batch", lambda m: m["probe"] and f"{m['probe']['settings']['steps']} × {m['probe']['settings']['batch_size']}", None, "{}"),
    ("Train latents (images)", lambda m: m["probe"] and f"{m['probe']['train_latents']} ({m['probe']['train_images']})", None, "{}"),
    ("Held-out images", _get("probe", "val_images"), None, "{}"),
    ("UNet params", _get("probe", "parameters"), None, "{:,}"),
    ("CPU s", _get("probe", "cpu_seconds"), None, "{:.0f}"),
    ("Wall s", _get("probe", "seconds"), None, "{:.0f}"),
]  # fmt: skip


def channel_table(model: dict[str, Any]) -> str:
    health = model["health"]
    keys = [
        ("KL (nats)", "kl_per_channel", "{:.4f}"),
        ("Var of means", "mean_variance_per_channel", "{:.4f}"),
        ("Posterior std", "posterior_std_per_channel", "{:.4f}"),
        ("Spread of means", "mean_spread_per_channel", "{:.4f}"),
        ("Std / spread", "noise_to_spread_per_channel", "{:.3f}"),
    ]
    header = ["Channel", *(title for title, *_ in keys), "Active"]
    rows = []
    for c in range(health["channels"]):
        cells = [str(c)]
        cells += [_format(health[key][c] if health[key] else None, fmt) for _, key, fmt in keys]
        cells.append("yes" if health["mean_variance_per_channel"][c] > 0.01 else "no")
        rows.append(cells)
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def render(
    models: list[dict[str, Any]], described: dict[str, Any], written: dict[str, Path], command: str
) -> str:
    n = models[0]["health"]["images"]
    parts = [
        "# Latent diagnostics",
        f"{n} images at {described['resolution']} px: {described['data']}. Best value per column in **bold** "
        "(↑ higher is better, ↓ lower). Normalised units: the latents after the config's normalisation, as a "
        "diffusion model sees them.",
        "## Latent health",
        table(models, health_columns(models)),
        "KL: to N(0, I) of the unscaled posterior, per element (mean over channels, positions and images). Active "
        "units: channels whose posterior mean varies over images by more than 0.01 (variance, normalised units; "
        "Burda et al. 2016). Posterior std / spread: the mean posterior std over the std of the posterior means, "
        "both normalised, mean over channels (near 1 or above: a sampled latent is mostly noise). PSNR mode / "
        "sample: reconstructions of the posterior mode and of a seeded sample. Latent energy > ½ Nyquist: share of "
        "the (mean-removed) power spectrum of the normalised latents above 0.25 cycles per sample.",
        "## Artefacts",
        table(models, artefact_columns(models)),
        "Equivariance: PSNR of decode(T(z)) against T(x) (T: area downscaling, a 90° rotation; 'none' is the "
        f"plain reconstruction), on all images. Drift: {described['drift_images']} images encoded and decoded k "
        "times (each rounded to uint8), PSNR and mean CIEDE2000 against the original. Seams: whole against tiled "
        f"decode of {described['seam_images']} images at twice the tile size, unrounded; the worst 8-row or "
        "8-column strip.",
    ]
    if any(m["probe"] for m in models):
        parts += ["## Diffusion probe", table(models, PROBE_COLUMNS), _probe_words(models), PROBE_CAVEAT]
    parts.append("## Per channel")
    for m in models:
        parts += [f"### {m['name']}", channel_table(m)]
    notes = [f"- {m['name']}: {note}" for m in models for note in m.get("notes", [])]
    if notes:
        parts += ["## Notes", "\n".join(notes)]
    parts.append("## Plots and grids")
    parts += [f"{kind}:\n\n![{kind}]({path.name})" for kind, path in written.items() if path.suffix == ".png"]
    if command:
        parts += ["## Command", f"```bash\n{command}\n```"]
    return "\n\n".join(parts) + "\n"


def _probe_words(models: list[dict[str, Any]]) -> str:
    probe = next(m["probe"] for m in models if m["probe"])
    s = probe["settings"]
    times = ", ".join(f"{t:.3f}" for t in probe["timesteps"])
    return (
        f"Rectified flow (velocity prediction) with a diffusers UNet2DModel ({probe['parameters']:,} parameters), "
        f"{s['steps']} steps of {s['batch_size']} latents, AdamW lr {s['learning_rate']}, seed {s['seed']}; "
        "training latents: seeded posterior samples of random crops (with flips) of the training images; loss: "
        f"the mean over the fixed times t = {times} with fixed noise on the held-out images."
    )


# ----- plots -----


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def write_plots(models: list[dict[str, Any]], out: Path) -> dict[str, Path]:
    written = {}
    with_kl = [m for m in models if m["health"]["kl_per_channel"]]
    if with_kl:
        figure = Figure(figsize=(7, 3.5))
        axes = figure.subplots()
        width = 0.8 / len(with_kl)
        for i, m in enumerate(with_kl):
            kl = m["health"]["kl_per_channel"]
            axes.bar([c + i * width for c in range(len(kl))], kl, width, label=m["name"])
        axes.set(xlabel="latent channel", ylabel="KL to N(0, I), nats per element", title="Per-channel KL")
        axes.legend()
        written["kl per channel"] = _save(figure, out / "kl_per_channel.png")

    figure = Figure(figsize=(10, 4))
    latent, image = figure.subplots(1, 2)
    for m in models:
        spectrum = m["spectra"]["latent"]
        latent.loglog(spectrum["frequency"], spectrum["power"], label=m["name"])
    image.loglog(models[0]["spectra"]["image"]["frequency"], models[0]["spectra"]["image"]["power"], "k")
    latent.axvline(0.25, color="grey", linestyle=":", label="½ Nyquist")
    latent.set(xlabel="cycles per latent sample", ylabel="power", title="Normalised latents")
    image.set(xlabel="cycles per pixel", ylabel="power", title="Images ([-1, 1])")
    latent.legend()
    for axes in (latent, image):
        axes.xaxis.set_minor_formatter(NullFormatter())  # log axes: label the decades only
    written["spectra"] = _save(figure, out / "spectra.png")

    figure = Figure(figsize=(10, 4))
    left, right = figure.subplots(1, 2)
    for m in models:
        cycles = [int(k) for k in m["drift"]]
        left.plot(cycles, [m["drift"][str(k)]["psnr"] for k in cycles], "o-", label=m["name"])
        right.plot(cycles, [m["drift"][str(k)]["ciede2000"] for k in cycles], "o-", label=m["name"])
    left.set(xscale="log", xlabel="round trips k", ylabel="PSNR vs original (dB)", title="Round-trip drift")
    right.set(xscale="log", xlabel="round trips k", ylabel="mean CIEDE2000 vs original", title="Colour drift")
    left.legend()
    written["drift"] = _save(figure, out / "drift.png")

    if any(m["probe"] for m in models):
        figure = Figure(figsize=(7, 4))
        axes = figure.subplots()
        for i, m in enumerate(mm for mm in models if mm["probe"]):
            p, colour = m["probe"], f"C{i}"
            axes.plot(p["curve_steps"], p["curve_val_loss"], "-", color=colour, label=f"{m['name']} held-out")
            axes.plot(p["curve_steps"], p["curve_train_loss"], "--", color=colour, label=f"{m['name']} train")
        axes.set(xlabel="probe step", ylabel="velocity MSE", title="Diffusion probe")
        axes.legend()
        written["probe loss"] = _save(figure, out / "probe_loss.png")
    return written


def _cells(images: Tensor) -> list:
    return [image.byte().permute(1, 2, 0).cpu().numpy() for image in images]


def write_model_grids(results: list[ModelDiagnostics], out: Path) -> dict[str, Path]:
    """Per model: prior samples, interpolations (linear and spherical rows), probe samples."""
    written = {}
    for r in results:
        stem = slug(r.name)
        if "prior" in r.grids:
            rows = [("decoded z ~ N(0, I) (normalised)", _cells(r.grids["prior"]))]
            if "probe_samples" in r.grids:
                rows.append(("decoded probe samples", _cells(r.grids["probe_samples"])))
            header = [str(i) for i in range(len(r.grids["prior"]))]
            written[f"samples {r.name}"] = out / f"samples_{stem}.png"
            compose_grid(header, rows).save(written[f"samples {r.name}"])
        if "interpolation_lerp" in r.grids:
            rows = [(name, _cells(r.grids[f"interpolation_{name}"])) for name in ("lerp", "slerp")]
            steps = len(r.grids["interpolation_lerp"])
            header = [f"t={i / (steps - 1):.2f}" for i in range(steps)]
            written[f"interpolation {r.name}"] = out / f"interpolation_{stem}.png"
            compose_grid(header, rows).save(written[f"interpolation {r.name}"])
    return written
