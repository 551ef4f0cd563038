"""Losses, discriminator and pretrained-weight loading, against independent oracles (CPU, tiny sizes)."""

from __future__ import annotations

import os
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.distributions import Normal, kl_divergence

from latentvae.models.discriminator import NLayerDiscriminator, hinge_d_loss, vanilla_d_loss
from latentvae.models.distributions import DiagonalGaussianDistribution
from latentvae.pretrained import (
    FID_INCEPTION,
    LPIPS_BACKBONES,
    OFFLINE_ENV,
    MissingWeightsError,
    build_lpips,
    require_hub_weights,
    torch_hub_checkpoint_dir,
)
from latentvae.training.autoencoding import GaussianAutoencoding, gaussian_kl
from latentvae.training.losses import AutoencoderLoss, adaptive_gan_weight


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty $TORCH_HOME, offline (HF_HUB_OFFLINE=1), and a download function that records its calls and fails."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    calls = []

    def no_download(url, dst, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path, calls


@pytest.fixture(scope="module")
def random_lpips():
    return build_lpips("alex", random_backbone=True)


def tiny_autoencoder():
    from latentvae.models.autoencoder_kl import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
    )


def encode_decode(model, x):
    posterior = model.encode(x).latent_dist
    recon = model.decode(posterior.sample(torch.Generator().manual_seed(0))).sample
    return recon, posterior


def images(batch=2, size=32, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------- pretrained weights


def test_backbone_file_names_are_torchvisions():
    assert LPIPS_BACKBONES["vgg"].filename == "vgg16-397923af.pth"
    assert LPIPS_BACKBONES["alex"].filename == "alexnet-owt-7be5be79.pth"
    assert LPIPS_BACKBONES["squeeze"].filename == "squeezenet1_1-b8a52dc0.pth"
    assert FID_INCEPTION.filename == "pt_inception-2015-12-05-6726825d.pth"


def test_hub_dir_follows_torch_home(torch_home):
    tmp, _ = torch_home
    assert torch_hub_checkpoint_dir() == tmp / "hub" / "checkpoints"


@pytest.mark.parametrize("net", ["vgg", "alex", "squeeze"])
def test_missing_backbone_names_file_dir_and_alternative(torch_home, net):
    tmp, download_calls = torch_home
    with pytest.raises(MissingWeightsError) as info:
        build_lpips(net)
    message = str(info.value)
    directory = tmp / "hub" / "checkpoints"
    assert LPIPS_BACKBONES[net].filename in message
    assert str(directory) in message
    assert LPIPS_BACKBONES[net].url in message
    assert "--perceptual_weight 0" in message and "--no_lpips" in message
    assert info.value.directory == directory and info.value.filename == LPIPS_BACKBONES[net].filename
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, RuntimeError)
    assert download_calls == []  # it checked the file instead of trying the network


def test_fid_weights_error_names_file(torch_home):
    with pytest.raises(MissingWeightsError, match="pt_inception-2015-12-05-6726825d.pth.*\n.*\n.*--no_fid"):
        require_hub_weights(FID_INCEPTION, alternative="pass --no_fid")


