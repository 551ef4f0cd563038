"""The VQ model in a training loop made of the pieces training/train.py uses: `VQAutoencoding` (the module DDP
wraps, returning the quantiser's loss), `AutoencoderLoss`, AdamW, the PatchGAN, and Accelerate's prepare, backward
and save/load_state.

Oracles: taming's loss formula (for the balance of the quantiser term), a second run of the same loop (resume
equality), the codebook before and after training (usage, EMA ownership).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from train_helpers import reset_accelerate

from latentvae import VQModel
from latentvae.models.discriminator import NLayerDiscriminator
from latentvae.training.autoencoding import VQAutoencoding
from latentvae.training.losses import AutoencoderLoss

NUM_CODES = 64


def tiny_vq(seed: int = 0) -> VQModel:
    """f4, 3-channel latent, 64 codes; diffusers' U(-1/K, 1/K) codebook init, so at first few codes are chosen."""
    torch.manual_seed(seed)
    return VQModel(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        norm_num_groups=8,
        latent_channels=3,
        num_vq_embeddings=NUM_CODES,
    )


def smooth_batches(count: int, batch: int = 4, size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """Images in [-1, 1] with structure at several scales: blurred noise plus a random colour gradient."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        noise = torch.randn(batch, 3, size // 4, size // 4, generator=generator)
        coarse = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
        ramp = torch.linspace(-1, 1, size)[None, None, None, :] * torch.randn(
            batch, 3, 1, 1, generator=generator
        )
        batches.append(torch.tanh(0.6 * coarse + 0.5 * ramp))
    return batches


@torch.no_grad()
def usage_on(vae: VQModel, images: torch.Tensor) -> float:
    """Fraction of the codebook chosen for a batch (eval mode: nothing in the tracker changes)."""
    was_training = vae.training
    codes = vae.eval().quantize(vae.encode(images).latents)[2][2]
    vae.train(was_training)
    return torch.unique(codes).numel() / NUM_CODES


def train(model: VQAutoencoding, batches: list[torch.Tensor], lr: float = 2e-3) -> list[dict[str, float]]:
    """Plain loop: reconstruction through the codebook, NLL + quantiser loss, AdamW on the trainable weights."""
    vae = model.train().vae
    loss_fn = AutoencoderLoss(perceptual_weight=0.0, disc_weight=0.0)
    optimizer = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.99))
    history = []
    for step, images in enumerate(batches):
        recon, vq_loss, vq_logs, _ = model(images)
        loss, logs = loss_fn.autoencoder_loss(images, recon, step)
        (loss + vq_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({k: float(v) for k, v in {**logs, **vq_logs}.items()})
    return history


# The floor: after 100 steps of 4 images, at least half of the 64 codes are in use on held-out images.
USAGE_FLOOR = 0.5


@pytest.mark.parametrize("ema_decay", [0.9, 0.0], ids=["ema-codebook", "codebook-loss"])
def test_a_short_run_raises_codebook_usage_above_the_floor(ema_decay):
    batches, held_out = smooth_batches(100), smooth_batches(1, batch=8, seed=99)[0]
    vae = tiny_vq()
    model = VQAutoencoding(vae, ema_decay=ema_decay, restart_after=10, usage_window=10)
    before = usage_on(vae, held_out)
    history = train(model, batches)
    assert before < 0.25  # the tiny initial codebook: most latents fall on a handful of codes
    assert usage_on(vae, held_out) >= USAGE_FLOOR
    assert history[-1]["codebook_usage"] >= USAGE_FLOOR  # the logged window usage agrees
    assert sum(h["codes_restarted"] for h in history) > 0
    first, last = (sum(h["rec_loss"] for h in part) / 10 for part in (history[:10], history[-10:]))
    assert last < first


def test_without_restarts_an_ema_codebook_stays_collapsed():
    """The contrast to the run above: the same EMA codebook and data, no dead-code restarts."""
    batches, held_out = smooth_batches(100), smooth_batches(1, batch=8, seed=99)[0]
    vae = tiny_vq()
    history = train(VQAutoencoding(vae, ema_decay=0.9, restart_after=0, usage_window=10), batches)
    assert usage_on(vae, held_out) < USAGE_FLOOR
    assert history[-1]["codebook_usage"] < USAGE_FLOOR


def test_ema_codebook_is_moved_by_its_statistics_not_by_the_optimizer():
    vae = tiny_vq()
    model = VQAutoencoding(vae, ema_decay=0.9, restart_after=5)
    codebook = vae.quantize.embedding.weight
    before = codebook.detach().clone()
    history = train(model, smooth_batches(8))
    assert codebook.grad is None and not codebook.requires_grad
    assert not torch.equal(codebook, before)
    assert all(h["codebook_loss"] > 0 for h in history)  # measured and logged, but not in the loss:
    assert history[-1]["vq_loss"] == pytest.approx(
        0.25 * 32 * 32 * 3 * history[-1]["commitment_loss"], rel=1e-5
    )


def test_quantiser_loss_keeps_the_balance_of_taming_vqlpips():
    """taming: loss = mean|x - x_hat| + codebook_weight * vq_loss (per-element means). AutoencoderLoss sums the NLL
    over C, H, W, so the whole VQ objective must be exactly C*H*W times taming's."""
    vae = tiny_vq()
    images = smooth_batches(1)[0]
    recon, vq_loss, logs, _ = VQAutoencoding(vae, codebook_weight=0.7).train()(images)
    loss_fn = AutoencoderLoss(perceptual_weight=0.0, disc_weight=0.0, recon_loss="l1")
    nll, _ = loss_fn.autoencoder_loss(images, recon, 0)
    # taming's vq_loss, from its parts: codebook + beta x commitment (the paper's weighting, beta 0.25)
    taming = (images - recon).abs().mean() + 0.7 * (logs["codebook_loss"] + 0.25 * logs["commitment_loss"])
    torch.testing.assert_close(nll + vq_loss, 3 * 32 * 32 * taming, rtol=1e-5, atol=0)


def test_the_gan_path_trains_through_the_quantiser():
    vae = tiny_vq()
    images = smooth_batches(1)[0]
    discriminator = NLayerDiscriminator(n_layers=1, ndf=8)
    loss_fn = AutoencoderLoss(perceptual_weight=0.0, disc_weight=0.75, disc_start=0)
    recon, vq_loss, _, _ = VQAutoencoding(vae).train()(images)
    loss, logs = loss_fn.autoencoder_loss(
        images, recon, 0, last_layer=vae.decoder.conv_out.weight, discriminator=discriminator
    )
    (loss + vq_loss).backward()
    assert torch.isfinite(logs["d_weight"]) and logs["d_weight"] > 0
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0  # the generator and NLL terms reach the encoder
    assert vae.quantize.embedding.weight.grad.abs().sum() > 0  # the codebook loss reaches the codebook
    d_loss, _ = loss_fn.discriminator_loss(images, recon, discriminator, 0)
    assert torch.isfinite(d_loss)


def test_decoder_only_keeps_the_codebook_fixed():
    vae = tiny_vq()
    with pytest.raises(ValueError, match="keeps the codebook fixed"):
        VQAutoencoding(vae, ema_decay=0.99, decoder_only=True)
    VQAutoencoding(vae, decoder_only=True)
    assert not vae.quantize.embedding.weight.requires_grad


def _accelerated_run(
    batches, checkpoint_dir, resume: bool, save_after: int | None
) -> dict[str, torch.Tensor]:
    """Steps through `batches` with Accelerate, the tracker registered for checkpointing as train.py does."""
    try:
        accelerator = Accelerator(cpu=True)
        vae = tiny_vq()
        model = VQAutoencoding(vae, ema_decay=0.8, restart_after=1).train()  # restarts draw random numbers
        (tracker,) = model.training_state()
        optimizer = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=1e-3)
        model, optimizer = accelerator.prepare(model, optimizer)
        accelerator.register_for_checkpointing(tracker)
        loss_fn = AutoencoderLoss(perceptual_weight=0.0, disc_weight=0.0)
        if resume:
            accelerator.load_state(str(checkpoint_dir))
        for step, images in enumerate(batches):
            recon, vq_loss, _, _ = model(images)
            loss, _ = loss_fn.autoencoder_loss(images, recon, step)
            accelerator.backward(loss + vq_loss)
            optimizer.step()
            optimizer.zero_grad()
            if step + 1 == save_after:
                accelerator.save_state(str(checkpoint_dir))
        state = {f"param.{k}": v.detach().clone() for k, v in vae.state_dict().items()}
        state.update({f"tracker.{k}": torch.as_tensor(v).clone() for k, v in tracker.state_dict().items()})
        return state
    finally:
        reset_accelerate()


def test_a_resumed_run_continues_the_codebook_state_exactly(tmp_path):
    batches = smooth_batches(4)
    straight = _accelerated_run(batches, tmp_path / "ckpt", resume=False, save_after=2)
    resumed = _accelerated_run(batches[2:], tmp_path / "ckpt", resume=True, save_after=None)
    assert straight["tracker.step"].item() == 4 and resumed.keys() == straight.keys()
    different = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not different, different
