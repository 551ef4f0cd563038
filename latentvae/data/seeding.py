"""Randomness that is a fixed function of where training is, not of what ran before: exact resume, any worker count.

A training run draws random numbers for its crops and flips and for its posterior samples. Drawn from one global
generator, each number depends on every draw before it, including draws that happen at different moments in a
resumed run (the data loader fetches a batch ahead; a new data-loader iterator draws a seed of its own). Here each
draw gets its own seed instead: the crops of image `i` in epoch `e` from `(seed, e, i)`, the posterior noise of a
batch from `(seed, process, step, micro_step)`. So N steps straight and N/2 + resume N/2 see the same numbers,
however many data-loader workers there are.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


def derived_seed(*keys: int) -> int:
    """A 63-bit seed that is a fixed, well-mixed function of non-negative integer `keys`.

    numpy's `SeedSequence` hashes the keys, so nearby keys (step 7 and step 8) give unrelated streams.
    """
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def derived_generator(*keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A `torch.Generator` on `device` seeded with `derived_seed(*keys)`."""
    return torch.Generator(device=device).manual_seed(derived_seed(*keys))


class EpochSeededDataset(Dataset):
    """Wraps a dataset whose items draw from torch's global RNG (random crops) so that item `i` of epoch `e`
    draws from a generator seeded with `(seed, e, i)`: the same crop in a resumed run, and a new one each epoch.

    The global RNG is restored afterwards (`torch.random.fork_rng`), so nothing else sees these draws.

    Args:
        dataset: a map-style dataset, e.g. `latentvae.data.images.ImageDataset`.
        seed: the run's seed.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        # In shared memory, so data-loader worker processes (persistent ones included) see set_epoch's value.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(self.seed, int(self._epoch), index))
            return self.dataset[index]
