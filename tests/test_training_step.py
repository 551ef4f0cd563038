"""One training step (`latentvae.training.step`) and position-seeded randomness (`latentvae.data.seeding`): what flows
where, against hand-computed gradients and the optimizers' observable effects (CPU, tiny sizes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from train_helpers import assert_identical, reset_accelerate, snapshot

RESOLUTION = 32


@pytest.fixture(autouse=True)
def clean_accelerate_state():
    yield
    reset_accelerate()


def tiny_train_step(
    accumulation: int = 1, perceptual: nn.Module | None = None, gan: bool = True, sgd_lr: float | None = None
):
    """A `TrainStep` as train.py builds it (prepared by a one-process Accelerator), on a tiny f2 autoencoder; with
    `sgd_lr`, the autoencoder's optimizer is plain SGD (an update that is exactly -lr x the gradient)."""
    from accelerate import Accelerator

    from latentvae.models.autoencoder_kl import AutoencoderKL
    from latentvae.models.discriminator import NLayerDiscriminator
    from latentvae.training.autoencoding import GaussianAutoencoding
    from latentvae.training.losses import AutoencoderLoss
    from latentvae.training.step import TrainStep

    accelerator = Accelerator(gradient_accumulation_steps=accumulation, cpu=True)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=RESOLUTION,
    )
    loss_fn = AutoencoderLoss(
        perceptual_loss=perceptual,
        perceptual_weight=1.0 if perceptual else 0.0,
        disc_start=0,
        disc_weight=0.5 if gan else 0.0,
    )
    model = GaussianAutoencoding(vae)
    if sgd_lr is None:
        optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    else:
        optimizer = torch.optim.SGD(vae.parameters(), lr=sgd_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    parts = [None, None, None]
    if gan:
        critic = NLayerDiscriminator(ndf=8, n_layers=2)
        critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=1e-3)
        critic_scheduler = torch.optim.lr_scheduler.LambdaLR(critic_optimizer, lambda _: 1.0)
        parts = list(accelerator.prepare(critic, critic_optimizer, critic_scheduler))
    return TrainStep(accelerator, model, loss_fn, optimizer, scheduler, 0.0, *parts)


