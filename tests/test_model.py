"""latentvae.AutoencoderKL against the oracle diffusers.AutoencoderKL: same keys, same weights, same outputs."""

import diffusers
import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module

from latentvae import PRESETS, AutoencoderKL


def _config(block_out_channels, layers_per_block=1, latent_channels=4, norm_num_groups=4, **extra):
    levels = len(block_out_channels)
    return dict(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        **extra,
    )


CONFIGS = {
    "two-levels": _config((8, 16)),
    "sd-shape-small-width": _config((16, 32, 64, 64), layers_per_block=2, norm_num_groups=8, sample_size=32),
    "8-latents-no-quant-convs": _config(
        (8, 16, 16), layers_per_block=2, latent_channels=8, use_quant_conv=False, use_post_quant_conv=False
    ),
    "6-levels-no-mid-attention": _config(
        (4, 4, 8, 8, 8, 8),
        layers_per_block=3,
        latent_channels=16,
        mid_block_add_attention=False,
        act_fn="gelu",
    ),
}


def perturbed_pair(config: dict, seed: int = 0):
    """Our model with random, non-default weights (norm affines included), and diffusers' with the same weights."""
    torch.manual_seed(seed)
    ours = AutoencoderKL(**config)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ref = diffusers.AutoencoderKL(**config)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours.eval(), ref.eval()


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Max abs difference under 1e-5 for outputs of order 1 (real images are in [-1, 1]).

    Random perturbed weights give outputs of a few units; fp32 kernels (SDPA, GroupNorm) may sum in another order
    depending on memory layout, so the bound scales with the output magnitude.
    """
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=1e-5 * scale, rtol=0)


def images(batch: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_keys_and_shapes_match_diffusers(name):
    ours, ref = AutoencoderKL(**CONFIGS[name]), diffusers.AutoencoderKL(**CONFIGS[name])
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    ours.load_state_dict(ref.state_dict(), strict=True)  # both directions, strictly
    ref.load_state_dict(ours.state_dict(), strict=True)
    public = [k for k in ref.config if not k.startswith("_")]
    assert {k: ours.config[k] for k in public} == {k: ref.config[k] for k in public}


def test_constructor_defaults_match_diffusers():
    assert (
        dict(AutoencoderKL().config).items()
        >= {k: v for k, v in diffusers.AutoencoderKL().config.items() if not k.startswith("_")}.items()
    )


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_outputs_match_diffusers(name):
    ours, ref = perturbed_pair(CONFIGS[name])
    x = images()
    q_ours, q_ref = ours.encode(x).latent_dist, ref.encode(x).latent_dist
    for attr in ("mean", "logvar", "std", "var"):
        assert_same(getattr(q_ours, attr), getattr(q_ref, attr))
    torch.testing.assert_close(q_ours.kl(), q_ref.kl(), rtol=1e-5, atol=1e-4)
    z = q_ref.sample(generator=torch.Generator().manual_seed(3))
    assert_same(q_ours.sample(generator=torch.Generator().manual_seed(3)), z)
    assert_same(ours.decode(z).sample, ref.decode(z).sample)
    assert_same(ours(x).sample, ref(x).sample)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    sampled = ours(x, sample_posterior=True, generator=g1).sample
    assert_same(sampled, ref(x, sample_posterior=True, generator=g2).sample)


@torch.no_grad()
def test_return_dict_false_gives_tuples_like_diffusers():
    ours, ref = perturbed_pair(CONFIGS["two-levels"])
    x = images()
    (posterior,) = ours.encode(x, return_dict=False)
    (decoded,) = ours.decode(posterior.mode(), return_dict=False, generator=torch.Generator().manual_seed(0))
    (forwarded,) = ours(x, return_dict=False)
    assert_same(decoded, ref.decode(posterior.mode(), return_dict=False)[0])
    torch.testing.assert_close(forwarded, decoded, atol=0, rtol=0)


def test_encode_and_decode_trigger_offload_hooks():
    """`enable_model_cpu_offload` hooks `forward`; pipelines call encode/decode, so they must run the hook too."""

    class CountingHook(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            CountingHook.calls += 1
            return args, kwargs

    model = AutoencoderKL(**CONFIGS["two-levels"])
    add_hook_to_module(model, CountingHook())
    with torch.no_grad():
        posterior = model.encode(images(1, 16)).latent_dist
        model.decode(posterior.mode())
    assert CountingHook.calls == 2


def test_gradient_checkpointing_gives_same_gradients_and_is_used():
    config = CONFIGS["sd-shape-small-width"]
    x = images(1, 32)
    grads = []
    calls = []

    def checkpoint(module, *args):
        calls.append(type(module).__name__)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    for use_checkpointing in (False, True):
        model, _ = perturbed_pair(config)
        model.train()
        if use_checkpointing:
            model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
        model(x).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    assert "DownEncoderBlock" in calls and "UpDecoderBlock" in calls and "MidBlock" in calls


@torch.no_grad()
def test_slicing_matches_unsliced():
    model, _ = perturbed_pair(CONFIGS["two-levels"])
    x = images(3, 32)
    full_moments = model.encode(x).latent_dist.parameters
    full_images = model.decode(full_moments[:, :4]).sample
    model.enable_slicing()
    torch.testing.assert_close(model.encode(x).latent_dist.parameters, full_moments, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.decode(full_moments[:, :4]).sample, full_images, atol=1e-5, rtol=0)


def test_presets_build_the_documented_shapes():
    sd = AutoencoderKL.from_preset("sd-kl-f8")
    ref = diffusers.AutoencoderKL(**PRESETS["sd-kl-f8"])
    assert sd.state_dict().keys() == ref.state_dict().keys()
    # REFERENCES.md: 34.2 M encoder + 49.5 M decoder parameters.
    assert round(sum(p.numel() for p in sd.encoder.parameters()) / 1e6, 1) == 34.2
    assert round(sum(p.numel() for p in sd.decoder.parameters()) / 1e6, 1) == 49.5
    assert sd.downsampling_factor == 8 and sd.config.latent_channels == 4
    tiny = AutoencoderKL.from_preset("tiny-kl-f8", latent_channels=8)
    assert tiny.downsampling_factor == 8 and tiny.config.latent_channels == 8
    with pytest.raises(ValueError, match="unknown AutoencoderKL preset"):
        AutoencoderKL.from_preset("sd-kl-f9")


def test_bad_block_types_are_refused():
    with pytest.raises(ValueError, match="down_block_types"):
        AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",), norm_num_groups=4)


@torch.no_grad()
def test_to_diffusers_and_back_keep_weights_and_outputs():
    ours, _ = perturbed_pair(CONFIGS["two-levels"])
    stock = ours.to_diffusers()
    assert type(stock) is diffusers.AutoencoderKL
    x = images(1, 32)
    assert_same(stock(x).sample, ours(x).sample)
    back = AutoencoderKL.from_diffusers(stock)
    assert type(back) is AutoencoderKL
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_equals_nearest_upsampling_then_conv_in_values_and_gradients(channels_last):
    """The folded transposed convolution against its definition, `conv2d(interpolate(x, 2, nearest))`: outputs
    and the gradients of input, weight and bias, at odd sizes (borders of both phases)."""
    from latentvae.models.blocks import Upsample

    torch.manual_seed(0)
    upsample = Upsample(6)
    x = torch.randn(2, 6, 5, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_ref = x.detach().clone().requires_grad_(True)
    x = x.requires_grad_(True)
    grad_out = torch.randn(2, 6, 10, 14)

    out = upsample(x)
    out.backward(grad_out)
    grads = [x.grad, upsample.conv.weight.grad, upsample.conv.bias.grad]
    upsample.zero_grad()
    expected = upsample.conv(torch.nn.functional.interpolate(x_ref, scale_factor=2.0, mode="nearest"))
    expected.backward(grad_out)
    expected_grads = [x_ref.grad, upsample.conv.weight.grad, upsample.conv.bias.grad]

    assert out.shape == expected.shape == (2, 6, 10, 14)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-4, rtol=1e-5)


def test_upsample_lets_a_hook_on_its_conv_run():
    """accelerate's hooks (sequential CPU offload) sit on the conv module: the upsampler then calls it, and the output
    is the same function."""
    from latentvae.models.blocks import Upsample

    class Counting(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(1)
            return args, kwargs

    torch.manual_seed(0)
    upsample, calls = Upsample(4).eval(), []
    x = torch.randn(1, 4, 5, 6)
    with torch.no_grad():
        folded = upsample(x)
        add_hook_to_module(upsample.conv, Counting())
        hooked = upsample(x)
    assert calls == [1]
    torch.testing.assert_close(hooked, folded, atol=1e-5, rtol=1e-5)
