"""How fast the training data pipeline delivers crops: images/s of decode + resize + crop, by data-loader workers.

    rates = benchmark_data("photos/", workers=(0, 1, 2, 4), resolution=256)          # a folder
    rates = benchmark_data("shards/shard-{000000..000041}.tar", workers=(1, 2, 4))   # WebDataset shards
    print(format_rates(rates, train_images_per_s=96.0))

A GPU is fed when the loader delivers at least as many images per second as the training step consumes
(`train/images_per_s` in the training log, or the step benchmark): `workers_to_feed` turns one worker's rate into
the number of workers needed per GPU. Workers share the machine's CPU cores, so the per-worker rate drops once
there are more workers than free cores; measure on the training machine with the real data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from latentvae.data.images import ImageDataset, collate_images
from latentvae.data.shards import ShardStream, collate_stream, expand_shards
from latentvae.data.sources import find_images


@dataclass(frozen=True)
class LoaderRate:
    """One measurement.

    Attributes:
        workers: DataLoader worker processes (0: decoding in the main process).
        images_per_s: Crops delivered per second, all workers together.
        per_worker: `images_per_s` divided by the processes decoding (`max(1, workers)`).
        images: Crops timed (after the warm-up batches).
    """

    workers: int
    images_per_s: float
    per_worker: float
    images: int


def is_shard_pattern(source: str) -> bool:
    return ".tar" in source


def training_crops(source: str, resolution: int, resize_to: int | None = None) -> Dataset:
    """The dataset training would read from `source` (a folder, or a shard pattern), with random crops."""
    if is_shard_pattern(source):
        return ShardStream(expand_shards(source), resolution, resize_to=resize_to, shuffle_buffer=1)
    return ImageDataset(find_images(source), resolution, train=True, resize_to=resize_to)


def measure_loader(
    dataset: Dataset, workers: int, batch_size: int = 16, batches: int = 20, warmup: int = 2
) -> LoaderRate:
    """Time `batches` batches of `dataset` through a DataLoader with `workers` workers, after `warmup` batches
    per worker (starting the workers and filling their prefetch queues is not counted)."""
    iterable = isinstance(dataset, torch.utils.data.IterableDataset)
    total = (batches + warmup * max(1, workers)) * batch_size
    sampler = None if iterable else RandomSampler(dataset, replacement=True, num_samples=total)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_stream if iterable else collate_images,
    )
    stream = iter(loader)
    for _ in range(warmup * max(1, workers)):
        next(stream)
    started = time.perf_counter()
    for _ in range(batches):
        next(stream)
    elapsed = time.perf_counter() - started
    del stream  # stops the workers
    rate = batches * batch_size / elapsed
    return LoaderRate(workers, rate, rate / max(1, workers), batches * batch_size)


def benchmark_data(
    source: str,
    workers: Sequence[int] = (0, 1, 2, 4),
    resolution: int = 256,
    resize_to: int | None = None,
    batch_size: int = 16,
    batches: int = 20,
) -> list[LoaderRate]:
    """`measure_loader` for each worker count on the training crops of `source` (a folder or a shard pattern).

    Args:
        source: An image folder, or WebDataset shards (`'dir/shard-{000000..000009}.tar'`).
        workers: The worker counts to measure.
        resolution, resize_to: The crop, as in training (`--resolution`, `--resize_to`).
        batch_size: Images per batch.
        batches: Batches timed per worker count.
    """
    dataset = training_crops(source, resolution, resize_to)
    return [measure_loader(dataset, count, batch_size, batches) for count in workers]


def workers_to_feed(per_worker_images_per_s: float, train_images_per_s: float, headroom: float = 1.25) -> int:
    """Data-loader workers per training process that keep it fed: ceil(headroom x step rate / worker rate).

    Args:
        per_worker_images_per_s: One worker's rate (`LoaderRate.per_worker`).
        train_images_per_s: Images per second one training process consumes.
        headroom: Margin for slower files and busy cores.
    """
    if per_worker_images_per_s <= 0:
        raise ValueError(f"a worker rate must be positive, got {per_worker_images_per_s}")
    return max(1, math.ceil(headroom * train_images_per_s / per_worker_images_per_s))


def format_rates(rates: Sequence[LoaderRate], train_images_per_s: float | None = None) -> str:
    """A table of the measurements; with the training rate, the workers needed to keep one GPU fed."""
    lines = [f"{'workers':>7}  {'images/s':>9}  {'per worker':>10}"]
    lines += [f"{r.workers:>7}  {r.images_per_s:>9.1f}  {r.per_worker:>10.1f}" for r in rates]
    if train_images_per_s is not None:
        # One worker's rate (workers 0 and 1 both decode in one process); more workers share the cores.
        single = [r.per_worker for r in rates if r.workers <= 1]
        best = max(single) if single else max(r.per_worker for r in rates)
        needed = workers_to_feed(best, train_images_per_s)
        lines.append(
            f"training consumes {train_images_per_s:.1f} images/s per process: about {needed} workers "
            f"({best:.1f} images/s each, 25 % headroom) keep it fed"
        )
    return "\n".join(lines)
