"""The preview decoder against the full decoder: decode speed at one size, and fidelity on held-out images.

    python eval/preview.py --vae VAE --preview PREVIEW --images DIR [--size 512] [--fidelity_size 256] [--out DIR]

Speed: the latent of a real image at `size` px (the VAE's posterior mean), decoded by the VAE (`vae.decode(z)`) and
by the preview (`tiny.decode(z_n)`, z_n the pipelines' normalised latent), batch 1, fp32, `repeats` interleaved
rounds after a warm-up: median seconds each and their ratio. Fidelity: every image prepared by the evaluation
protocol (resize the shorter side, center-crop `fidelity_size`), encoded by the VAE (posterior mean), decoded by
both; PSNR (uint8, MAX 255) of the preview's decode against the VAE's (the number that says how faithful a preview
is), and of each against the original image (for context).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from latentvae.benchmark.modes import timed
from latentvae.evaluation.evaluate import prepare_image
from latentvae.evaluation.metrics import psnr, to_uint8
from latentvae.models.preview import normalise_latents


def as_batch(image: np.ndarray) -> Tensor:
    """RGB uint8 `[H, W, 3]` -> `(1, 3, H, W)` in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1


@torch.no_grad()
def decode_speed(
    vae: nn.Module, preview: nn.Module, image: Path, size: int, repeats: int = 5
) -> dict[str, float]:
    """Median seconds of one decode at `size` px by each, and the ratio full / preview."""
    device = next(vae.parameters()).device
    z = vae.encode(as_batch(prepare_image(image, size)).to(device)).latent_dist.mean
    z_n = normalise_latents(vae.config, z)
    cases = {"full": lambda: vae.decode(z), "preview": lambda: preview.decode(z_n)}
    for run in cases.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(repeats):
        for name in list(cases)[round_ % 2 :] + list(cases)[: round_ % 2]:  # alternate which runs first
            times[name].append(timed(cases[name], device))
    full, quick = statistics.median(times["full"]), statistics.median(times["preview"])
    return {"size": size, "repeats": repeats, "full_s": full, "preview_s": quick, "speedup": full / quick}


@torch.no_grad()
def decode_fidelity(
    vae: nn.Module, preview: nn.Module, images: Sequence[Path], size: int
) -> dict[str, float]:
    """Mean and standard deviation over `images` of the PSNR of the preview's decode against the VAE's, and of each
    against the original image."""
    device = next(vae.parameters()).device
    scores: dict[str, list[float]] = {"preview_vs_full": [], "full_vs_image": [], "preview_vs_image": []}
    for path in images:
        x = as_batch(prepare_image(path, size)).to(device)
        z = vae.encode(x).latent_dist.mean
        full = to_uint8(vae.decode(z).sample)
        quick = to_uint8(preview.decode(normalise_latents(vae.config, z)).sample)
        original = to_uint8(x)
        scores["preview_vs_full"].append(float(psnr(full, quick)[0]))
        scores["full_vs_image"].append(float(psnr(original, full)[0]))
        scores["preview_vs_image"].append(float(psnr(original, quick)[0]))
    if not scores["preview_vs_full"]:
        raise ValueError("no images to measure the preview's fidelity on")
    result: dict[str, float] = {"size": size, "num_images": len(images)}
    for name, values in scores.items():
        result[f"psnr_{name}"] = float(np.mean(values))
        result[f"psnr_{name}_std"] = float(np.std(values))
    return result


def render(speed: dict[str, float], fidelity: dict[str, float]) -> str:
    """The two measurements as Markdown."""
    return "\n".join(
        [
            f"| decode at {speed['size']} px, batch 1 | seconds (median of {speed['repeats']}) |",
            "| --- | --- |",
            f"| full VAE decoder | {speed['full_s']:.4f} |",
            f"| preview decoder | {speed['preview_s']:.4f} |",
            f"| speed-up | {speed['speedup']:.1f}x |",
            "",
            f"PSNR on {fidelity['num_images']} held-out images at {fidelity['size']} px (dB, mean ± std):",
            "",
            "| comparison | PSNR |",
            "| --- | --- |",
            f"| preview decode vs full decode | {fidelity['psnr_preview_vs_full']:.2f} ± {fidelity['psnr_preview_vs_full_std']:.2f} |",
            f"| full decode vs image | {fidelity['psnr_full_vs_image']:.2f} ± {fidelity['psnr_full_vs_image_std']:.2f} |",
            f"| preview decode vs image | {fidelity['psnr_preview_vs_image']:.2f} ± {fidelity['psnr_preview_vs_image_std']:.2f} |",
        ]
    )
