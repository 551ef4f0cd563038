"""The VF alignment loss and its frozen DINOv2 features. Oracles: transformers' Dinov2Model called by hand, the
loss written out as numpy loops, two separate backward passes, the Hugging Face cache layout and the socket layer
(no test may open a connection). Every model is a randomly initialised tiny DINOv2."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from latentvae.training.alignment import (
    FoundationFeatures,
    LatentProjection,
    MissingAlignModelError,
    adaptive_align_weight,
    build_alignment,
    load_align_model,
    vf_loss,
)

try:  # huggingface_hub >= 2: it asks the Hub for an agent-harness registry, once per process
    from huggingface_hub.utils import _detect_agent
except ImportError:
    _detect_agent = None

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    patch_size=14,
    image_size=56,
)


def tiny_dinov2(seed: int = 0) -> Dinov2Model:
    torch.manual_seed(seed)
    return Dinov2Model(Dinov2Config(**TINY)).eval()


def hand_features(model: nn.Module, images: torch.Tensor, size: tuple[int, int], prefix: int) -> torch.Tensor:
    """Resize, then normalise (the other order from the module's: both are linear per channel), run the model,
    and place token 1 + r * w + c at grid position (r, c)."""
    x = F.interpolate((images + 1) / 2, size=size, mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = model(pixel_values=(x - mean) / std).last_hidden_state
    h, w = size[0] // 14, size[1] // 14
    out = torch.empty(images.shape[0], tokens.shape[-1], h, w)
    for r in range(h):
        for c in range(w):
            out[:, :, r, c] = tokens[:, prefix + r * w + c]
    return out


@pytest.fixture
def no_sockets(monkeypatch):
    """Every name lookup and connection attempt is recorded and refused; the test asserts the record is empty."""
    attempts = []

    def refuse(what):
        def call(*args, **kwargs):
            attempts.append((what, args))
            raise OSError(f"test: no network ({what} {args})")

        return call

    # huggingface_hub fetches its agent-harness registry once per process (for its request headers, even for
    # cache-only loads): forget it, so that every test would see that fetch.
    if _detect_agent is not None:
        monkeypatch.setattr(_detect_agent, "_registry", None)
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    return attempts


# ---- FoundationFeatures ----


def test_features_match_dinov2_called_by_hand():
    model = tiny_dinov2()
    features = FoundationFeatures(model, resolution=56)
    images = torch.rand(2, 3, 64, 96) * 2 - 1
    # short side 64 -> 56 = 4 patches; long side 96 * 56 / 64 = 84 = 6 patches
    out = features(images)
    assert out.shape == (2, 32, 4, 6) and out.dtype == torch.float32
    torch.testing.assert_close(out, hand_features(model, images, (56, 84), prefix=1), atol=1e-5, rtol=1e-4)


def test_features_round_sides_to_patch_multiples():
    features = FoundationFeatures(tiny_dinov2(), resolution=60)
    # 60 / 14 = 4.3 -> 4 patches; 100 * 60 / 50 = 120 -> 120 / 14 = 8.6 -> 9 patches
    assert features.resized_size(50, 100) == (56, 126)
    assert features(torch.zeros(1, 3, 50, 100)).shape == (1, 32, 4, 9)


@pytest.mark.skipif(not hasattr(transformers, "Dinov2WithRegistersModel"), reason="transformers too old")
def test_features_drop_register_tokens():
    torch.manual_seed(0)
    config = transformers.Dinov2WithRegistersConfig(**TINY, num_register_tokens=4)
    model = transformers.Dinov2WithRegistersModel(config).eval()
    images = torch.rand(1, 3, 56, 56) * 2 - 1
    out = FoundationFeatures(model, resolution=56)(images)
    torch.testing.assert_close(out, hand_features(model, images, (56, 56), prefix=5), atol=1e-5, rtol=1e-4)


def test_features_stay_frozen_and_out_of_checkpoints():
    parent = nn.Module()
    parent.features, parent.align_projection = build_alignment(
        "unused", 4, resolution=56, model=tiny_dinov2()
    )
    parent.train()
    assert not parent.features.model.training
    assert not any(p.requires_grad for p in parent.features.parameters())
    state = parent.state_dict()
    assert sorted(state) == ["align_projection.proj.weight"]  # no bias, as VA-VAE's

    # Strict loading of that checkpoint into a fresh parent: its own DINOv2 weights stay as they were.
    fresh = nn.Module()
    fresh.features, fresh.align_projection = build_alignment("unused", 4, resolution=56, model=tiny_dinov2(1))
    before = {k: v.clone() for k, v in fresh.features.model.state_dict().items()}
    fresh.load_state_dict(state, strict=True)
    torch.testing.assert_close(fresh.align_projection.proj.weight, parent.align_projection.proj.weight)
    for key, value in fresh.features.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_alignment_gradient_reaches_projection_only():
    features, projection = build_alignment("unused", 4, resolution=56, model=tiny_dinov2())
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    latent = torch.randn(2, 4, 8, 8, requires_grad=True)  # an f8 latent: the 4x4 features are upsampled
    loss, _ = vf_loss(projection(latent), features(images), cos_margin=0.0, distmat_margin=0.0)
    loss.backward()
    assert latent.grad.abs().sum() > 0 and projection.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in features.parameters())


# ---- vf_loss ----


def numpy_vf_loss(z, f, cos_margin, distmat_margin, cos_weight, distmat_weight):
    """The loss by loops: z, f (B, D, h, w) float64 arrays."""
    b, d, h, w = z.shape
    zs, fs = z.reshape(b, d, h * w), f.reshape(b, d, h * w)

    def cos(u, v):
        return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))

    cos_terms, mcos_terms, mdms_terms = [], [], []
    for k in range(b):
        for i in range(h * w):
            c = cos(zs[k, :, i], fs[k, :, i])
            cos_terms.append(c)
            mcos_terms.append(max(0.0, 1 - cos_margin - c))
            for j in range(h * w):
                diff = abs(cos(zs[k, :, i], zs[k, :, j]) - cos(fs[k, :, i], fs[k, :, j]))
                mdms_terms.append(max(0.0, diff - distmat_margin))
    mcos, mdms = np.mean(mcos_terms), np.mean(mdms_terms)
    return distmat_weight * mdms + cos_weight * mcos, np.mean(cos_terms), mcos, mdms


@pytest.mark.parametrize(
    "margins", [dict(cos_margin=0.0, distmat_margin=0.0), dict(cos_margin=0.5, distmat_margin=0.25)]
)
def test_vf_loss_matches_loops(margins):
    torch.manual_seed(0)
    z, f = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    weights = dict(cos_weight=0.7, distmat_weight=1.3)
    loss, logs = vf_loss(z, f, **margins, **weights)
    expected = numpy_vf_loss(z.double().numpy(), f.double().numpy(), **margins, **weights)
    assert expected[2] > 0 and expected[3] > 0  # both terms are active, so both are tested
    for got, want in zip((loss, logs["align_cos"], logs["align_mcos"], logs["align_mdms"]), expected):
        assert math.isclose(got.item(), want, rel_tol=1e-5, abs_tol=1e-6)


def test_vf_loss_resizes_features_bilinearly():
    torch.manual_seed(0)
    z, coarse = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)
    fine = F.interpolate(coarse, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(vf_loss(z, coarse)[0], vf_loss(z, fine)[0])


def test_vf_loss_is_zero_with_zero_gradient_inside_the_margins():
    torch.manual_seed(0)
    f = torch.randn(2, 3, 2, 2)
    z = (f + 0.01 * torch.randn_like(f)).requires_grad_(True)
    _, cosine, mcos, mdms = numpy_vf_loss(z.detach().double().numpy(), f.double().numpy(), 0.5, 0.25, 1, 1)
    assert mcos == 0 and mdms == 0  # every cosine above 0.5, every similarity difference below 0.25
    loss, _ = vf_loss(z, f, cos_margin=0.5, distmat_margin=0.25)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_vf_loss_has_gradient_outside_the_margins():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 2, 2, requires_grad=True)
    loss, _ = vf_loss(z, torch.randn(2, 3, 2, 2), cos_margin=0.0, distmat_margin=0.0)
    loss.backward()
    assert loss.item() > 0 and z.grad.abs().sum() > 0


# ---- adaptive_align_weight ----


def tiny_encoder_losses(net: nn.Sequential, x: torch.Tensor, target: torch.Tensor):
    z = net(x)
    rec = (z - target).pow(2).sum()
    align = (z.flatten(1) @ torch.ones(z[0].numel())).tanh().mean()
    return rec, align


def test_adaptive_align_weight_is_the_ratio_of_separate_backwards():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 2, 3, padding=1))
    last = net[2].weight
    x, target = torch.randn(2, 3, 6, 6), torch.randn(2, 2, 6, 6)

    grads = []
    for index in range(2):
        net.zero_grad(set_to_none=True)
        tiny_encoder_losses(net, x, target)[index].backward()
        grads.append(last.grad.clone())
    expected = grads[0].norm() / (grads[1].norm() + 1e-4)
    net.zero_grad(set_to_none=True)

    rec, align = tiny_encoder_losses(net, x, target)
    weight = adaptive_align_weight(rec, align, last)
    torch.testing.assert_close(weight, expected)
    assert not weight.requires_grad
    assert all(p.grad is None for p in net.parameters())
    assert adaptive_align_weight(rec, align, last, max_weight=expected.item() / 2) == expected.item() / 2
    (rec + weight * align).backward()  # both graphs are still there


# ---- load_align_model ----


@pytest.mark.parametrize("offline", [True, False])  # False: HF_HUB_OFFLINE=1 in the environment says offline
def test_missing_model_offline_names_it_and_stays_off_the_network(tmp_path, monkeypatch, no_sockets, offline):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf" / "hub"
    with pytest.raises(MissingAlignModelError) as caught:
        load_align_model("dinov2-small", offline=offline, cache_dir=cache)
    message = str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    assert "facebook/dinov2-small" in message and str(cache) in message
    assert "hf download facebook/dinov2-small" in message and "leave out --align_model" in message
    assert "(offline: HF_HUB_OFFLINE=1 or --offline)" in message
    assert no_sockets == []


@pytest.mark.parametrize("offline", [True, False])  # a folder never needs the network
def test_loads_a_saved_folder_without_the_network(tmp_path, no_sockets, offline):
    model = tiny_dinov2()
    model.save_pretrained(tmp_path / "dino")
    loaded = load_align_model(str(tmp_path / "dino"), offline=offline)
    assert isinstance(loaded, Dinov2Model) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert no_sockets == []


def test_loads_a_short_name_from_the_hub_cache_offline(tmp_path, no_sockets):
    # The cache layout huggingface_hub writes: models--{org}--{name}/snapshots/{commit}/ and refs/main -> commit.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--facebook--dinov2-small"
    model = tiny_dinov2()
    model.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = load_align_model("dinov2-small", offline=True, cache_dir=tmp_path / "hub")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert no_sockets == []


def test_projection_is_a_named_1x1_conv():
    projection = LatentProjection(4, 32, bias=True)
    assert sorted(projection.state_dict()) == ["proj.bias", "proj.weight"]
    z = torch.randn(2, 4, 3, 5)
    torch.testing.assert_close(
        projection(z),
        torch.einsum("dc,bchw->bdhw", projection.proj.weight[:, :, 0, 0], z)
        + projection.proj.bias.view(1, -1, 1, 1),
    )
