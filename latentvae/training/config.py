"""The training configuration: one typed dataclass, named recipes, and the command line built from both.

Every field is a flag (`--snake_case` or `--kebab-case`); its docstring in `metadata["help"]` is the `--help` text.
Flag names follow the diffusers AutoencoderKL training example where one exists, so its users can switch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any

from latentvae.data.loaders import DataSettings
from latentvae.evaluation.normalization import MODES
from latentvae.models.presets import FLUX2_PRESETS, PRESETS, VQ_PRESETS
from latentvae.training.recipes import RECIPES
from latentvae.training.regularizers import RegularizerSettings, check_regularizer_flags


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig(RegularizerSettings):
    # -- model --
    model: str = _f(
        "kl",
        "Autoencoder kind: kl (AutoencoderKL, Gaussian latent), flux2 (AutoencoderKLFlux2: Gaussian latent, plus "
        "the BatchNorm statistics FLUX.2 pipelines normalise with, measured at the end: --latent_normalization) or "
        "vq (VQModel, codebook latent).",
        choices=("kl", "flux2", "vq"),
    )
    pretrained_model_name_or_path: str | None = _f(
        None, "Start from this VAE (any path latentvae.load_vae reads: diffusers folder, .safetensors, SD checkpoint).",
        aliases=("--init_from",),
    )  # fmt: skip
    model_preset: str = _f(
        "sd-kl-f8",
        "Architecture to build from scratch when no pretrained model is given: a name in latentvae.PRESETS "
        "(--model kl), latentvae.FLUX2_PRESETS (--model flux2) or latentvae.VQ_PRESETS (--model vq).",
    )
    decoder_only: bool = _f(
        False,
        "Freeze the encoder (and quant_conv): fine-tune the decoder only, as Stability did. The latent space is "
        "kept, and so are the loaded model's normalisation constants (scaling_factor, shift_factor, FLUX.2's BN "
        "statistics), which its diffusion models were trained with, unless --remeasure_latent_normalization.",
    )
    remeasure_latent_normalization: bool = _f(
        False,
        "With --decoder_only: measure the latent normalisation on the training data at the end and write it, in "
        "the latent family's convention (scale; FLUX.1 / SD3: shift_scale; FLUX.2: its BN statistics) (default: "
        "keep the loaded constants); a diffusion model trained on the loaded constants then sees other latents.",
    )
    ema_decay: float = _f(0.0, "Keep an exponential moving average of the weights with this decay (0 = off).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    channels_last: bool = _f(
        False, "Use the channels_last memory format (faster convolutions on recent GPUs)."
    )
    compile: bool = _f(False, "torch.compile the autoencoder.")
    allow_pickle: bool = _f(
        False, "Allow loading a pickle (.ckpt/.pt/.bin) pretrained model: only for files you trust."
    )
    # -- data --
    train_data_dir: str | None = _f(None, "Folder of training images (searched recursively).")
    dataset_name: str | None = _f(None, "A Hugging Face dataset name or local path (datasets library).")
    image_column: str = _f("image", "Column of --dataset_name that holds the images.")
    val_data_dir: str | None = _f(
        None, "Folder of validation images; default: a fixed held-out slice of the training set."
    )
    resolution: int = _f(256, "Training crop size in pixels (short side resized to this, then cropped).")
    resize_to: int | None = _f(
        None,
        "Resize the shorter side to this before cropping (default: --resolution); larger = detail crops.",
    )
    center_crop: bool = _f(
        False,
        "Crop training images at the center instead of at a random position (as the diffusers examples).",
    )
    random_flip: bool = _f(True, "Flip training crops left-right with probability 1/2.")
    random_hue: float = _f(
        0.0,
        "Rotate each training crop's hue by a random fraction of the colour circle in [-h, h] (torchvision "
        "ColorJitter's hue, at most 0.5): keeps chroma in the latent when the training set is small or uniform.",
    )
    synthetic_colour_images: int = _f(
        0,
        "Add this many generated images of every hue (smooth HSV fields, saturated shapes; "
        "latentvae.data.synthetic) to the training images: colour the training photos lack (0 = none).",
    )
    train_shards: str | None = _f(
        None,
        "WebDataset tar shards to stream instead of a folder, e.g. 'data/shard-{000000..000099}.tar' (local paths, "
        "URLs or pipe: commands); write them with `latentvae make-shards`. Needs --max_train_steps.",
    )
    shuffle_buffer: int = _f(
        1000, "Shards: samples shuffled together (whole shards are read until the buffer holds this many)."
    )
    max_bad_fraction: float = _f(
        0.1, "Stop with the list of files if more than this fraction of the images is broken (checked early)."
    )
    cache_images: bool = _f(
        False, "Keep decoded, resized images in memory (small datasets: no decoding per step)."
    )
    dataloader_num_workers: int = _f(4, "Data loader worker processes per training process.")
    # -- optimisation --
    train_batch_size: int = _f(12, "Images per process per step.")
    max_train_steps: int | None = _f(None, "Total optimizer steps; overrides --num_train_epochs when given.")
    num_train_epochs: int = _f(100, "Epochs to train when --max_train_steps is not given.")
    gradient_accumulation_steps: int = _f(1, "Batches accumulated per optimizer step.")
    learning_rate: float = _f(4.5e-6, "Learning rate (per image when --scale_lr, as in latent-diffusion).")
    scale_lr: bool = _f(True, "Multiply the learning rate by batch size x processes x accumulation steps.")
    scale_lr_with_width: bool = _f(
        False,
        "Read --learning_rate as the rate of a model 128 channels wide at 4 images per step and scale it by "
        "128 / max(block_out_channels) x sqrt(images per step / 4) (see width_scaled_lr).",
    )
    lr_scheduler: str = _f(
        "constant", "Scheduler: constant, constant_with_warmup, linear, cosine, ... (diffusers)."
    )
    lr_warmup_steps: int = _f(0, "Warm-up steps of the learning-rate schedule.")
    adam_beta1: float = _f(
        0.5, "Adam beta1 (latent-diffusion uses 0.5 for the autoencoder and the discriminator)."
    )
    adam_beta2: float = _f(0.9, "Adam beta2.")
    adam_weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_epsilon: float = _f(1e-8, "Adam epsilon.")
    max_grad_norm: float = _f(1.0, "Clip gradient norm to this (0 = no clipping).")
    max_nonfinite_steps: int = _f(
        10,
        "A step whose loss or gradient is NaN/inf is skipped and logged; stop with an error after more than "
        "this many in a row.",
    )
    mixed_precision: str | None = _f(None, "no, fp16 or bf16; default: what `accelerate config` chose.")
    seed: int = _f(0, "Random seed (model init, data order, augmentation, posterior noise).")
    # -- losses --
    recon_loss: str = _f("mse", "Pixel reconstruction loss: mse or l1.", choices=("mse", "l1"))
    chroma_weight: float = _f(
        1.0,
        "Weight of the pixel error's chroma part (orthogonal to grey) against its grey part; > 1 makes colour "
        "errors cost more (MSE: |e_grey|^2 + w |e_chroma|^2).",
    )
    perceptual_weight: float = _f(1.0, "Weight of the LPIPS term (0 = off).")
    perceptual_net: str = _f(
        "vgg",
        "LPIPS backbone for training: vgg (as SD), alex or squeeze (SqueezeNet 1.1, a 5 MB download).",
        choices=("vgg", "alex", "squeeze"),
    )
    perceptual_fallback: bool = _f(
        False,
        "If the LPIPS backbone weights are missing and cannot be downloaded, warn and train without the "
        "perceptual term.",
    )
    offline: bool = _f(
        False,
        "Never download pretrained weights (as HF_HUB_OFFLINE=1): a file missing from the torch hub cache is an "
        "error that names it.",
    )
    perceptual_random_backbone: bool = _f(
        False,
        "Use a randomly initialised LPIPS backbone: for testing the code path only, the distances are meaningless.",
    )
    kl_weight: float = _f(
        1e-6, "Weight of the KL term (summed over latent elements, as in latent-diffusion)."
    )
    learn_logvar: bool = _f(
        False, "Learn a scalar output log-variance: nll = rec / exp(logvar) + logvar (LDM)."
    )
    codebook_weight: float = _f(
        1.0,
        "VQ: weight of the quantiser loss (codebook + beta x commitment), balanced against the NLL as in LDM.",
    )
    commitment_beta: float = _f(0.25, "VQ: beta, the weight of the commitment loss.")
    legacy_vq_loss: bool = _f(
        False, "VQ: taming/diffusers weighting: beta on the codebook term instead of the commitment term."
    )
    codebook_ema_decay: float = _f(
        0.0,
        "VQ: move codes by an EMA of their encoder outputs with this decay, not by the codebook loss (0 = loss).",
    )
    codebook_restart_steps: int = _f(
        0, "VQ: re-seed codes unused for this many batches from the batch's encoder outputs (0 = never)."
    )
    codebook_usage_window: int = _f(
        100, "VQ: batches over which the logged codebook usage counts a code as used."
    )
    disc_start: int = _f(50001, "Step at which the PatchGAN discriminator joins.")
    disc_weight: float = _f(0.5, "Weight of the adversarial term (times the adaptive weight).")
    disc_learning_rate: float | None = _f(None, "Discriminator learning rate (default: the autoencoder's).")
    # -- output, logging, checkpoints --
    output_dir: str = _f("outputs/vae", "Where checkpoints, validation grids, logs and the final VAE go.")
    report_to: str = _f("tensorboard", "Tracker: tensorboard, wandb, all or none.")
    tracker_project_name: str = _f("latentvae", "Project name for the tracker.")
    logging_steps: int = _f(10, "Log losses every N steps.")
    validation_steps: int = _f(1000, "Validate (PSNR, SSIM, image grid) every N steps and at the end.")
    num_validation_images: int = _f(16, "Validation images used (and held out when no --val_data_dir).")
    checkpointing_steps: int = _f(2000, "Save a resumable checkpoint every N steps.")
    checkpoints_total_limit: int | None = _f(3, "Keep at most this many checkpoints (oldest removed).")
    resume_from_checkpoint: str | None = _f(None, "'latest' or a checkpoint folder to resume from.")
    scaling_factor_images: int = _f(
        512,
        "Training images (center crops) whose posterior samples the latent normalisation is measured on at the end, "
        "shared among the processes.",
    )
    latent_normalization: str = _f(
        "auto",
        "The latent normalisation measured at the end and written where the target pipeline reads it: scale (SD: "
        "scaling_factor = 1 / std), shift_scale (FLUX.1 / SD3: shift_factor = mean, scaling_factor = 1 / std), "
        "per_channel (latents_mean / latents_std; SDXL pipelines then normalise per channel), batchnorm (FLUX.2: "
        "the bn statistics of 2x2-patchified latents, exact) or auto (the latent family's: batchnorm for a FLUX.2 "
        "VAE, shift_scale for one with a shift_factor or 16 channels without quant convs, else scale). A "
        "--decoder_only run keeps the loaded constants unless this flag is given (or --remeasure_latent_normalization).",
        choices=("auto", *MODES),
    )
    # -- model card and the Hub --
    license: str | None = _f(None, "License written into the model card (a Hub license id, e.g. apache-2.0).")
    base_model: str | None = _f(
        None,
        "Hub id of the model fine-tuned, for the model card (default: recognised from "
        "--pretrained_model_name_or_path where it is a Hub cache snapshot or one of Stability's VAE files).",
    )
    push_to_hub: bool = _f(False, "At the end, upload output_dir/final/ to the Hub (main process).")
    hub_model_id: str | None = _f(
        None, "Hub repository to push to, user/name (default: the output folder's name, under your account)."
    )
    hub_token: str | None = _f(
        None, "Hub token (default: HF_TOKEN or the one `hf auth login` saved); never saved in checkpoints."
    )
    hub_private_repo: bool = _f(False, "Create the Hub repository private.")
    push_checkpoints: bool = _f(
        False, "With --push_to_hub, also upload the checkpoints (into checkpoints/ of the repository)."
    )
    recipe: str = _f("sd-kl-f8", "The named recipe the values started from (set by --recipe).", flag=False)

    def to_dict(self) -> dict[str, Any]:
        # The token stays out of checkpoints, the tracker and model cards.
        return {**dataclasses.asdict(self), "hub_token": None}

    def data_settings(self) -> DataSettings:
        """The fields the data layer reads, as its own settings object."""
        return DataSettings(**{f.name: getattr(self, f.name) for f in fields(DataSettings)})


# Fields that only a VQ model uses, and those that only a KL model uses: setting one for the other kind is an error.
VQ_ONLY = (
    "codebook_weight",
    "commitment_beta",
    "legacy_vq_loss",
    "codebook_ema_decay",
    "codebook_restart_steps",
    "codebook_usage_window",
)
KL_ONLY = ("kl_weight",)
# `--model vq` / `--model flux2` alone: that kind's architecture at the default recipe's scale.
DEFAULT_PRESETS = {"vq": "vq-f4", "flux2": "flux2-kl-f8c32"}
# The shapes each kind builds from scratch (`--model_preset`).
MODEL_PRESETS = {"kl": PRESETS, "flux2": FLUX2_PRESETS, "vq": VQ_PRESETS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train an SD-style autoencoder (KL, or VQ with --model vq) with Accelerate: "
        "`accelerate launch training/train.py`. Defaults shown are the sd-kl-f8 recipe; --recipe changes them, "
        "flags given here win.",
    )
    parser.add_argument(
        "--recipe",
        "--preset",
        dest="recipe",
        default="sd-kl-f8",
        choices=sorted(RECIPES),
        help="Named recipe of defaults (model shape, data, optimiser, losses). --preset is its old name, kept for "
        "one release; model shapes are --model_preset.",
    )
    parser.add_argument("--config", default=None, help="JSON file of field values (flags given here win).")
    add_config_flags(parser, TrainConfig)
    return parser


def add_config_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One flag per field of the dataclass `config_class` (`--snake_case` and `--kebab-case`, plus the field's
    `aliases`; its help text, choices and type from the field), unless its metadata says `flag=False`. Flags not
    given stay out of the namespace (SUPPRESS), so "given" and "given as none" are told apart."""
    for f in fields(config_class):
        if not f.metadata.get("flag", True):
            continue
        names = [f"--{f.name}", f"--{f.name.replace('_', '-')}"] + list(f.metadata.get("aliases", ()))
        names = list(dict.fromkeys(names))
        help = f"{f.metadata['help']} (default: {f.default})"
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind == "bool":
            parser.add_argument(
                *names,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help,
            )
            continue
        convert = float if "float" in kind else int if "int" in kind else str
        if "None" in kind:  # optional fields take the word none (or null) for None
            convert = _or_none(convert)
        # Flags not given stay out of the namespace (SUPPRESS), so "given" and "given as none" are told apart.
        parser.add_argument(
            *names,
            dest=f.name,
            type=convert,
            choices=f.metadata.get("choices"),
            default=argparse.SUPPRESS,
            help=help,
        )


