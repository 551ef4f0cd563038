"""The data-loader benchmark: timed against items of known cost, run on a folder and on shards."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from bad_data_zoo import save_rgb

from latentvae.benchmark.data import (
    LoaderRate,
    benchmark_data,
    format_rates,
    measure_loader,
    workers_to_feed,
)
from latentvae.data.shards import make_shards, shard_pattern

ITEM_SECONDS = 0.01


class Sleepy(torch.utils.data.Dataset):
    """Items that take 10 ms each without using the CPU: one process delivers at most 100 a second."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict:
        time.sleep(ITEM_SECONDS)
        return {"pixel_values": torch.zeros(3, 2, 2), "path": str(index), "skipped": ()}


def test_rates_match_a_known_per_item_cost():
    ceiling = 1 / ITEM_SECONDS
    one = measure_loader(Sleepy(), workers=0, batch_size=4, batches=10)
    assert one.images == 40 and one.workers == 0
    assert 0.5 * ceiling < one.images_per_s <= 1.02 * ceiling
    two = measure_loader(Sleepy(), workers=2, batch_size=4, batches=10)
    assert two.images_per_s <= 2.04 * ceiling and two.images_per_s > 1.4 * one.images_per_s  # sleeps overlap
    assert two.per_worker == pytest.approx(two.images_per_s / 2)


def test_workers_needed_to_feed_a_gpu():
    # Oracle: count workers up until their combined rate covers the training rate with 25 % headroom.
    rng = np.random.default_rng(0)
    for per_worker, train in zip(rng.uniform(1, 300, 200), rng.uniform(1, 2000, 200)):
        count = 1
        while count * per_worker < 1.25 * train:
            count += 1
        assert workers_to_feed(per_worker, train) == count, (per_worker, train)
    assert workers_to_feed(500.0, 10.0) == 1
    with pytest.raises(ValueError):
        workers_to_feed(0.0, 10.0)
    table = format_rates(
        [LoaderRate(1, 30.0, 30.0, 64), LoaderRate(2, 50.0, 25.0, 64)], train_images_per_s=96.0
    )
    assert "about 4 workers (30.0 images/s each" in table


def test_folder_and_shards(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(6):
        save_rgb(tmp_path / "images" / f"{i}.png", 40, 48, seed=i)
    shards, _ = make_shards(tmp_path / "images", tmp_path / "shards", shard_size=3)
    for source in (str(tmp_path / "images"), shard_pattern(shards)):
        rates = benchmark_data(source, workers=(0, 2), resolution=16, batch_size=2, batches=3)
        assert [r.workers for r in rates] == [0, 2]
        assert all(r.images == 6 and r.images_per_s > 0 for r in rates)
