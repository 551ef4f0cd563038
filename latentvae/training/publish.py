"""The end of a training run, for others to read: the model card's training facts and the push to the Hub.

`training_card` turns the resolved `TrainConfig` and what the run measured into the `CardInfo` that `export_vae`
writes into `final/README.md`; `push_training` uploads `final/` (and, with `--push_checkpoints`, the checkpoints)
with the diffusers examples' flags (`--push_to_hub --hub_model_id --hub_token`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from latentvae.evaluation.latent_stats import LatentStats
from latentvae.files.card import CardInfo, TrainingRecord, known_base_model
from latentvae.files.hub import PushError, push_folder
from latentvae.training.config import TrainConfig

GRID_NAME = "validation.png"
# The validation scores (training's log names) as the card names them; LPIPS is the training loss's network.
VALIDATION_METRICS = {
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "lpips": "LPIPS ({net})",
    "psnr_y": "PSNR Y (dB)",
    "psnr_c": "PSNR CbCr (dB)",
    "colourfulness_ratio": "colourfulness ratio",
    "ciede2000": "CIEDE2000",
}


def repo_id(cfg: TrainConfig) -> str:
    """`--hub_model_id`, else the output folder's name (under the token's account), as the diffusers examples."""
    return cfg.hub_model_id or Path(cfg.output_dir).resolve().name


def loss_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The loss terms the run used, name -> config value (the GAN's start and the LPIPS net only when they apply)."""
    names = ["recon_loss", "perceptual_weight"]
    names += ["perceptual_net"] if cfg.perceptual_weight > 0 else []
    names += ["codebook_weight", "commitment_beta"] if cfg.model == "vq" else ["kl_weight"]
    names += ["learn_logvar", "disc_weight"]
    names += ["disc_start"] if cfg.disc_weight > 0 else []
    return {name: getattr(cfg, name) for name in names}


def optimizer_settings(cfg: TrainConfig, learning_rate: float) -> dict[str, Any]:
    """The optimiser and what else shaped the weights; `learning_rate` is the one used (after --scale_lr)."""
    names = [
        "lr_scheduler",
        "lr_warmup_steps",
        "adam_beta1",
        "adam_beta2",
        "adam_weight_decay",
        "max_grad_norm",
    ]
    names += ["ema_decay", "decoder_only", "mixed_precision"]
    return {"learning_rate": learning_rate, **{name: getattr(cfg, name) for name in names}}


def copy_last_grid(output_dir: Path, final_dir: Path) -> str | None:
    """Copy the newest validation grid into `final_dir` (as `validation.png`), for the card; its name, or None."""
    grids = sorted((output_dir / "validation").glob("step-*.png"))
    if not grids:
        return None
    final_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(grids[-1], final_dir / GRID_NAME)
    return GRID_NAME


def training_card(
    cfg: TrainConfig,
    *,
    steps: int,
    images_per_step: int,
    learning_rate: float,
    data: str,
    validation: dict[str, float],
    stats: LatentStats,
    grid: str | None,
    normalisation: str | None = None,
) -> CardInfo:
    """The model card's account of a finished run (values as the config and the run's measurements hold them;
    `normalisation`: how the latent normalisation constants were found, when not the scaling factor measured)."""
    latents = "the encoder outputs" if cfg.model == "vq" else "posterior samples"
    record = TrainingRecord(
        recipe=cfg.recipe,
        steps=steps,
        images_per_step=images_per_step,
        resolution=cfg.resolution,
        data=data.splitlines()[0],  # the first line: the sources and counts (then come file names)
        losses=loss_settings(cfg),
        optimizer=optimizer_settings(cfg, learning_rate),
        validation={
            title.format(net=cfg.perceptual_net): round(validation[key], 4)
            for key, title in VALIDATION_METRICS.items()
            if key in validation
        },
        num_validation_images=int(validation.get("num_images", 0)),
        grid=grid,
    )
    return CardInfo(
        title=repo_id(cfg) if cfg.push_to_hub else Path(cfg.output_dir).resolve().name,
        license=cfg.license,
        base_model=cfg.base_model or known_base_model(cfg.pretrained_model_name_or_path),
        repo_id=repo_id(cfg) if cfg.push_to_hub else None,
        normalisation=normalisation
        or f"scaling_factor = 1 / std of {latents} over {stats.num_images} training images "
        f"({cfg.resolution} px center crops, seed {cfg.seed}), measured at the end of training",
        training=record,
    )


def push_training(cfg: TrainConfig, final_dir: Path, step: int) -> list[str]:
    """Upload `final_dir` to the root of `repo_id(cfg)` and, with `--push_checkpoints`, the complete checkpoints
    into `checkpoints/`; returns the commit URLs.

    Raises:
        `PushError`: the upload failed (the error says how to retry: the export is complete on disk).
    """
    repo = repo_id(cfg)
    hub = dict(token=cfg.hub_token, private=cfg.hub_private_repo, offline=cfg.offline)
    try:
        urls = [push_folder(final_dir, repo, commit_message=f"End of training (step {step})", **hub)]
        if cfg.push_checkpoints:
            urls.append(
                push_folder(
                    cfg.output_dir,
                    repo,
                    path_in_repo="checkpoints",
                    allow_patterns=["checkpoint-*/*"],
                    commit_message=f"Checkpoints up to step {step}",
                    **hub,
                )
            )
    except (OSError, ValueError) as err:  # huggingface_hub's HTTP, connection and repo-id errors
        raise PushError(
            f"the upload to the Hub repository {repo} failed: {err}\n  {final_dir} is complete; push it with "
            f"`latentvae push {final_dir} {repo}`"
        ) from err
    return urls
