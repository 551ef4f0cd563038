"""The training script's data: where batches come from (a folder / dataset, or streamed shards), how a resumed run
finds its place again, and the running check that not too much of the data is broken.

    data = build_training_data(settings, accelerator)  # settings: a DataSettings (TrainConfig.data_settings())
    for batch in data.batches.batches(global_step):    # endless; the loop stops at --max_train_steps
        data.monitor.update(batch)                     # counts broken images, stops the run if too many
        ...
    save_checkpoint(..., process_state=data.batches.state_dict())

Data flows one way: sources (`sources`, `shards`) -> decode and crop (`images`) -> batches (here), with the
bad-file accounting (`skips`) beside all of them.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Subset

from latentvae.data.images import ImageDataset, ImageSource, collate_images
from latentvae.data.seeding import EpochSeededDataset
from latentvae.data.shards import (
    ShardStream,
    collate_stream,
    expand_shards,
    first_images,
    is_local,
    local_path,
)
from latentvae.data.skips import BadDataMonitor, SkipLog, too_many_bad_images
from latentvae.data.sources import load_image_data
from latentvae.data.synthetic import colour_images

logger = logging.getLogger(__name__)


class FolderBatches:
    """Epochs of shuffled batches of a map-style dataset; the position in the data follows from the step alone.

    Args:
        accelerator: Prepares the loader: each process gets its share of every epoch.
        dataset: The crops, seeded by position (`EpochSeededDataset`), so a resumed run sees the same ones.
        batch_size, num_workers, accumulation: As in the training config.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        dataset: EpochSeededDataset,
        batch_size: int,
        num_workers: int,
        accumulation: int,
        worker_init_fn: Callable[[int], None] | None = None,
    ) -> None:
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=num_workers,
            collate_fn=collate_images,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=num_workers > 0,
            worker_init_fn=worker_init_fn,
        )
        self.accelerator, self.dataset, self.accumulation = accelerator, dataset, accumulation
        self.loader = accelerator.prepare(loader)  # the shuffle order is a function of (seed, epoch)
        # The last, short accumulation window of an epoch also makes an optimizer step (Accelerate syncs at the
        # end of a prepared loader).
        self.steps_per_epoch = math.ceil(len(self.loader) / accumulation)
        self.epoch = 0

    def batches(self, global_step: int) -> Iterator[dict[str, Any]]:
        """Batches from the one after optimizer step `global_step` on, through as many epochs as asked for."""
        first_epoch, step_in_epoch = divmod(global_step, self.steps_per_epoch)
        for epoch in itertools.count(first_epoch):
            self.epoch = epoch
            self.dataset.set_epoch(epoch)
            self.loader.set_epoch(epoch)
            loader = self.loader
            if epoch == first_epoch and step_in_epoch:
                loader = self.accelerator.skip_first_batches(self.loader, step_in_epoch * self.accumulation)
            yield from loader

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], all_states: Sequence[dict[str, Any]] = ()) -> None:
        pass  # nothing beyond the step


