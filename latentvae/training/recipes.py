"""The named recipes of `training/train.py --recipe` (overrides of `TrainConfig`'s defaults) and the learning-rate
rule of `--scale_lr_with_width`."""

from __future__ import annotations

from typing import Any


def width_scaled_lr(learning_rate: float, width: int, images_per_step: int) -> float:
    """The learning-rate rule of `--scale_lr_with_width`: `learning_rate` is the rate for a model whose widest block
    has 128 channels, trained on 4 images per step; the rate falls as 1 / width (Adam's per-weight steps add up over
    a layer's fan-in) and grows as sqrt(batch) (the gradient noise falls as 1 / sqrt(batch)).

    Measured points (eval/results/recipes/): width 128, batch 4: 3e-4 beats 1.5e-4 and keeps colour; width 64
    (tiny-kl-f8), batch 8: 5e-4 keeps colour, 2e-3 gives a colour-blind latent (the rule says 8.5e-4). At the SD
    scale (width 512, 96 images per step) it gives 3.7e-4 from 3e-4, where CompVis trained kl-f8 at 4.5e-6 x 96 =
    4.3e-4.
    """
    return learning_rate * (128 / width) * (images_per_step / 4) ** 0.5


# Named recipes: overrides of TrainConfig's defaults, which are the SD kl-f8 recipe (CompVis' optimiser, lr, KL weight,
# LPIPS-VGG weight and GAN schedule) with one deliberate change: an MSE pixel loss where CompVis trained with L1, as
# Stability's ft-MSE fine-tune did (`--recon_loss l1` restores theirs).
RECIPES: dict[str, dict[str, Any]] = {
    "sd-kl-f8": {},
    "sd-ft-mse": dict(
        decoder_only=True, perceptual_weight=0.1, ema_decay=0.9999, learning_rate=1e-4, scale_lr=False
    ),
    "quickstart": dict(
        model_preset="tiny-kl-f8",
        resolution=64,
        resize_to=256,  # 64 px detail crops at the scale the evaluation protocol uses (256 px)
        cache_images=True,
        train_batch_size=8,
        max_train_steps=1200,
        # 2e-3 left the latent without chroma (a linear probe reads Y from it, R^2 0.96, but not Cb/Cr, R^2 ~0): a
        # sepia VAE. 5e-4: colour in the latent (R^2 0.64), 21.47 dB / SSIM 0.558 on BSDS500 val against 19.32 /
        # 0.536 (eval/results/recipes/quickstart-colour.md; one seed).
        learning_rate=5e-4,
        scale_lr=False,
        adam_beta1=0.9,
        adam_beta2=0.99,
        lr_scheduler="cosine",
        lr_warmup_steps=20,
        perceptual_weight=0.1,
        perceptual_net="squeeze",  # 5 MB of weights to download, not VGG16's 528 MB
        perceptual_fallback=True,
        dataloader_num_workers=0,
        validation_steps=400,
        num_validation_images=8,
        checkpointing_steps=400,
        scaling_factor_images=64,
        output_dir="outputs/quickstart",
    ),
    # The diffusers AutoencoderKL training example (examples/research_projects/autoencoderkl) with the lr the issue
    # reports for it: AdamW betas 0.9/0.999, weight decay 1e-2, constant lr 1e-4 (its default is 4.5e-6, unscaled),
    # MSE summed per image + 1e-6 KL, resize + center crop without flips, the GAN from step 50001 with weight 1.0.
    # Its LPIPS term (0.5) is computed under no_grad there, so it never reaches the weights: 0 here. The baseline
    # of the recipe benchmark (eval/recipes.py).
    "diffusers-example": dict(
        learning_rate=1e-4,
        scale_lr=False,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_weight_decay=1e-2,
        lr_scheduler="constant",
        center_crop=True,
        random_flip=False,
        perceptual_weight=0.0,
        disc_weight=1.0,
    ),
    # From scratch at a small budget (measured by eval/recipes.py against diffusers-example): AdamW 0.9/0.99
    # without weight decay, a short linear warm-up and a cosine decay to zero, whole-image crops with flips.
    # BSDS500 test, 1000 steps, seeds 0 and 1: 22.20 dB against the baseline's 21.75 (+0.17 and +0.73 per seed),
    # colourfulness 0.89 against 0.93 (eval/results/recipes/recipes.md).
    "from-scratch": dict(
        learning_rate=3e-4,  # at width 128 and 4 images per step: scaled to the model and batch
        scale_lr=False,
        scale_lr_with_width=True,
        adam_beta1=0.9,
        adam_beta2=0.99,
        adam_weight_decay=0.0,
        lr_scheduler="cosine",
        lr_warmup_steps=50,
        perceptual_weight=0.0,
    ),
    # EQ-VAE's fine-tune of an existing VAE (zelaki/eqvae, train_eqvae/configs/eqvae_config.yaml and
    # ldm/models/autoencoder.py): the SD kl-f8 loss and optimiser (lr 4.5e-6 per image, Adam 0.5/0.9), the GAN from
    # step 0, encoder and decoder trained; on half the batches a random downscale by 8/32..31/32 and a rotation by
    # 90/180/270 degrees. EQ-VAE replaces that batch's reconstruction by the transformed one; here it is added to
    # it with weight 1. Five epochs, as theirs on OpenImages. Needs --pretrained_model_name_or_path.
    "eq-finetune": dict(
        equivariance_prob=0.5,
        equivariance_scales="0.25,0.97",
        equivariance_rotations=True,
        disc_start=0,
        num_train_epochs=5,
    ),
    # LDM's vq-f4 first stage (models/first_stage_models/vq-f4/config.yaml): taming's VQLPIPSWithDiscriminator
    # with L1 + LPIPS, codebook weight 1.0, discriminator weight 0.75 from step 0, base lr 4.5e-6 per image.
    # LDM's vq-f4 loss: L1 + LPIPS, the GAN from step 0 at 0.75, and taming's quantiser weighting (legacy=True).
    "vq-f4": dict(
        model="vq", model_preset="vq-f4", recon_loss="l1", disc_start=0, disc_weight=0.75, legacy_vq_loss=True
    ),
}
# The CPU quickstart, for the tiny VQ model: dead codes are restarted so that the codebook is used.
RECIPES["vq-quickstart"] = {
    **RECIPES["quickstart"],
    "model": "vq",
    "model_preset": "tiny-vq-f4",
    "learning_rate": 2e-3,  # the KL quickstart's lr drop was measured for the KL model only
    "codebook_restart_steps": 50,
    "codebook_usage_window": 50,
    "output_dir": "outputs/vq-quickstart",
}