def _or_none(convert):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else convert(text)

    parse.__name__ = convert.__name__
    return parse


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, set[str]]:
    """Defaults < recipe (`--recipe`) < `--config` JSON < flags. Returns the config and the explicitly set names."""
    args = build_parser().parse_args(argv)
    values = {"recipe": args.recipe, **RECIPES[args.recipe]}
    from_file = {}
    if args.config:
        with open(args.config) as handle:
            from_file = json.load(handle)
        values.update(from_file)
    explicit = set(vars(args)) - {"recipe", "config"}
    values.update({name: getattr(args, name) for name in explicit})
    unknown = set(values) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise SystemExit(f"unknown config fields {sorted(unknown)} (from --config {args.config})")
    if (
        values.get("model") in DEFAULT_PRESETS
        and "model_preset" not in values
        and "pretrained_model_name_or_path" not in values
    ):
        values["model_preset"] = DEFAULT_PRESETS[values["model"]]
    config = TrainConfig(**values)
    # A flag of the other model kind is a mistake worth stopping for; so is such a field in a --config file, unless
    # it holds the default (a saved config, e.g. a checkpoint's training_state.json, lists every field).
    other = KL_ONLY if config.model == "vq" else VQ_ONLY
    defaults = TrainConfig()
    changed = {n for n in set(from_file) & set(other) if from_file[n] != getattr(defaults, n)}
    if misplaced := sorted((explicit & set(other)) | changed):
        kind = "kl" if config.model == "vq" else "vq"
        raise SystemExit(f"only --model {kind} uses {', '.join('--' + n for n in misplaced)}")
    if config.remeasure_latent_normalization and not config.decoder_only:
        raise SystemExit(
            "--remeasure_latent_normalization is for --decoder_only runs: a run that trains the encoder always "
            "measures the latent normalisation at the end"
        )
    check_regularizer_flags(config)
    if config.scale_lr and config.scale_lr_with_width:
        raise SystemExit(
            "--scale_lr and --scale_lr_with_width are two rules for one learning rate: choose one"
        )
    # Stopped here, not after the data is read: e.g. `--recipe quickstart --model flux2` names a KL shape.
    shapes = MODEL_PRESETS[config.model]
    if not config.pretrained_model_name_or_path and config.model_preset not in shapes:
        source = "" if "model_preset" in explicit else f" (from --recipe {args.recipe})"
        raise SystemExit(
            f"--model {config.model} builds one of {', '.join(shapes)} (--model_preset); "
            f"got {config.model_preset!r}{source}"
        )
    return config, explicit