class ShardBatches:
    """Batches of a `ShardStream`, one stream per data-loader worker, with the positions needed to resume exactly.

    The loader is not passed through `accelerator.prepare`: the stream splits the shards across processes itself
    (Accelerate would make every process read all of them, or the main process read for all).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        stream: ShardStream,
        batch_size: int,
        num_workers: int,
        worker_init_fn: Callable[[int], None] | None = None,
    ) -> None:
        self.stream, self.device = stream, accelerator.device
        self.processes, self.workers = accelerator.num_processes, max(1, num_workers)
        stream.check_streams(self.workers)  # here, before any model is built, rather than in the workers
        self.loader = DataLoader(
            stream,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate_stream,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=worker_init_fn,
        )
        self.positions: dict[int, tuple[int, int, int]] = {}
        self.next_stream = 0
        self.steps_per_epoch = None  # a stream has no length
        self.epoch = 0

    def batches(self, global_step: int) -> Iterator[dict[str, Any]]:
        """Endless batches from the saved positions on (`global_step` is not needed: positions are saved)."""
        # The loader takes batches from its workers in turn, worker 0 first; rotating which stream each worker
        # runs makes the stream that was next before the checkpoint next again.
        self.stream.start, self.stream.rotation = dict(self.positions), self.next_stream
        for batch in self.loader:
            self.positions[batch["stream"]] = tuple(batch["position"])
            self.next_stream = (batch["stream"] + 1) % self.workers
            self.epoch = min(position[0] for position in self.positions.values())
            batch["pixel_values"] = batch["pixel_values"].to(self.device, non_blocking=True)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        positions = {str(s): list(p) for s, p in self.positions.items()}
        return {
            "processes": self.processes,
            "workers": self.workers,
            "positions": positions,
            "next": self.next_stream,
        }

    def load_state_dict(
        self, state: dict[str, Any] | None, all_states: Sequence[dict[str, Any]] = ()
    ) -> None:
        """Resume at `state` (this process's), or, saved with another number of processes or workers, at the
        start of the earliest epoch in `all_states` (every process's)."""
        if state is not None and (state["processes"], state["workers"]) == (self.processes, self.workers):
            self.positions = {int(s): tuple(p) for s, p in state["positions"].items()}
            self.next_stream = state["next"]
            return
        epochs = [p[0] for saved in all_states for p in saved.get("positions", {}).values()]
        epoch = min(epochs, default=0)
        self.positions = {s: (epoch, 0, 0) for s in range(self.workers)}
        self.next_stream = 0
        logger.warning(
            f"the stream positions were saved for another number of processes or data-loader workers; every "
            f"stream restarts at the beginning of epoch {epoch}"
        )


@dataclass(frozen=True)
class DataSettings:
    """What the data layer needs to know of a training run (`TrainConfig.data_settings()` fills it); each field is
    the training flag of the same name."""

    resolution: int = 256
    train_batch_size: int = 12
    train_data_dir: str | None = None
    dataset_name: str | None = None
    image_column: str = "image"
    val_data_dir: str | None = None
    train_shards: str | None = None
    shuffle_buffer: int = 1000
    resize_to: int | None = None
    center_crop: bool = False
    random_flip: bool = True
    random_hue: float = 0.0
    synthetic_colour_images: int = 0
    cache_images: bool = False
    max_bad_fraction: float = 0.1
    dataloader_num_workers: int = 0
    gradient_accumulation_steps: int = 1
    max_train_steps: int | None = None
    num_validation_images: int = 16
    scaling_factor_images: int = 512
    seed: int = 0


@dataclass
class TrainingData:
    """What `build_training_data` returns: the batches, validation and statistics images, and the logs."""

    settings: DataSettings
    batches: FolderBatches | ShardBatches
    val: Sequence[ImageSource]
    stats: Sequence[ImageSource]
    skip_log: SkipLog
    monitor: BadDataMonitor
    description: str

    def validation_set(self) -> Subset:
        """The first `num_validation_images` validation images, center crops at the training resolution."""
        return self._crops(self.val, self.settings.num_validation_images)

    def statistics_set(self) -> Subset:
        """The first `scaling_factor_images` training images (center crops), for the latent statistics."""
        return self._crops(self.stats, self.settings.scaling_factor_images)

    def _crops(self, sources: Sequence[ImageSource], count: int) -> Subset:
        s = self.settings
        images = ImageDataset(
            sources,
            s.resolution,
            train=False,
            resize_to=s.resize_to,
            cache=s.cache_images,
            skip_log=self.skip_log,
        )
        return Subset(images, range(min(count, len(images))))


def build_training_data(
    settings: DataSettings, accelerator: Accelerator, worker_init_fn: Callable[[int], None] | None = None
) -> TrainingData:
    """The training data `settings` name: `train_shards`, else a folder / dataset / the bundled photographs
    (`load_image_data`). Fails here, before any model is built, on unusable data.

    Args:
        settings: the run's data settings.
        accelerator: the run's `Accelerator` (processes, device, main process first).
        worker_init_fn: run in each data-loader worker as it starts (training passes one that leaves stop
            signals to the main process).
    """
    cfg = settings
    if cfg.train_shards:
        return _shard_data(cfg, accelerator, worker_init_fn)
    with accelerator.main_process_first():
        data = load_image_data(
            train_data_dir=cfg.train_data_dir,
            dataset_name=cfg.dataset_name,
            image_column=cfg.image_column,
            val_data_dir=cfg.val_data_dir,
            seed=cfg.seed,
            max_bad_fraction=cfg.max_bad_fraction,
        )
    train = data.train
    if cfg.synthetic_colour_images > 0:
        if cfg.dataset_name:
            raise ValueError(
                "--synthetic_colour_images adds images to a folder or the bundled photographs, not to --dataset_name"
            )
        train = [*train, *colour_images(cfg.synthetic_colour_images, seed=cfg.seed)]
        data.description += (
            f" Plus {cfg.synthetic_colour_images} synthetic colour images (--synthetic_colour_images)."
        )
    crops = ImageDataset(
        train,
        cfg.resolution,
        True,
        data.skip_log,
        resize_to=cfg.resize_to,
        cache=cfg.cache_images,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        random_hue=cfg.random_hue,
    )
    images_per_step = cfg.train_batch_size * accelerator.num_processes
    if len(crops) < images_per_step:
        raise ValueError(
            f"{len(crops)} training images cannot fill one step of {cfg.train_batch_size} images x "
            f"{accelerator.num_processes} processes; lower --train_batch_size or add images"
        )
    batches = FolderBatches(
        accelerator,
        EpochSeededDataset(crops, cfg.seed),
        cfg.train_batch_size,
        cfg.dataloader_num_workers,
        cfg.gradient_accumulation_steps,
        worker_init_fn,
    )
    where = cfg.train_data_dir or cfg.dataset_name or "the bundled photographs"
    monitor = BadDataMonitor(data.skip_log, cfg.max_bad_fraction, str(where))
    description = f"{data.description}\nvalidation images: {', '.join(data.val_names)}"
    return TrainingData(cfg, batches, data.val, data.train, data.skip_log, monitor, description)


def _shard_data(
    cfg: DataSettings, accelerator: Accelerator, worker_init_fn: Callable[[int], None] | None
) -> TrainingData:
    if cfg.train_data_dir or cfg.dataset_name:
        raise ValueError("Give one data source: --train_shards, --train_data_dir or --dataset_name.")
    if cfg.max_train_steps is None:
        raise ValueError("A stream of shards has no length: give --max_train_steps with --train_shards.")
    urls = expand_shards(cfg.train_shards)
    skip_log = SkipLog()
    missing = {url: "missing" for url in urls if is_local(url) and not Path(local_path(url)).is_file()}
    error = too_many_bad_images(missing, len(urls), cfg.max_bad_fraction, f"shards {cfg.train_shards}")
    if error is not None:
        raise error
    skip_log.merge(missing.items())
    urls = [url for url in urls if url not in missing]
    held_out = 0 if cfg.val_data_dir else cfg.num_validation_images
    first = first_images(urls, held_out + cfg.scaling_factor_images, skip_log)
    if cfg.val_data_dir:
        with accelerator.main_process_first():
            val = load_image_data(
                train_data_dir=cfg.val_data_dir, val_count=0, max_bad_fraction=cfg.max_bad_fraction
            ).train
        val_note = f"validation images from {cfg.val_data_dir}"
    else:
        val = first[:held_out]
        val_note = "the first of them held out for validation"
    stream = ShardStream(
        urls,
        cfg.resolution,
        resize_to=cfg.resize_to,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        random_hue=cfg.random_hue,
        seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        exclude=frozenset(image.name for image in val if not cfg.val_data_dir),
    )
    batches = ShardBatches(
        accelerator, stream, cfg.train_batch_size, cfg.dataloader_num_workers, worker_init_fn
    )
    monitor = BadDataMonitor(skip_log, cfg.max_bad_fraction, f"shards {cfg.train_shards}")
    description = (
        f"{len(urls)} shards ({cfg.train_shards}) streamed by {batches.processes} processes x {batches.workers} "
        f"workers, shuffled in blocks of >= {cfg.shuffle_buffer} samples; {len(val)} {val_note}; "
        f"{skip_log.summary()}"
    )
    return TrainingData(cfg, batches, val, first[held_out:] or val, skip_log, monitor, description)