def batch(seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_lpips_gradient_reaches_the_encoder():
    from latentvae.pretrained import build_lpips

    lpips = build_lpips("vgg", random_backbone=True)
    encoder_grads = []
    for perceptual in (lpips, None):
        step = tiny_train_step(perceptual=perceptual, gan=False)
        weight = step.vae.encoder.conv_in.weight
        weight.register_post_accumulate_grad_hook(lambda p: encoder_grads.append(p.grad.clone()))
        step.autoencoder_step(batch(), 0, torch.Generator().manual_seed(1))
        reset_accelerate()
    with_lpips, without = encoder_grads

    # Oracle: the gradient of the LPIPS term alone, by hand: rec = pixel + LPIPS broadcast over (C, H, W), summed
    # over (C, H, W) and averaged over the batch -> C * H * W * mean_b LPIPS_b.
    step = tiny_train_step(gan=False)
    recon, _, _, _ = step.model(batch(), generator=torch.Generator().manual_seed(1))
    lpips_term = lpips(batch(), recon).mean() * recon[0].numel()
    (expected,) = torch.autograd.grad(lpips_term, step.vae.encoder.conv_in.weight)
    assert expected.abs().max() > 0
    torch.testing.assert_close(
        with_lpips - without, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item()
    )


def test_autoencoder_step_leaves_the_discriminator_alone():
    step = tiny_train_step()
    critic = step.accelerator.unwrap_model(step.discriminator)
    critic_before, decoder_before = snapshot(critic), snapshot(step.vae.decoder)
    _, logs = step.autoencoder_step(batch(), 0, torch.Generator().manual_seed(1))
    assert "g_loss" in logs and logs["d_weight"] > 0  # the generator loss ran through the discriminator
    assert all(p.grad is None and p.requires_grad for p in critic.parameters())
    assert_identical(snapshot(critic), critic_before)
    assert not torch.equal(snapshot(step.vae.decoder)["conv_out.weight"], decoder_before["conv_out.weight"])


def test_discriminator_step_leaves_autoencoder_gradients_untouched():
    step = tiny_train_step()
    critic = step.accelerator.unwrap_model(step.discriminator)
    recon, _, _, _ = step.model(batch(), generator=torch.Generator().manual_seed(1))  # with its graph
    grads = {name: torch.randn_like(p) for name, p in step.vae.named_parameters()}
    for name, p in step.vae.named_parameters():
        p.grad = grads[name].clone()
    critic_before = snapshot(critic)
    logs = step.discriminator_step(batch(), recon, 0)
    assert logs["disc_loss"] > 0
    assert_identical({name: p.grad for name, p in step.vae.named_parameters()}, grads)
    assert not torch.equal(snapshot(critic)["main.0.weight"], critic_before["main.0.weight"])


def test_accumulation_steps_both_optimizers_once_per_two_batches():
    import copy

    from latentvae.training.autoencoding import GaussianAutoencoding

    lr = 0.05
    step = tiny_train_step(accumulation=2, sgd_lr=lr)
    critic = step.accelerator.unwrap_model(step.discriminator)
    vae_before, critic_before = snapshot(step.vae), snapshot(critic)
    vae_copy, critic_copy = copy.deepcopy(step.vae), copy.deepcopy(critic)
    step(batch(0), 0, torch.Generator().manual_seed(1))
    assert not step.accelerator.sync_gradients
    assert_identical(snapshot(step.vae), vae_before)
    assert_identical(snapshot(critic), critic_before)
    step(batch(1), 0, torch.Generator().manual_seed(2))
    assert step.accelerator.sync_gradients
    assert not torch.equal(snapshot(critic)["main.0.weight"], critic_before["main.0.weight"])

    # Oracle: one SGD step on the mean of the two micro-batches' gradients (same weights, noise and critic),
    # computed without Accelerate. Summing instead of averaging, or stepping on one batch, would miss it.
    model, grads = GaussianAutoencoding(vae_copy), []
    for images, seed in ((batch(0), 1), (batch(1), 2)):
        recon, kl_loss, _, _ = model(images, torch.Generator().manual_seed(seed))
        loss, _ = step.loss_fn.autoencoder_loss(
            images, recon, 0, last_layer=vae_copy.decoder.conv_out.weight, discriminator=critic_copy
        )
        grads.append(torch.autograd.grad(loss + kl_loss, list(vae_copy.parameters())))
    expected = {
        name: before - lr * (g0 + g1) / 2 for (name, before), g0, g1 in zip(vae_before.items(), *grads)
    }
    after = snapshot(step.vae)
    assert after.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(after[name], expected[name], rtol=1e-4, atol=1e-6)


class RandomDraws(torch.utils.data.Dataset):
    """Item i: (i, a number from torch's global RNG), as a random crop would draw it."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> tuple[int, float]:
        return index, torch.rand(()).item()


def test_epoch_seeded_draws_do_not_depend_on_order_or_workers_and_change_each_epoch():
    from torch.utils.data import DataLoader

    from latentvae.data.seeding import EpochSeededDataset

    def draws(num_workers: int, reverse: bool) -> list[dict[int, float]]:
        dataset = EpochSeededDataset(RandomDraws(), seed=3)
        order = list(range(6))[::-1] if reverse else list(range(6))
        loader = DataLoader(
            dataset,
            sampler=order,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )
        epochs = []
        for epoch in range(2):
            dataset.set_epoch(epoch)  # persistent workers must see it too
            epochs.append(dict(loader))
        return epochs

    expected = draws(0, reverse=False)
    assert draws(2, reverse=True) == expected
    assert all(expected[0][i] != expected[1][i] for i in range(6))

    # The global RNG does not see the draws.
    dataset = EpochSeededDataset(RandomDraws(), seed=3)
    torch.manual_seed(0)
    dataset[0]
    after = torch.rand(())
    torch.manual_seed(0)
    assert torch.equal(torch.rand(()), after)


# -- non-finite losses and gradients --------------------------------------------------------------------------------


def optimizer_tensors(step) -> dict[str, torch.Tensor]:
    """Every tensor of both optimizers' states (Adam moments and step counts)."""
    from train_helpers import tensors_in

    found = tensors_in(step.optimizer.state_dict()["state"], "ae")
    if step.disc_optimizer is not None:
        found.update(tensors_in(step.disc_optimizer.state_dict()["state"], "d"))
    return found


def state_of(step) -> dict[str, torch.Tensor]:
    critic = (
        step.accelerator.unwrap_model(step.discriminator) if step.discriminator is not None else nn.Identity()
    )
    return {
        **{f"vae.{k}": v for k, v in snapshot(step.vae).items()},
        **{f"critic.{k}": v for k, v in snapshot(critic).items()},
        **{k: v.clone() for k, v in optimizer_tensors(step).items()},
    }


def nan_batch(seed: int = 0) -> torch.Tensor:
    images = batch(seed)
    images[0, :, :4, :4] = float("nan")  # a few NaN pixels in one image, as a corrupt decode might give
    return images


def test_nonfinite_loss_skips_both_updates_and_the_next_batch_trains():
    step = tiny_train_step()
    step(batch(0), 0, torch.Generator().manual_seed(1))  # a good step first, so Adam has state to protect
    assert step.skipped == [] and step.updated
    before, lr_steps = state_of(step), step.scheduler.scheduler.last_epoch
    logs = step(nan_batch(1), 1, torch.Generator().manual_seed(2))
    assert not torch.isfinite(logs["loss"])
    assert step.skipped == ["autoencoder", "discriminator"] and not step.updated
    assert_identical(state_of(step), before)  # weights and optimizer moments / step counts untouched
    assert step.scheduler.scheduler.last_epoch == lr_steps
    assert all(p.grad is None for p in step.params)  # the NaN gradients were dropped, not left to accumulate
    step(batch(2), 2, torch.Generator().manual_seed(3))
    assert step.skipped == [] and step.updated
    after = state_of(step)
    assert not torch.equal(after["vae.decoder.conv_out.weight"], before["vae.decoder.conv_out.weight"])
    assert not torch.equal(after["critic.main.0.weight"], before["critic.main.0.weight"])


def test_infinite_gradient_with_a_finite_loss_is_skipped():
    step = tiny_train_step(gan=False)
    step(batch(0), 0, torch.Generator().manual_seed(1))
    before = state_of(step)
    weight = step.vae.decoder.conv_out.weight
    handle = weight.register_hook(lambda grad: grad * float("inf"))
    logs = step(batch(1), 1, torch.Generator().manual_seed(2))
    handle.remove()
    assert torch.isfinite(logs["loss"]) and step.skipped == ["autoencoder"]
    assert_identical(state_of(step), before)


def test_a_nonfinite_micro_batch_skips_the_whole_accumulated_step():
    step = tiny_train_step(accumulation=2)
    before = state_of(step)
    step(nan_batch(0), 0, torch.Generator().manual_seed(1))  # micro-batch 1: NaN, nothing stepped yet
    step(batch(1), 0, torch.Generator().manual_seed(2))  # micro-batch 2: finite, but the sum is not
    assert step.accelerator.sync_gradients and step.skipped == ["autoencoder", "discriminator"]
    assert_identical(state_of(step), before)
    step(batch(2), 1, torch.Generator().manual_seed(3))
    step(batch(3), 1, torch.Generator().manual_seed(4))
    assert step.skipped == [] and step.updated  # the NaN was not carried into the next window


def test_nonfinite_discriminator_gradient_skips_only_its_update():
    step = tiny_train_step()
    step(batch(0), 0, torch.Generator().manual_seed(1))
    before = state_of(step)
    critic = step.accelerator.unwrap_model(step.discriminator)
    handle = critic.main[0].weight.register_hook(lambda grad: grad * float("nan"))
    step(batch(1), 1, torch.Generator().manual_seed(2))
    handle.remove()
    assert step.skipped == ["discriminator"] and step.updated
    after = state_of(step)
    assert torch.equal(after["critic.main.0.weight"], before["critic.main.0.weight"])
    assert not torch.equal(after["vae.decoder.conv_out.weight"], before["vae.decoder.conv_out.weight"])


def test_guard_warns_with_the_files_and_stops_after_too_many_in_a_row(tmp_path, caplog):
    from latentvae.training.step import NonFiniteGuard, NonFiniteTrainingError

    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "training_state.json").write_text('{"global_step": 4}')
    guard = NonFiniteGuard(2, tmp_path)
    with caplog.at_level("WARNING"):
        guard.update(5, ["autoencoder"], ["a.png", "b.png"])
        guard.update(6, [], ["c.png"])  # a good step resets the count
        guard.update(7, ["autoencoder"], ["d.png"])
        guard.update(8, ["autoencoder", "discriminator"], ["e.png"])
    assert "step 5" in caplog.text and "a.png, b.png" in caplog.text and "c.png" not in caplog.text
    with pytest.raises(NonFiniteTrainingError, match=r"3 steps in a row.*step 9.*checkpoint-4"):
        guard.update(9, ["autoencoder"], ["f.png"])
