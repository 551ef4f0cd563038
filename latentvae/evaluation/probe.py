"""The diffusion probe: how easily does a small latent diffusion model learn a VAE's latents?

A fixed small diffusers `UNet2DModel` (widths scaled to the latent channels) is trained for a fixed budget on
normalised latents by rectified flow with velocity prediction (Liu et al. 2022; Esser et al. 2024):

    z_t = (1 - t) z + t eps,  eps ~ N(0, I),  t ~ U(0, 1);   target v = eps - z;   loss = ||v_theta(z_t, t) - v||^2

and its held-out loss is measured on latents of other images at `timesteps` fixed times t_k = (k + 1/2) / K with
fixed noise, averaged over k. Same seed, same budget, same architecture for every VAE: the loss ranks VAEs with the
same latent shape by how learnable their latents are. It is a relative signal, not a gFID.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import Tensor


@dataclass(frozen=True)
class ProbeSettings:
    """The probe's budget and architecture (each a `diagnose --probe_*` flag)."""

    steps: int = 400
    batch_size: int = 16
    learning_rate: float = 1e-3
    width: int = 16  # channels of the first UNet level per 4 latent channels
    timesteps: int = 8  # fixed validation times
    eval_every: int = 50
    sample_steps: int = 20  # Euler steps of the probe's samples
    seed: int = 0


@dataclass
class ProbeResult:
    val_loss: float  # mean over the fixed timesteps and the held-out latents
    val_loss_per_timestep: list[float]
    timesteps: list[float]
    curve_steps: list[int] = field(default_factory=list)
    curve_val_loss: list[float] = field(default_factory=list)
    curve_train_loss: list[float] = field(
        default_factory=list
    )  # mean over the steps since the previous point
    train_latents: int = 0
    val_latents: int = 0
    latent_shape: list[int] = field(default_factory=list)
    parameters: int = 0
    seconds: float = 0.0  # wall clock of the training and the validations
    cpu_seconds: float = 0.0  # process CPU time of the same
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def build_probe_unet(channels: int, width: int, seed: int) -> UNet2DModel:
    """The probe's denoiser: two levels of `width * ceil(channels / 4)` and twice that, one resnet each, no
    attention but in the middle; initialised from `seed`."""
    base = width * math.ceil(channels / 4)
    torch.manual_seed(seed)
    return UNet2DModel(
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(base, 2 * base),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )


def flow_loss(model: UNet2DModel, z: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Per-sample rectified-flow velocity loss `(B,)` at times `t` `(B,)` with `noise` like `z`."""
    tb = t.view(-1, 1, 1, 1)
    noisy = (1 - tb) * z + tb * noise  # z_t = (1 - t) z + t eps
    velocity = model(
        noisy, t * 1000
    ).sample  # the UNet's timestep embedding expects a DDPM-like 0..1000 scale
    return F.mse_loss(velocity, noise - z, reduction="none").mean((1, 2, 3))  # target v = eps - z


@torch.no_grad()
def validation_loss(model: UNet2DModel, latents: Tensor, times: Tensor, noise: Tensor, batch: int) -> Tensor:
    """Mean loss per fixed time `(K,)` over the held-out `latents` with the fixed `noise` `(K, N, C, h, w)`."""
    model.eval()
    losses = []
    for k, t in enumerate(times):
        parts = [
            flow_loss(model, z, t.expand(len(z)), eps)
            for z, eps in zip(latents.split(batch), noise[k].split(batch))
        ]
        losses.append(torch.cat(parts).mean())
    model.train()
    return torch.stack(losses)


def train_probe(
    train_latents: Tensor, val_latents: Tensor, settings: ProbeSettings, device: str | torch.device = "cpu"
) -> tuple[ProbeResult, UNet2DModel]:
    """Train the probe on normalised `train_latents` `(N, C, h, w)` (augmented views of the training images) and
    measure it on normalised `val_latents` `(M, C, h, w)` of held-out images.

    Returns:
        the `ProbeResult` and the trained UNet (for `probe_samples`).
    """
    if len(train_latents) == 0 or len(val_latents) == 0:
        raise ValueError(
            f"the probe needs training and held-out latents, got {len(train_latents)} and {len(val_latents)}"
        )
    channels = train_latents.shape[1]
    model = build_probe_unet(channels, settings.width, settings.seed).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed)
    times = (torch.arange(settings.timesteps, dtype=torch.float32) + 0.5) / settings.timesteps
    fixed_noise = torch.randn(
        (settings.timesteps, *val_latents.shape), generator=torch.Generator().manual_seed(settings.seed + 1)
    )
    # clone: latents encoded under inference mode cannot take part in autograd
    train_latents, val_latents = (z.float().to(device).clone() for z in (train_latents, val_latents))
    times, fixed_noise = times.to(device), fixed_noise.to(device)
    result = ProbeResult(
        val_loss=math.nan,
        val_loss_per_timestep=[],
        timesteps=times.tolist(),
        train_latents=len(train_latents),
        val_latents=len(val_latents),
        latent_shape=list(train_latents.shape[1:]),
        parameters=sum(p.numel() for p in model.parameters()),
        settings=asdict(settings),
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    since: list[float] = []
    model.train()
    for step in range(1, settings.steps + 1):
        index = torch.randint(len(train_latents), (settings.batch_size,), generator=generator)
        t = torch.rand(settings.batch_size, generator=generator)
        noise = torch.randn((settings.batch_size, *train_latents.shape[1:]), generator=generator)
        loss = flow_loss(model, train_latents[index.to(device)], t.to(device), noise.to(device)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        since.append(loss.item())
        if step % settings.eval_every == 0 or step == settings.steps:
            per_time = validation_loss(model, val_latents, times, fixed_noise, settings.batch_size)
            result.curve_steps.append(step)
            result.curve_val_loss.append(per_time.mean().item())
            result.curve_train_loss.append(sum(since) / len(since))
            since = []
    result.val_loss_per_timestep = per_time.tolist()
    result.val_loss = per_time.mean().item()
    result.seconds = time.perf_counter() - started
    result.cpu_seconds = time.process_time() - cpu_started
    return result, model.eval()


@torch.no_grad()
def probe_samples(
    model: UNet2DModel, latent_shape: list[int], count: int, steps: int, generator: torch.Generator
) -> Tensor:
    """Normalised latents `(count, C, h, w)` sampled from the trained probe: Euler steps of dz/dt = v from
    t = 1 (noise) to t = 0."""
    device = next(model.parameters()).device
    z = torch.randn((count, *latent_shape), generator=generator).to(device)
    ts = torch.linspace(1.0, 0.0, steps + 1, device=device)
    for t, t_next in zip(ts[:-1], ts[1:]):
        z = z + (t_next - t) * model(z, t.expand(count) * 1000).sample
    return z