def test_online_download_that_fails_is_a_missing_weights_error(torch_home, monkeypatch):
    _, download_calls = torch_home
    monkeypatch.delenv(OFFLINE_ENV)
    with pytest.raises(MissingWeightsError, match="download failed") as info:
        build_lpips("alex")
    assert download_calls == [LPIPS_BACKBONES["alex"].url]
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_backbone_in_hub_cache_is_loaded(torch_home):
    """A file under the expected name (not the real weights: torchvision checks hashes only on download) is used."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.alexnet().state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    # Constant tensors are saved as 1-element storages expanded to full shape: a 60M-parameter file of ~2 kB.
    state = {k: torch.full((1,) * len(s), float(i)).expand(s) for i, (k, s) in enumerate(shapes.items())}
    state["features.0.weight"] = torch.randn(shapes["features.0.weight"], generator=generator)
    directory = torch_hub_checkpoint_dir()
    directory.mkdir(parents=True)
    torch.save(state, directory / LPIPS_BACKBONES["alex"].filename)

    module = build_lpips("alex")
    torch.testing.assert_close(module.net.slice1[0].weight, state["features.0.weight"])
    torch.testing.assert_close(module.net.slice5[0].weight, state["features.10.weight"].contiguous())
    assert not module.training and not any(p.requires_grad for p in module.parameters())


def test_random_vgg_backbone_works_at_32px_without_files(torch_home):
    module = build_lpips("vgg", random_backbone=True)
    distance = module(images(seed=0), images(seed=1))
    assert distance.shape == (2, 1, 1, 1) and torch.isfinite(distance).all()


def test_unknown_lpips_net():
    with pytest.raises(ValueError, match="squeeze"):
        build_lpips("resnet", random_backbone=True)


def test_lpips_gradient_reaches_input_not_weights(random_lpips):
    recon = images(seed=1).requires_grad_()
    random_lpips(images(seed=0), recon).sum().backward()
    assert recon.grad.abs().sum() > 0 and torch.isfinite(recon.grad).all()
    assert all(p.grad is None for p in random_lpips.parameters())


# ---------------------------------------------------------------- discriminator


def test_patchgan_layout_matches_pix2pix():
    with torch.device("meta"):
        disc = NLayerDiscriminator()
        logits = disc(torch.empty(1, 3, 256, 256))
    # pix2pix's 70x70 PatchGAN: C64 - C128 - C256 - C512 (stride 1) - 1, BatchNorm after all but the first conv.
    expected = {
        "main.0.weight": (64, 3, 4, 4),
        "main.0.bias": (64,),
        "main.2.weight": (128, 64, 4, 4),
        "main.5.weight": (256, 128, 4, 4),
        "main.8.weight": (512, 256, 4, 4),
        "main.11.weight": (1, 512, 4, 4),
        "main.11.bias": (1,),
    }
    shapes = {k: tuple(v.shape) for k, v in disc.state_dict().items()}
    assert {k: shapes[k] for k in expected} == expected
    assert "main.2.bias" not in shapes and shapes["main.3.weight"] == (128,)  # BatchNorm replaces the bias
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633
    assert logits.shape == (1, 1, 30, 30)  # 256 px -> 30x30 patches


def test_patchgan_init():
    torch.manual_seed(0)
    disc = NLayerDiscriminator()
    conv, bn = disc.main[8].weight, disc.main[9]
    assert abs(conv.std().item() - 0.02) < 5e-4 and abs(conv.mean().item()) < 5e-4
    assert abs(bn.weight.mean().item() - 1.0) < 5e-3 and 0.01 < bn.weight.std().item() < 0.03
    assert torch.all(bn.bias == 0)


def test_batchnorm_couples_the_batch_and_none_does_not():
    x = images(batch=4)
    torch.manual_seed(0)
    plain = NLayerDiscriminator(ndf=8, n_layers=2, norm="none")
    torch.testing.assert_close(plain(x)[:1], plain(x[:1]))
    batch = NLayerDiscriminator(ndf=8, n_layers=2)
    assert not torch.allclose(batch(x)[:2], batch(x[:2]))


def test_hinge_loss_hand_computed():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = [0, 0.5, 2], relu(1 + fake) = [0, 1, 2.5]: 0.5 * (2.5 / 3 + 3.5 / 3) = 1
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(1.0))


def test_vanilla_loss_is_binary_cross_entropy():
    real, fake = torch.randn(2, 1, 5, 5), torch.randn(2, 1, 5, 5)
    bce = F.binary_cross_entropy_with_logits
    expected = 0.5 * (bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake)))
    torch.testing.assert_close(vanilla_d_loss(real, fake), expected)


# ---------------------------------------------------------------- autoencoder loss terms


def test_pixel_losses():
    x, recon = images(seed=0), images(seed=1)
    for name, oracle in (("mse", F.mse_loss), ("l1", F.l1_loss)):
        _, logs = AutoencoderLoss(perceptual_weight=0, recon_loss=name).autoencoder_loss(x, recon, 0)
        torch.testing.assert_close(logs["pixel_loss"], oracle(recon, x))
        torch.testing.assert_close(logs["nll_loss"], oracle(recon, x, reduction="sum") / 2)


def test_chroma_weight_scales_the_error_orthogonal_to_grey():
    x, recon = images(seed=0), images(seed=1)
    error = (x - recon).double().permute(0, 2, 3, 1).numpy()  # (..., RGB)
    to_grey = np.full((3, 3), 1 / 3)  # projection onto the grey axis (1, 1, 1)
    grey, chroma = error @ to_grey, error @ (np.eye(3) - to_grey)
    for weight in (1.0, 4.0):
        loss_fn = AutoencoderLoss(perceptual_weight=0, chroma_weight=weight)
        _, logs = loss_fn.autoencoder_loss(x, recon, 0)
        expected = ((grey**2).sum() + weight * (chroma**2).sum()) / error.size
        assert logs["pixel_loss"].item() == pytest.approx(expected, rel=1e-5)
    # A grey error costs the same at any weight; a chroma-only error costs `weight` times more.
    shift = torch.tensor([0.2, -0.1, -0.1]).view(1, 3, 1, 1)
    for delta, factor in ((torch.full_like(shift, 0.1), 1.0), (shift, 4.0)):
        plain = AutoencoderLoss(perceptual_weight=0).autoencoder_loss(x, x + delta, 0)[1]["pixel_loss"]
        heavy = AutoencoderLoss(perceptual_weight=0, chroma_weight=4.0).autoencoder_loss(x, x + delta, 0)[1]
        assert heavy["pixel_loss"].item() == pytest.approx(factor * plain.item(), rel=1e-5)
    with pytest.raises(ValueError, match="chroma_weight"):
        AutoencoderLoss(perceptual_weight=0, chroma_weight=0)


def test_kl_term_matches_torch_distributions():
    torch.manual_seed(0)
    mean, logvar = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    kl = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(gaussian_kl(posterior.parameters), kl)
    assert GaussianAutoencoding(nn.Identity()).kl_weight == 1e-6  # the SD kl-f8 weight by default


def test_the_gaussian_regulariser_returns_the_weighted_kl_and_a_sampled_reconstruction():
    model, x = tiny_autoencoder(), images()
    recon, reg_loss, logs, aux = GaussianAutoencoding(model, kl_weight=0.25)(
        x, torch.Generator().manual_seed(0)
    )
    assert aux == {}  # no latent-space regulariser asked for
    moments = model.encode(x).latent_dist.parameters
    mean, logvar = moments.chunk(2, dim=1)
    kl = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(logs["kl_loss"], kl.detach())
    torch.testing.assert_close(reg_loss, 0.25 * kl)
    expected, _ = encode_decode(model, x)  # z = mu + sigma * eps with the same generator seed
    torch.testing.assert_close(recon, expected)
    with pytest.raises(ValueError, match="kl_weight must be >= 0"):
        GaussianAutoencoding(model, kl_weight=-1.0)


def test_learned_logvar_nll_and_gradient():
    x, recon = images(seed=0), images(seed=1)
    loss_fn = AutoencoderLoss(perceptual_weight=0, learn_logvar=True)
    assert loss_fn.autoencoder_parameters() == [loss_fn.logvar]
    with torch.no_grad():
        loss_fn.logvar.fill_(0.7)
    loss, logs = loss_fn.autoencoder_loss(x, recon, 0)
    sse, n_elements = F.mse_loss(recon, x, reduction="sum") / 2, 3 * 32 * 32  # per image
    # nll = sum(rec) / exp(lv) + lv * CHW;  d nll / d lv = -sum(rec) / exp(lv) + CHW
    expected = sse * torch.exp(torch.tensor(-0.7)) + 0.7 * n_elements
    torch.testing.assert_close(logs["nll_loss"], expected)
    loss.backward()
    torch.testing.assert_close(loss_fn.logvar.grad, -sse * torch.exp(torch.tensor(-0.7)) + n_elements)
    optimizer = torch.optim.SGD(loss_fn.autoencoder_parameters(), lr=1e-4)
    optimizer.step()
    assert loss_fn.logvar.item() != pytest.approx(0.7)


def test_fixed_logvar_is_not_trained():
    loss_fn = AutoencoderLoss(perceptual_weight=0)
    assert loss_fn.autoencoder_parameters() == [] and not loss_fn.logvar.requires_grad


def test_perceptual_term_in_loss(random_lpips):
    x, recon = images(seed=0), images(seed=1)
    loss_fn = AutoencoderLoss(random_lpips, perceptual_weight=0.3)
    _, logs = loss_fn.autoencoder_loss(x, recon, 0)
    lp = random_lpips(x, recon).flatten()
    torch.testing.assert_close(logs["perceptual_loss"], lp.mean())
    torch.testing.assert_close(logs["rec_loss"], F.mse_loss(recon, x) + 0.3 * lp.mean())
    # the per-image distance counts once per pixel element, as in the CompVis loss
    torch.testing.assert_close(
        logs["nll_loss"], (F.mse_loss(recon, x, reduction="sum") + 0.3 * lp.sum() * 3072) / 2
    )


def test_perceptual_gradient_reaches_the_encoder(random_lpips):
    model, x = tiny_autoencoder(), images()
    recon, posterior = encode_decode(model, x)
    with_lpips, _ = AutoencoderLoss(random_lpips).autoencoder_loss(x, recon, 0)
    without, _ = AutoencoderLoss(perceptual_weight=0).autoencoder_loss(x, recon, 0)
    conv_in = model.encoder.conv_in.weight
    (grad,) = torch.autograd.grad(with_lpips - without, conv_in, retain_graph=True)
    (oracle,) = torch.autograd.grad(random_lpips(x, recon).sum() * 3072 / 2, conv_in)
    assert grad.abs().sum() > 0
    # the difference of two ~1e4 losses: fp32 cancellation allows ~1e-5 absolute error
    torch.testing.assert_close(grad, oracle, rtol=1e-3, atol=1e-3 * oracle.abs().max().item())


def test_lpips_stays_in_eval_mode_and_out_of_checkpoints(random_lpips):
    loss_fn = AutoencoderLoss(random_lpips, learn_logvar=True).train()
    assert loss_fn.training and not loss_fn.perceptual_loss.training
    with torch.no_grad():
        loss_fn.logvar.fill_(-1.5)
    assert list(loss_fn.state_dict()) == ["logvar"]
    restored = AutoencoderLoss(random_lpips, learn_logvar=True)
    restored.load_state_dict(loss_fn.state_dict(), strict=True)
    assert restored.logvar.item() == -1.5
    with pytest.raises(RuntimeError, match="logvar"):
        restored.load_state_dict({}, strict=True)


def test_bad_configuration():
    with pytest.raises(ValueError, match="perceptual_weight=0"):
        AutoencoderLoss(None, perceptual_weight=1.0)
    with pytest.raises(ValueError, match="recon_loss"):
        AutoencoderLoss(perceptual_weight=0, recon_loss="huber")


# ---------------------------------------------------------------- adversarial part


def test_adaptive_weight_is_ratio_of_gradient_norms():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 3, 3, padding=1))
    disc = NLayerDiscriminator(ndf=8, n_layers=2)
    x = images()
    recon = net(x)
    nll, g = (recon - x).pow(2).sum(), -disc(recon).mean()
    last = net[2].weight
    weight = adaptive_gan_weight(nll, g, last)
    assert last.grad is None  # computed without touching .grad

    nll.backward(retain_graph=True)
    nll_norm, last.grad = last.grad.norm(), None
    g.backward(retain_graph=True)
    g_norm = last.grad.norm()
    torch.testing.assert_close(weight, nll_norm / (g_norm + 1e-4))
    assert not weight.requires_grad
    assert adaptive_gan_weight(nll, g * 1e-12, last).item() == 1e4  # clamped
    assert adaptive_gan_weight(nll, g, last, max_weight=0.5).item() == 0.5


def test_autoencoder_loss_with_discriminator():
    torch.manual_seed(0)
    model, x = tiny_autoencoder(), images()
    disc = NLayerDiscriminator(ndf=8, n_layers=2)
    recon, _ = encode_decode(model, x)
    last = model.decoder.conv_out.weight
    loss_fn = AutoencoderLoss(perceptual_weight=0, disc_start=10, disc_weight=0.5, disc_factor=0.8)
    loss, logs = loss_fn.autoencoder_loss(x, recon, 10, last_layer=last, discriminator=disc)

    nll, g = F.mse_loss(recon, x, reduction="sum") / 2, -disc(recon).mean()
    nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g, last, retain_graph=True)[0]
    d_weight = 0.5 * nll_grad.norm() / (g_grad.norm() + 1e-4)
    torch.testing.assert_close(logs["d_weight"], d_weight)
    torch.testing.assert_close(logs["g_loss"], g)
    torch.testing.assert_close(loss, nll + d_weight * 0.8 * g)

    with torch.no_grad():  # validation: no adaptive weight, no GAN term
        recon_eval, _ = encode_decode(model, x)
        val_loss, val_logs = loss_fn.autoencoder_loss(x, recon_eval, 10, discriminator=disc)
    assert val_logs["d_weight"] == 0 and val_loss == val_logs["nll_loss"]
    with pytest.raises(ValueError, match="last_layer"):
        loss_fn.autoencoder_loss(x, recon, 10, discriminator=disc)
    with pytest.raises(ValueError, match="discriminator"):
        loss_fn.autoencoder_loss(x, recon, 10, last_layer=last)


def test_discriminator_loss_value():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(ndf=8, n_layers=2)
    x, recon = images(seed=0), images(seed=1).requires_grad_()
    loss, logs = AutoencoderLoss(perceptual_weight=0, disc_start=0, disc_factor=0.7).discriminator_loss(
        x, recon, disc, 0
    )
    real, fake = disc(x), disc(recon)
    torch.testing.assert_close(loss, 0.7 * hinge_d_loss(real, fake))
    torch.testing.assert_close(logs["logits_real"], real.mean())
    torch.testing.assert_close(logs["logits_fake"], fake.mean())


class RaisingDiscriminator(nn.Module):
    def forward(self, images):
        raise AssertionError("the discriminator was called")


def test_discriminator_not_run_before_disc_start():
    x, recon = images(seed=0), images(seed=1).requires_grad_()
    loss_fn = AutoencoderLoss(perceptual_weight=0, disc_start=5)
    disc = RaisingDiscriminator()
    loss, logs = loss_fn.autoencoder_loss(x, recon, 4, discriminator=disc)
    assert "g_loss" not in logs and "d_weight" not in logs
    d_loss, d_logs = loss_fn.discriminator_loss(x, recon, disc, 4)
    assert d_loss.item() == 0 and not d_loss.requires_grad and not loss_fn.discriminator_active(4)
    with pytest.raises(AssertionError, match="was called"):
        loss_fn.discriminator_loss(x, recon, disc, 5)  # active from disc_start on
    off = AutoencoderLoss(perceptual_weight=0, disc_start=0, disc_weight=0)
    off.autoencoder_loss(x, recon, 100, discriminator=disc)
    assert not off.discriminator_active(100)


def test_the_two_steps_do_not_touch_each_other():
    torch.manual_seed(0)
    model, x = tiny_autoencoder(), images()
    disc = NLayerDiscriminator(ndf=8, n_layers=2)
    loss_fn = AutoencoderLoss(perceptual_weight=0, disc_start=0, learn_logvar=True)
    opt_ae = torch.optim.SGD([*model.parameters(), *loss_fn.autoencoder_parameters()], lr=0.1)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.1)
    last = model.decoder.conv_out.weight

    # Discriminator step alone: the autoencoder gets no gradient at all.
    recon, posterior = encode_decode(model, x)
    loss_fn.discriminator_loss(x, recon, disc, 0)[0].backward()
    assert all(p.grad is None for p in model.parameters()) and loss_fn.logvar.grad is None
    assert all(p.grad is not None for p in disc.parameters())

    # Autoencoder step: the discriminator's weights do not move (it does receive gradients, which opt_d zeroes).
    disc_before = {k: v.clone() for k, v in disc.named_parameters()}
    opt_d.zero_grad(set_to_none=True)
    loss, _ = loss_fn.autoencoder_loss(x, recon, 0, last_layer=last, discriminator=disc)
    loss.backward()
    opt_ae.step()
    for name, value in disc.named_parameters():
        torch.testing.assert_close(value, disc_before[name], rtol=0, atol=0)
        assert value.requires_grad

    # Discriminator step after an autoencoder backward: the autoencoder's gradients are unchanged.
    ae_grads = {k: v.grad.clone() for k, v in model.named_parameters()}
    opt_d.zero_grad(set_to_none=True)
    loss_fn.discriminator_loss(x, recon, disc, 0)[0].backward()
    opt_d.step()
    for name, value in model.named_parameters():
        torch.testing.assert_close(value.grad, ae_grads[name], rtol=0, atol=0)


# ---------------------------------------------------------------- distributed


def _logvar_grad_worker(rank, world_size, init_file, x, recon, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    loss_fn = AutoencoderLoss(perceptual_weight=0, learn_logvar=True)
    with torch.no_grad():
        loss_fn.logvar.fill_(0.3)
    shard = slice(rank * 2, rank * 2 + 2)  # each process sees its own half of the batch
    loss_fn.autoencoder_loss(x[shard], recon[shard], 0)[0].backward()
    loss_fn.all_reduce_logvar_grad()
    torch.save(loss_fn.logvar.grad, os.path.join(out_dir, f"grad{rank}.pt"))
    dist.destroy_process_group()


def test_logvar_gradient_is_averaged_across_processes(tmp_path):
    x, recon = images(batch=4, size=16, seed=0), images(batch=4, size=16, seed=1)
    # fork, not spawn: the children need nothing re-imported, which saves ~15 s of diffusers imports
    torch.multiprocessing.start_processes(
        _logvar_grad_worker,
        args=(2, str(tmp_path / "init"), x, recon, str(tmp_path)),
        nprocs=2,
        start_method="fork",
    )
    single = AutoencoderLoss(perceptual_weight=0, learn_logvar=True)
    with torch.no_grad():
        single.logvar.fill_(0.3)
    single.autoencoder_loss(x, recon, 0)[0].backward()  # the whole batch in one process
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"grad{rank}.pt"), single.logvar.grad)
