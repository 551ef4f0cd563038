"""The fast inference path: fp32 GroupNorm statistics, bf16 close to fp32, fp32 in and out; fp16 safety checks."""

import diffusers
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import latentvae.models.inference as inference
from latentvae import AutoencoderKL
from latentvae.models.groupnorm_stats import Fp32StatsGroupNorm, use_fp32_statistics
from latentvae.models.inference import FP16_MAX, check_fp16, optimize_for_inference


def perturbed_model(seed: int = 0, **overrides) -> AutoencoderKL:
    """A tiny model with random, non-default weights (norm affines included)."""
    torch.manual_seed(seed)
    model = AutoencoderKL.from_preset("tiny-kl-f8", **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def images(batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fp32_statistics_group_norm_is_exact_to_output_rounding(layout):
    """Groups whose mean is 250x their spread: oracle float64 GroupNorm with the same (bf16) weights; the bf16 output
    may differ from it by its own rounding only (at most one bf16 ulp, 2^-8 relative)."""
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
        norm.bias.normal_(0, 0.2)
    x = (torch.randn(2, 16, 24, 20) * 4 + 1000).to(torch.bfloat16).to(memory_format=layout)
    use_fp32_statistics(norm)
    assert isinstance(norm, Fp32StatsGroupNorm)
    nn.Module.to(norm, torch.bfloat16)
    expected = F.group_norm(x.double(), 4, norm.weight.double(), norm.bias.double(), 1e-6)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    bound = expected.abs() * 2**-8 + 1e-4
    assert torch.all((out.double() - expected).abs() <= bound)


def test_fp32_statistics_keep_parameters_and_state_dict_keys():
    model = perturbed_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_fp32_statistics(model) == sum(isinstance(m, nn.GroupNorm) for m in model.modules()) > 0
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    x = images(1, 32)
    with torch.no_grad():
        reference = perturbed_model()(x).sample
        torch.testing.assert_close(model(x).sample, reference, rtol=1e-4, atol=1e-4)  # fp32: same function


@torch.no_grad()
def test_fast_path_accepts_fp32_and_stays_close_to_fp32():
    """Stated tolerance: relative L2 error of the bf16 fast path against the fp32 model below 3 % for the decoded
    images and the posterior mean (bf16 keeps 8 significant bits, ~0.4 % per rounding, over ~30 layers)."""
    reference = perturbed_model()
    fast = optimize_for_inference(perturbed_model(), dtype="bf16")
    assert fast.dtype == torch.bfloat16 and fast.inference_settings.channels_last
    x = images()
    q_ref, q_fast = (
        reference.encode(x).latent_dist,
        fast.encode(x).latent_dist,
    )  # fp32 input, no cast by the caller
    assert q_fast.mean.dtype == q_fast.std.dtype == torch.float32  # the posterior's exp runs in fp32
    torch.testing.assert_close(q_fast.std, torch.exp(0.5 * q_fast.logvar))
    assert relative_error(q_fast.mean, q_ref.mean) < 0.03
    decoded = fast.decode(q_ref.mean).sample
    assert decoded.dtype == torch.float32 and decoded.is_contiguous()
    assert relative_error(decoded, reference.decode(q_ref.mean).sample) < 0.03
    torch.testing.assert_close(fast(x).sample, fast.decode(q_fast.mean).sample)


@torch.no_grad()
def test_fast_path_on_diffusers_model_and_converting_twice():
    ours = perturbed_model()
    theirs = diffusers.AutoencoderKL.from_config(ours.config)
    theirs.load_state_dict(ours.state_dict())
    z = torch.randn(1, 4, 8, 8)
    reference = ours.decode(z).sample
    fast_theirs = optimize_for_inference(theirs.eval(), dtype="bf16")
    first = fast_theirs.decode(z).sample
    assert first.dtype == torch.float32 and relative_error(first, reference) < 0.03
    optimize_for_inference(fast_theirs, dtype="bf16", channels_last=False)  # hooks replaced, not stacked
    torch.testing.assert_close(fast_theirs.decode(z).sample, first, rtol=0.02, atol=0.02)
    with pytest.raises(ValueError, match="dtype"):
        optimize_for_inference(ours, dtype="int8")


@torch.no_grad()
def test_fast_path_tiles_like_the_fp32_model():
    reference, fast = (
        perturbed_model(sample_size=64),
        optimize_for_inference(perturbed_model(sample_size=64), "bf16"),
    )
    z = torch.randn(1, 4, 16, 24)
    reference.enable_tiling()
    fast.enable_tiling()
    assert relative_error(fast.decode(z).sample, reference.decode(z).sample) < 0.03


def test_auto_dtype_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(inference, "cpu_has_bf16", lambda: True)
    assert optimize_for_inference(perturbed_model()).dtype == torch.bfloat16
    monkeypatch.setattr(inference, "cpu_has_bf16", lambda: False)
    model = optimize_for_inference(perturbed_model())
    assert model.dtype == torch.float32 and "no fast low-precision" in model.inference_settings.reason


def test_check_fp16_passes_a_small_model_and_does_not_modify_it():
    model = perturbed_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = check_fp16(model, images(1, 32))
    assert report.safe and report.headroom > 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "decoder.up_blocks.3" in report.fp32_max and "quant_conv" in report.fp32_max
    if report.fp16_max is not None:  # fp16 kernels exist here: compare the run with fp32
        assert report.psnr_fp16_vs_fp32 > 35
    else:
        assert report.fp16_error


def test_check_fp16_finds_the_overflowing_block():
    """Oracle: scaling the decoder's first convolution by 1e6 puts its outputs (order 0.1-1 before) above 65504."""
    model = perturbed_model()
    with torch.no_grad():
        model.decoder.conv_in.weight.mul_(1e6)
        model.decoder.conv_in.bias.mul_(1e6)
    report = check_fp16(model, images(1, 32))
    assert not report.safe and "decoder.conv_in" in report.overflowing
    assert report.fp32_max["decoder.conv_in"] > FP16_MAX
    assert "encoder.mid_block" not in report.overflowing


def test_check_fp16_finds_an_overflow_in_a_vq_model_too():
    """Oracle as above, through the quantiser of a VQ model (which has no posterior)."""
    from latentvae import VQModel

    torch.manual_seed(0)
    model = VQModel.from_preset("tiny-vq-f4").eval()
    assert check_fp16(model, images(1, 32)).safe
    with torch.no_grad():
        model.decoder.conv_in.weight.mul_(1e6)
    report = check_fp16(model, images(1, 32))
    assert not report.safe and "decoder.conv_in" in report.overflowing and "quant_conv" in report.fp32_max


@pytest.mark.slow
@torch.no_grad()
def test_compiled_fast_path_stays_close_to_fp32():
    """The same tolerance as the eager fast path (inductor fuses and rounds differently, so not equal to eager)."""
    reference = perturbed_model()
    compiled = optimize_for_inference(perturbed_model(), dtype="bf16", compile=True)
    z = torch.randn(1, 4, 8, 8)
    assert compiled.inference_settings.compiled
    assert relative_error(compiled.decode(z).sample, reference.decode(z).sample) < 0.03
