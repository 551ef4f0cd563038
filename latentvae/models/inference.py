"""The fast inference path: low precision where the hardware has fast units for it, fp32 where numerics need it.

`optimize_for_inference` turns a VAE (ours or diffusers') into its fastest accurate form for the machine;
`check_fp16` tells whether a model can run in fp16 at all (the SDXL VAE famously cannot: some of its activations
exceed fp16's largest value, 65504, and turn into inf and then NaN).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from latentvae.models.groupnorm_stats import use_fp32_statistics

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class InferenceSettings:
    """What `optimize_for_inference` chose; kept on the model as `vae.inference_settings`."""

    dtype: torch.dtype
    channels_last: bool
    compiled: bool
    reason: str


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (x86 AVX512_BF16 or AMX; read from Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as file:
            flags = next((line.split(":", 1)[1].split() for line in file if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fastest_dtype(vae: nn.Module, probe_images: Tensor | None = None) -> tuple[torch.dtype, str]:
    """The lowest precision that is fast and accurate for `vae` on its device, with the reason for the choice.

    bf16 where the device has bf16 units (bf16 has fp32's range, so it cannot overflow where fp32 does not);
    otherwise, on CUDA, fp16 if the model is fp16-safe: `check_fp16` passes on `probe_images`, or, without them,
    the model's config says so (`force_upcast=False`, the flag pipelines read for the same question); else fp32.
    """
    device = vae.device
    # Compute capability 8.0 (Ampere) and later have bf16 tensor cores; `torch.cuda.is_bf16_supported()` also says
    # yes where bf16 is only emulated (V100, T4), which is slower than fp16 there.
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16, "CUDA device with bf16 tensor cores (compute capability >= 8.0)"
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16, "CPU with bf16 instructions (avx512_bf16 / amx_bf16)"
    if device.type == "cuda":
        if probe_images is not None:
            report = check_fp16(vae, probe_images)
            if report.safe:
                return torch.float16, "no bf16 on this GPU; check_fp16 passed on the probe images"
            return torch.float32, f"no bf16 on this GPU and fp16 overflows in {report.overflowing}"
        if not vae.config.get("force_upcast", True):  # AutoencoderKLFlux2's config has no such flag
            return (
                torch.float16,
                "no bf16 on this GPU; the config declares the model fp16-safe (force_upcast=False)",
            )
        return (
            torch.float32,
            "no bf16 on this GPU and the model is not known to be fp16-safe (force_upcast=True)",
        )
    return torch.float32, f"no fast low-precision units known for {device.type}"


def _boundaries(vae: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The first layer of encode and of decode, and the last layer of each (tiled runs pass them too)."""
    entries = [
        vae.encoder.conv_in,
        vae.post_quant_conv if vae.post_quant_conv is not None else vae.decoder.conv_in,
    ]
    exits = [vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out, vae.decoder.conv_out]
    return entries, exits


def optimize_for_inference(
    vae: nn.Module,
    dtype: str | torch.dtype = "auto",
    channels_last: bool = True,
    compile: bool = False,
    probe_images: Tensor | None = None,
) -> nn.Module:
    """Convert `vae` in place to the fastest accurate settings for its device, for inference only.

    - weights in `dtype`: `"auto"` picks bf16 where the CPU or GPU has bf16 units, fp16 only where the model is
      fp16-safe, else fp32 (see `fastest_dtype`);
    - GroupNorm statistics and affine transform in fp32 (`Fp32StatsGroupNorm`), whatever the dtype;
    - inputs of any float dtype are accepted and cast by the first layer; encode's moments and decode's images
      leave in fp32, so the posterior's exp (std, var) and everything after it is computed in fp32;
    - channels_last activations (the layout oneDNN and cuDNN run convolutions fastest in);
    - optionally `torch.compile` of the encoder and decoder (untiled calls).

    Args:
        vae: an `AutoencoderKL` (latentvae's or diffusers').
        dtype: `"auto"`, `"fp32"`, `"bf16"`, `"fp16"` or a `torch.dtype`.
        channels_last: use the channels_last memory format.
        compile: compile the encoder and decoder with `torch.compile` (the first call is slow).
        probe_images: images in [-1, 1] that `"auto"` checks fp16 safety on, where fp16 is the candidate.

    Returns:
        The same `vae`, converted; `vae.inference_settings` records the choice and its reason.
    """
    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    reason = "requested"
    if dtype == "auto":
        dtype, reason = fastest_dtype(vae, probe_images)
    vae.eval().requires_grad_(False)
    if dtype != torch.float32:
        use_fp32_statistics(vae)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    # nn.Module.to, not ModelMixin.to, which warns about fp32-kept modules this model does not have.
    nn.Module.to(vae, dtype=dtype)
    nn.Module.to(vae, memory_format=memory_format)

    def cast_input(module: nn.Module, args: tuple) -> tuple:
        return (args[0].to(dtype=dtype, memory_format=memory_format), *args[1:])

    def output_in_fp32(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return output.to(dtype=torch.float32, memory_format=torch.contiguous_format)

    for handle in getattr(vae, "_inference_hooks", []):  # converting twice replaces the earlier hooks
        handle.remove()
    entries, exits = _boundaries(vae)
    vae._inference_hooks = [m.register_forward_pre_hook(cast_input) for m in entries]
    vae._inference_hooks += [m.register_forward_hook(output_in_fp32) for m in exits]
    if compile:
        vae.encoder.compile()
        vae.decoder.compile()
    vae.inference_settings = InferenceSettings(dtype, channels_last, compile, reason)
    return vae


def _block_name(module_name: str) -> str:
    """The block a layer belongs to: `encoder.down_blocks.1`, `decoder.mid_block`, `quant_conv`, ..."""
    parts = module_name.split(".")
    if len(parts) > 2 and parts[1] in ("down_blocks", "up_blocks"):
        return ".".join(parts[:3])
    return ".".join(parts[:2]) if parts[0] in ("encoder", "decoder") else parts[0]


@dataclass
class Fp16Report:
    """What `check_fp16` found.

    Args:
        fp32_max: largest |activation| of any layer in each block, in an fp32 run.
        fp16_max: the same in an fp16 run (inf where something overflowed); None if fp16 could not run here.
        fp16_error: why there is no fp16 run (e.g. missing fp16 kernels); then `fp32_max` alone decides.
        psnr_fp16_vs_fp32: PSNR (dB, uint8) of the fp16 reconstruction against the fp32 one.
    """

    fp32_max: dict[str, float]
    fp16_max: dict[str, float] | None = None
    fp16_error: str | None = None
    psnr_fp16_vs_fp32: float | None = None
    overflowing: list[str] = field(default_factory=list)

    @property
    def safe(self) -> bool:
        return not self.overflowing

    @property
    def headroom(self) -> float:
        """65504 / the largest fp32 activation: how many times larger activations could get before overflowing."""
        return FP16_MAX / max(self.fp32_max.values())


def _reconstruct_with_maxima(vae: nn.Module, images: Tensor) -> tuple[Tensor, dict[str, float]]:
    maxima: dict[str, float] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            value = output.detach().abs().max().item() if output.numel() else 0.0
            value = value if math.isfinite(value) else math.inf  # NaN counts as overflow
            block = _block_name(name)
            maxima[block] = max(maxima.get(block, 0.0), value)

        return hook

    leaves = [(name, m) for name, m in vae.named_modules() if name and not list(m.children())]
    handles = [m.register_forward_hook(record(name)) for name, m in leaves]
    try:
        # forward: the posterior mode of a KL model, the quantised latent of a VQ model
        images_out = vae(images.to(vae.dtype)).sample
    finally:
        for handle in handles:
            handle.remove()
    return images_out.float(), maxima


def _uint8(images: Tensor) -> Tensor:
    return ((images.double().clamp(-1, 1) + 1) * 127.5).round()


@torch.inference_mode()
def check_fp16(vae: nn.Module, images: Tensor) -> Fp16Report:
    """Run `vae` in fp32 and in fp16 on `images` and report the largest activation per block and any overflow.

    A model is fp16-safe when no activation of the fp16 run is inf or NaN and none of the fp32 run exceeds 65504.
    Where this device has no fp16 kernels the fp16 run is skipped (`fp16_error` says why) and the fp32 magnitudes
    alone decide, which catches overflow but not fp16's coarser rounding. `vae` itself is not modified.

    Args:
        vae: an `AutoencoderKL` (latentvae's or diffusers').
        images: `(B, 3, H, W)` in [-1, 1]; real images, since activations depend on content.
    """
    clean = type(vae).from_config(
        vae.config
    )  # a plain copy: no hooks or fp32-statistics norms of a fast path
    clean.load_state_dict({k: v.float() for k, v in vae.state_dict().items()})
    clean = clean.to(vae.device).eval()
    images = images.to(vae.device, torch.float32)
    reference, fp32_max = _reconstruct_with_maxima(clean, images)
    report = Fp16Report(fp32_max=fp32_max)
    try:
        half = nn.Module.to(copy.deepcopy(clean), dtype=torch.float16)
        output, report.fp16_max = _reconstruct_with_maxima(half, images)
        # PSNR on uint8 values, as latentvae.evaluation.metrics.psnr computes it (that layer sits above models)
        mse = (_uint8(reference) - _uint8(output)).square().flatten(1).mean(1)
        report.psnr_fp16_vs_fp32 = (10 * torch.log10(255.0**2 / mse)).mean().item()
    except (RuntimeError, NotImplementedError) as err:  # e.g. "... not implemented for 'Half'"
        report.fp16_error = str(err).splitlines()[0]
    observed = report.fp16_max or {}
    report.overflowing = [
        block
        for block, value in fp32_max.items()
        if value >= FP16_MAX or not math.isfinite(observed.get(block, 0.0))
    ]
    return report
