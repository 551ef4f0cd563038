"""Vector quantisation, the discrete bottleneck of a VQ-VAE (van den Oord et al., 2017).

Every latent vector z is replaced by its nearest codebook vector e_k, k = argmin_j ||z - e_j||^2, and the model is
trained with

    L_vq = ||sg[z] - e_k||^2  +  beta * ||z - sg[e_k]||^2        (codebook loss + beta x commitment loss)

where sg[] stops gradients: the codebook loss moves codes towards the encoder outputs, the commitment loss keeps the
encoder outputs close to their codes. The lookup has no gradient; the straight-through estimator
z_q = z + sg[e_k - z] passes the decoder's gradient to the encoder unchanged.

`VectorQuantizer` keeps diffusers' parameter name (`embedding.weight`), its `forward` tuple and
`get_codebook_entry`, so `latentvae.VQModel` loads diffusers' `VQModel` weights. Everything used only in training -
EMA codebook updates, dead-code restarts, the usage window - lives in a `CodebookTracker` that `configure_training`
attaches: it is not part of the module's `state_dict` (the exported keys stay exactly diffusers'), and a training
run checkpoints it on its own (it has `state_dict` / `load_state_dict`, for `accelerator.register_for_checkpointing`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# Nearest-code search works on blocks of (rows x codes) distances no larger than this (64 MB in fp32), whatever
# the batch: a 256 px vq-f4 batch of 12 has 49,152 latent vectors, against 8,192 codes that is 1.6 GB at once.
DISTANCE_BLOCK_ELEMENTS = 2**24


def nearest_codes(vectors: Tensor, codebook: Tensor, block_elements: int = DISTANCE_BLOCK_ELEMENTS) -> Tensor:
    """Index of the nearest codebook row for each row of `vectors` (squared Euclidean distance).

    Args:
        vectors (`Tensor`): `(N, D)`.
        codebook (`Tensor`): `(K, D)`, same dtype.
        block_elements (`int`): the most distances held at once; rows are processed in blocks of
            `block_elements // K`.

    Returns:
        `Tensor`: `(N,)` long indices.
    """
    # ||v - e||^2 = ||v||^2 - 2 v.e + ||e||^2; ||v||^2 is the same for every code, so the argmin leaves it out.
    code_sq = codebook.square().sum(1)  # (K,)
    rows = max(1, block_elements // codebook.shape[0])
    blocks = [torch.addmm(code_sq, part, codebook.T, alpha=-2).argmin(1) for part in vectors.split(rows)]
    return torch.cat(blocks) if blocks else vectors.new_zeros(0, dtype=torch.long)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum `tensor` in place over all processes (a no-op without `torch.distributed`); returns it."""
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of the code histogram: K when all K codes are used equally often, 1 when one code takes all."""
    probs = counts / counts.sum().clamp_min(1)
    return torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())  # exp(-sum p log p)


@dataclass
class QuantizerOutput:
    """What `VectorQuantizer(z, return_dict=True)` returns.

    Args:
        quantized: `(B, D, h, w)` straight-through codes z + sg[e_k - z], in z's dtype.
        loss: codebook_weight * codebook_loss + commitment_weight * commitment_loss (scalar, with its graph).
        codebook_loss: mean ||sg[z] - e_k||^2 (detached; 0-weighted under EMA updates).
        commitment_loss: mean ||z - sg[e_k]||^2 (detached).
        indices: `(B, h, w)` code indices.
        perplexity: exp(entropy) of this batch's code histogram (over all processes in training).
        usage: fraction of the codebook used by this batch (over all processes in training).
    """

    quantized: Tensor
    loss: Tensor
    codebook_loss: Tensor
    commitment_loss: Tensor
    indices: Tensor
    perplexity: Tensor
    usage: Tensor


class CodebookTracker:
    """Training-time state of a codebook: when each code was last used, and the EMA statistics.

    A step here is one forward pass in training mode, i.e. one (micro-)batch: with gradient accumulation,
    `restart_after` and `usage_window` count micro-batches, and the EMA moves once per micro-batch.

    EMA codebook (VQ-VAE appendix; Laplace smoothing as in Sonnet's `VectorQuantizerEMA`), per code i with n_i
    vectors of this batch assigned and s_i their sum:

        N_i <- decay * N_i + (1 - decay) * n_i,    m_i <- decay * m_i + (1 - decay) * s_i
        e_i =  m_i / N~_i,   N~_i = (N_i + eps) / (sum_j N_j + K eps) * sum_j N_j

    Smoothing keeps N~_i > 0 for codes that are never chosen. N and m start at one pseudo-vector per code, the code
    itself (N = 1, m = e), so no code starts divided by a zero count; a code that stays unused decays towards the
    origin as its count does (over about log(eps) / log(decay) steps), which is what restarts are for.

    Dead-code restart: a code not chosen for `restart_after` consecutive training steps is re-seeded with one of
    the current batch's encoder outputs (drawn on process 0 and broadcast, so all processes agree), and its EMA
    statistics restart from it. The draw is a function of (`seed`, step), not of the global RNG, so a resumed run
    draws what the uninterrupted one did whatever else consumed random numbers in between.

    Args:
        weight (`Tensor`): the codebook `(K, D)` it belongs to (read at reset).
        ema_decay (`float`): EMA decay; 0 disables EMA updates (the codebook then learns from the codebook loss).
        ema_eps (`float`): Laplace smoothing epsilon.
        restart_after (`int`): steps without use before a code is restarted; 0 disables restarts.
        usage_window (`int`): `window_usage()` counts codes used in this many recent steps.
        seed (`int`): seed of the restart draws.
    """

    def __init__(
        self,
        weight: Tensor,
        ema_decay: float = 0.0,
        ema_eps: float = 1e-5,
        restart_after: int = 0,
        usage_window: int = 100,
        seed: int = 0,
    ):
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 = no EMA updates), got {ema_decay}")
        if restart_after < 0 or usage_window < 1 or ema_eps <= 0:
            raise ValueError(
                f"need restart_after >= 0 (0 = off), usage_window >= 1 and ema_eps > 0; got {restart_after}, "
                f"{usage_window}, {ema_eps}"
            )
        self.ema_decay, self.ema_eps = ema_decay, ema_eps
        self.restart_after, self.usage_window, self.seed = restart_after, usage_window, seed
        self.step = 0
        self.restarted = 0  # codes restarted by the latest update, for logging
        self.reset(weight)

    @property
    def uses_ema(self) -> bool:
        return self.ema_decay > 0

    @torch.no_grad()
    def reset(self, weight: Tensor) -> None:
        """Forget the history: no code used yet, EMA statistics = one pseudo-vector per code (the code itself)."""
        num_codes = weight.shape[0]
        self.last_used = torch.full((num_codes,), -1, dtype=torch.long, device=weight.device)  # -1: never
        self.last_reset = torch.full((num_codes,), self.step, dtype=torch.long, device=weight.device)
        self.cluster_size = torch.ones(num_codes, dtype=torch.float32, device=weight.device)
        self.embed_sum = weight.detach().float().clone()

    def window_usage(self) -> Tensor:
        """Fraction of the codes chosen at least once in the last `usage_window` training steps."""
        used = (self.last_used >= 0) & (self.step - self.last_used < self.usage_window)
        return used.float().mean()

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "last_used": self.last_used,
            "last_reset": self.last_reset,
            "cluster_size": self.cluster_size,
            "embed_sum": self.embed_sum,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        for name in ("last_used", "last_reset", "cluster_size", "embed_sum"):
            current = getattr(self, name)
            if state[name].shape != current.shape:
                raise ValueError(
                    f"codebook tracker state {name} has shape {tuple(state[name].shape)}, the codebook needs "
                    f"{tuple(current.shape)}: the checkpoint belongs to another codebook size"
                )
            setattr(self, name, state[name].to(device=current.device, dtype=current.dtype))

    def _follow(self, device: torch.device) -> None:
        # The tracker is not a module buffer (keeping it out of state_dict), so it follows the codebook lazily.
        if self.last_used.device != device:
            for name in ("last_used", "last_reset", "cluster_size", "embed_sum"):
                setattr(self, name, getattr(self, name).to(device))

    @torch.no_grad()
    def update(self, weight: Tensor, vectors: Tensor, indices: Tensor, counts: Tensor) -> int:
        """One training step: record use, apply the EMA update, restart dead codes. Returns the codes restarted
        (0, with nothing changed, when any process's vectors are not finite).

        Args:
            weight: the codebook parameter, written in place.
            vectors: this process's encoder outputs `(N, D)` (fp32, detached).
            indices: their codes `(N,)`.
            counts: codes' counts over all processes `(K,)`.
        """
        self._follow(weight.device)
        self.restarted = 0
        # A batch with NaN/inf latents (which the trainer skips) must not move the codebook or count as a step.
        bad = all_reduce_sum((~torch.isfinite(vectors).all()).float().reshape(1))
        if bad.item() > 0:
            return 0
        self.step += 1
        self.last_used[counts > 0] = self.step
        if self.uses_ema:
            sums = all_reduce_sum(torch.zeros_like(self.embed_sum).index_add_(0, indices, vectors))
            self.cluster_size.lerp_(counts, 1 - self.ema_decay)  # N <- decay N + (1 - decay) n
            self.embed_sum.lerp_(sums, 1 - self.ema_decay)  # m <- decay m + (1 - decay) s
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.ema_eps) / (total + len(counts) * self.ema_eps) * total
            weight.copy_(self.embed_sum / smoothed[:, None])
        self.restarted = self._restart_dead(weight, vectors)
        return self.restarted

    def _restart_dead(self, weight: Tensor, vectors: Tensor) -> int:
        if not self.restart_after:
            return 0
        idle = self.step - torch.maximum(self.last_used, self.last_reset)
        dead = torch.nonzero(idle >= self.restart_after).flatten()  # the same on every process
        if len(dead) == 0:
            return 0
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        if len(vectors) >= len(dead):
            picks = torch.randperm(len(vectors), generator=generator)[: len(dead)]
        else:
            picks = torch.randint(len(vectors), (len(dead),), generator=generator)
        seeds = vectors[picks.to(vectors.device)].contiguous()
        if _distributed():
            dist.broadcast(seeds, src=0)  # every process takes process 0's draw
        weight[dead] = seeds.to(weight.dtype)
        self.cluster_size[dead] = 1.0
        self.embed_sum[dead] = seeds
        self.last_reset[dead] = self.step
        return len(dead)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantiser with codebook + commitment loss and straight-through gradients.

    Drop-in for diffusers' `VectorQuantizer` as `VQModel` uses it (`remap=None`, `sane_index_shape=False`): same
    parameter (`embedding.weight`, initialised U(-1/K, 1/K)), same `forward` tuple, same `get_codebook_entry`.
    Distances and losses are computed in fp32 even under autocast or with a half-precision model.

    `legacy=True` (diffusers' and taming's default) weights the terms the other way round from the paper:
    loss = ||z - sg[e]||^2 + beta * ||sg[z] - e||^2, i.e. beta on the codebook term. Both give the same loss value
    (each term is the same mean squared distance); only which side the gradient pushes harder differs.

    Args:
        n_e (`int`): codebook size K.
        vq_embed_dim (`int`): code dimension D.
        beta (`float`): commitment weight (0.25 in the paper and in diffusers' VQModel).
        legacy (`bool`): taming/diffusers weighting (see above).
        block_elements (`int`): largest block of distances computed at once (see `nearest_codes`).
    """

    def __init__(
        self,
        n_e: int,
        vq_embed_dim: int,
        beta: float = 0.25,
        legacy: bool = True,
        block_elements: int = DISTANCE_BLOCK_ELEMENTS,
    ):
        super().__init__()
        self.n_e, self.vq_embed_dim, self.beta, self.legacy = n_e, vq_embed_dim, beta, legacy
        self.block_elements = block_elements
        self.embedding = nn.Embedding(n_e, vq_embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        self.tracker: CodebookTracker | None = None
        # Loading new weights invalidates the EMA statistics and the usage history.
        self.register_load_state_dict_post_hook(_reset_tracker)

    def configure_training(
        self,
        *,
        beta: float | None = None,
        legacy: bool | None = None,
        ema_decay: float = 0.0,
        ema_eps: float = 1e-5,
        restart_after: int = 0,
        usage_window: int = 100,
        seed: int = 0,
    ) -> CodebookTracker:
        """Attach a `CodebookTracker`: from now on, every forward in training mode updates usage (and, if asked, EMA
        codebook and dead-code restarts). With `ema_decay > 0` the codebook no longer takes gradients.

        Returns:
            The tracker; register it for checkpointing to make resumed runs exact.
        """
        if beta is not None:
            self.beta = beta
        if legacy is not None:
            self.legacy = legacy
        self.tracker = CodebookTracker(
            self.embedding.weight, ema_decay, ema_eps, restart_after, usage_window, seed
        )
        # The EMA owns the codebook: no gradient, so an optimizer leaves it alone and DDP does not wait for it.
        self.embedding.weight.requires_grad_(not self.tracker.uses_ema)
        return self.tracker

    @property
    def loss_weights(self) -> tuple[float, float]:
        """(codebook weight, commitment weight): (1, beta) as in the paper, (beta, 1) with `legacy`, the codebook
        term dropped while EMA updates move the codes."""
        codebook, commitment = (self.beta, 1.0) if self.legacy else (1.0, self.beta)
        return (0.0 if self.tracker is not None and self.tracker.uses_ema else codebook), commitment

    def forward(
        self, z: Tensor, return_dict: bool = False
    ) -> tuple[Tensor, Tensor, tuple[Tensor, None, Tensor]] | QuantizerOutput:
        """Quantise `z` `(B, D, h, w)`.

        Returns:
            diffusers' tuple `(z_q, loss, (perplexity, None, indices))` with `indices` flattened to `(B * h * w,)`,
            or with `return_dict=True` a `QuantizerOutput`.
        """
        if z.ndim != 4 or z.shape[1] != self.vq_embed_dim:
            raise ValueError(
                f"expected latents (B, {self.vq_embed_dim}, h, w) for this codebook, got {tuple(z.shape)}"
            )
        b, d, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()  # (B*h*w, D)
            codebook = self.embedding.weight.float()
            indices = nearest_codes(flat.detach(), codebook.detach(), self.block_elements)
            counts = torch.bincount(indices, minlength=self.n_e).float()
            tracking = self.training and self.tracker is not None
            if tracking:
                all_reduce_sum(counts)
            z_q = F.embedding(
                indices, codebook
            )  # before any update below: this batch is quantised as it was looked up
            codebook_loss = torch.mean((z_q - flat.detach()) ** 2)  # ||sg[z] - e||^2
            commitment_loss = torch.mean((z_q.detach() - flat) ** 2)  # ||z - sg[e]||^2
            codebook_weight, commitment_weight = self.loss_weights
            loss = codebook_weight * codebook_loss + commitment_weight * commitment_loss
            if tracking:
                self.tracker.update(self.embedding.weight, flat.detach(), indices, counts)
            quantized = flat + (z_q - flat).detach()  # straight-through: forward e, backward identity
        quantized = quantized.view(b, h, w, d).permute(0, 3, 1, 2).contiguous().to(z.dtype)
        out = QuantizerOutput(
            quantized=quantized,
            loss=loss,
            codebook_loss=codebook_loss.detach(),
            commitment_loss=commitment_loss.detach(),
            indices=indices.view(b, h, w),
            perplexity=perplexity(counts),
            usage=(counts > 0).float().mean(),
        )
        return out if return_dict else (out.quantized, out.loss, (out.perplexity, None, indices))

    def get_codebook_entry(self, indices: Tensor, shape: tuple[int, ...] | None) -> Tensor:
        """Codebook vectors for `indices`; with `shape` = (B, h, w, D), as a `(B, D, h, w)` latent (as diffusers)."""
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q


def _reset_tracker(module: VectorQuantizer, incompatible_keys) -> None:
    if module.tracker is not None:
        module.tracker.reset(module.embedding.weight)
