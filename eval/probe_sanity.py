"""How far to trust the diffusion probe of `latentvae diagnose`: its seed-to-seed spread on one VAE, and the gap to
the same VAE with latents made deliberately harder to diffuse.

    python eval/probe_sanity.py --vae VAE --data_dir DIR [--resolution 128] [--seeds 0 1 2] [--out DIR]

(a) The probe is trained on the VAE's latents once per seed (the seed moves the UNet's initialisation, the crops, the
    noise and the timesteps): the spread of its held-out loss is the resolution of a comparison between two VAEs.
(b) The same weights with a fixed random +-1 pattern per latent channel and position multiplied into the encoder's
    posterior (mean and samples) and divided out before decoding: reconstructions are exactly the VAE's, the latents
    are as hard to model as a spatially white signal. Its probe loss (same seeds) must be clearly worse.

Writes probe_sanity.json and probe_sanity.md to --out (prints the Markdown).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch
from diffusers.models.modeling_outputs import AutoencoderKLOutput

from latentvae.evaluation.diagnostics import DiagnoseSettings, run_probe
from latentvae.evaluation.evaluate import open_data
from latentvae.evaluation.probe import ProbeSettings
from latentvae.files.loading import load_vae
from latentvae.models.distributions import DiagonalGaussianDistribution


def sign_flipped(vae: torch.nn.Module, latent_size: int, seed: int) -> torch.nn.Module:
    """`vae` (changed in place) with its latents multiplied by a fixed random sign per channel and position."""
    channels = vae.config.latent_channels
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (1, channels, latent_size, latent_size), generator=generator) * 2.0 - 1
    base = type(vae)

    class SignFlipped(base):
        def encode(self, x, return_dict=True):
            posterior = base.encode(self, x).latent_dist
            flipped = torch.cat([posterior.mean * signs, posterior.logvar], 1)  # a sign keeps the variance
            return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(flipped))

        def decode(self, z, return_dict=True, generator=None):
            return base.decode(self, z * signs, return_dict=return_dict)

    vae.__class__ = SignFlipped
    return vae


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", required=True, help="the VAE (any path latentvae.load_vae reads)")
    parser.add_argument(
        "--data_dir", required=True, help="folder of images (the probe's train and val split)"
    )
    parser.add_argument("--resolution", type=int, default=128, help="crop size of the probe's images (px)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="probe seeds")
    parser.add_argument("--flip_seed", type=int, default=1, help="seed of the sign pattern of (b)")
    parser.add_argument("--probe_steps", type=int, default=ProbeSettings.steps)
    parser.add_argument("--probe_images", type=int, default=DiagnoseSettings.probe_images)
    parser.add_argument("--probe_val_images", type=int, default=DiagnoseSettings.probe_val_images)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="folder for probe_sanity.json and probe_sanity.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = open_data(args.data_dir, None)
    base = DiagnoseSettings(
        resolution=args.resolution,
        probe_images=args.probe_images,
        probe_val_images=args.probe_val_images,
        grid_samples=1,
        probe=ProbeSettings(steps=args.probe_steps),
    )
    vae = load_vae(args.vae).float().eval()
    runs: dict[str, list[dict]] = {"plain": [], "sign_flipped": []}
    for name in runs:
        if name == "sign_flipped":
            vae = sign_flipped(vae, args.resolution // 8, args.flip_seed)
        for seed in args.seeds:
            settings = replace(base, seed=seed, probe=replace(base.probe, seed=seed))
            numbers, _ = run_probe(vae, data, settings)
            runs[name].append(
                {"seed": seed, "val_loss": numbers["val_loss"], "cpu_s": numbers["cpu_seconds"]}
            )
            print(
                f"{name} seed {seed}: probe loss {numbers['val_loss']:.4f} ({numbers['cpu_seconds']:.0f} CPU s)"
            )
    summary = {}
    for name, rows in runs.items():
        losses = [row["val_loss"] for row in rows]
        spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
        summary[name] = {
            "mean": statistics.fmean(losses),
            "std": spread,
            "min": min(losses),
            "max": max(losses),
        }
    gap = summary["sign_flipped"]["mean"] / summary["plain"]["mean"]
    command = " ".join(["python", "eval/probe_sanity.py", *argv])
    lines = [
        f"`{command}` ({args.threads} thread(s); probe: {args.probe_steps} steps, {args.probe_images} images, "
        f"{args.resolution} px)",
        "",
        "| latents | "
        + " | ".join(f"seed {seed}" for seed in args.seeds)
        + " | mean ± std | CPU s per run |",
        "| --- | " + " | ".join("---" for _ in args.seeds) + " | --- | --- |",
    ]
    for name, rows in runs.items():
        cells = " | ".join(f"{row['val_loss']:.4f}" for row in rows)
        cpu = statistics.fmean(row["cpu_s"] for row in rows)
        lines.append(
            f"| {name} | {cells} | {summary[name]['mean']:.4f} ± {summary[name]['std']:.4f} | {cpu:.0f} |"
        )
    lines += [
        "",
        f"Gap (b): sign-flipped / plain = {gap:.2f}x; seed-to-seed std of the plain probe = "
        f"{summary['plain']['std'] / summary['plain']['mean']:.1%} of its mean.",
    ]
    markdown = "\n".join(lines)
    print(markdown)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        record = {"command": command, "runs": runs, "summary": summary, "gap": gap}
        (out / "probe_sanity.json").write_text(json.dumps(record, indent=2) + "\n")
        (out / "probe_sanity.md").write_text(markdown + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
