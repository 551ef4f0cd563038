"""WebDataset tar shards: writing them from an image folder, and streaming them into training on many machines.

    latentvae make-shards photos/ shards/ --shard_size 1000   # -> shards/shard-000000.tar, shard-000001.tar, ...
    accelerate launch training/train.py --train_shards 'shards/shard-{000000..000041}.tar' --max_train_steps ...

A shard is a plain tar file (the WebDataset format, read with the `webdataset` library): each sample is the files
sharing a key, here one image `<key>.<ext>` (other fields, e.g. `.json` or `.txt`, are ignored). Shards can be local
paths, `file:`/`http(s)://` URLs or `pipe:` commands (e.g. `pipe:aws s3 cp s3://bucket/shard-000001.tar -`).

How `ShardStream` orders samples (all of it a function of `--seed` and positions, nothing of timing):
- every process runs `W = max(1, --dataloader_num_workers)` streams, one per data-loader worker; stream `s` of
  process `r` is stream `g = r * W + s` of `G = processes * W`;
- in epoch `e` the shards are permuted with seed `(seed, e)` and stream `g` reads shards `g, g + G, g + 2G, ...`
  of that order, so processes and workers read disjoint shards and each shard once per epoch;
- shuffling: whole shards are read into a buffer until it holds at least `--shuffle_buffer` samples (a "block"),
  which is permuted with seed `(seed, e, g, block)` and emitted; crops are seeded by the sample's position;
- a stream never ends: after its shards it starts the next epoch. Every process therefore always has batches
  (no process waits for another at an epoch's end), and training length is `--max_train_steps`;
- broken samples (undecodable image, no image in the sample) and broken shards (missing, unreadable, cut short)
  are skipped with one warning each and reported with the batch (`"skipped"`), like broken files in a folder.

Resume guarantee: each batch carries its stream's position `(epoch, block, offset)` after it; the training loop
saves, per process, the position of every stream and which stream comes next. A run resumed from a checkpoint
with the same shards, `--seed`, `--shuffle_buffer`, number of processes and `--dataloader_num_workers` sees exactly
the samples, in the same order, with the same crops, as the run that was never interrupted (tested); resuming
re-reads only the current block of each stream. This assumes every shard reads back the same bytes (a shard that
failed transiently, e.g. a network error, changes what follows). With a different number of processes or workers
the streams restart at the beginning of the earliest epoch any stream had reached: no sample of that epoch is
skipped, but the samples that epoch had already used are seen again.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander
from webdataset.writer import ShardWriter

from latentvae.data.images import (
    IMAGE_EXTENSIONS,
    BadImageError,
    ImageBytes,
    ImageDataset,
    collate_images,
    failure_reason,
    load_rgb,
    probe_image,
)
from latentvae.data.seeding import derived_seed
from latentvae.data.skips import SkipLog
from latentvae.data.sources import find_images

SHARD_PATTERN = "shard-%06d.tar"
IMAGE_FIELDS = tuple(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)  # "jpg", "png", ...
Position = tuple[int, int, int]  # (epoch, block, samples of the block already emitted)


def expand_shards(pattern: str) -> list[str]:
    """The shard URLs a pattern names: braces (`{000000..000099}`), `::`-separated lists, environment variables.

    Raises:
        FileNotFoundError: If the pattern names no shard, or names local files none of which exists.
    """
    urls = expand_urls(pattern)
    local = [url for url in urls if is_local(url)]
    if not urls or (
        local and len(local) == len(urls) and not any(os.path.isfile(local_path(u)) for u in local)
    ):
        raise FileNotFoundError(
            f"--train_shards {pattern!r} names no existing shard; give a brace pattern such as "
            "'shards/shard-{000000..000041}.tar' (make-shards prints the one for its shards)."
        )
    return urls


def is_local(url: str) -> bool:
    return url.startswith("file:") or ("://" not in url and not url.startswith("pipe:"))


def local_path(url: str) -> str:
    """The file system path of a local shard URL (a plain path or a `file:` URL)."""
    return urlparse(url).path if url.startswith("file:") else url


def read_shard(url: str) -> Iterator[tuple[str, bytes | None]]:
    """`(name, encoded image)` of each sample of one shard, in tar order; the image is None if the sample has
    none. Names are `<url>#<key>`. Errors of the shard itself (missing, unreadable, cut short) are raised."""
    with gopen(url) as stream:
        for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
            field = next((key for key in sample if key.lower() in IMAGE_FIELDS), None)
            yield f"{url}#{sample['__key__']}", None if field is None else sample[field]


def sample_image(name: str, data: bytes | None) -> ImageBytes:
    """A sample's image as `ImageBytes`; a sample without one is a `BadImageError` ("not_an_image")."""
    if data is None:
        raise BadImageError(name, "not_an_image", f"no image file ({', '.join(IMAGE_FIELDS)}) in the sample")
    return ImageBytes(name, data)


def first_images(urls: Sequence[str], count: int, skip_log: SkipLog) -> list[ImageBytes]:
    """The first `count` samples whose headers read (`probe_image`), reading shards in the given order.

    Used for the validation images and the latent-statistics images of a streamed run; broken samples and
    shards are recorded in `skip_log`.
    """
    found: list[ImageBytes] = []
    for url in urls if count > 0 else ():
        try:
            for name, data in read_shard(url):
                try:
                    image = sample_image(name, data)
                    probe_image(image)
                except BadImageError as exc:
                    skip_log.record(exc.name, exc.reason)
                    continue
                found.append(image)
                if len(found) == count:
                    return found
        except Exception as exc:  # the shard itself is broken: keep what it gave, go on with the next one
            skip_log.record(url, failure_reason(exc))
    return found


def sample_key(relative: Path, taken: set[str]) -> str:
    """A WebDataset key for an image at `relative` path: the path without its extension, with the dots that
    WebDataset would read as extension separators replaced by `_`; `_2`, `_3`, ... make it unique."""
    stem = relative.with_suffix("").as_posix().replace(".", "_")
    key, n = stem, 1
    while key in taken:
        n += 1
        key = f"{stem}_{n}"
    taken.add(key)
    return key


def make_shards(
    image_dir: str | os.PathLike, out_dir: str | os.PathLike, shard_size: int = 1000, verify: bool = False
) -> tuple[list[Path], SkipLog]:
    """Write the images of a folder (recursively, as training finds them) into WebDataset tar shards.

    Each image is stored as it is in its file (no re-encoding) under a key made from its relative path, with a
    `<key>.json` holding that path. Broken images are left out with one warning each.

    Args:
        image_dir: The folder of images.
        out_dir: An empty or new folder for `shard-000000.tar`, `shard-000001.tar`, ...
        shard_size: Images per shard. About 1,000 images (a few hundred MB) is a common choice; there must be at
            least as many shards as processes x data-loader workers that will read them.
        verify: Decode every image fully (slow; catches cut-off JPEGs, which a header check passes).

    Returns:
        The shards written and the log of the images left out.
    """
    if shard_size < 1:
        raise ValueError(f"--shard_size must be at least 1, got {shard_size}.")
    root, out = Path(image_dir), Path(out_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder of images.")
    if out.is_dir() and any(out.glob("shard-*.tar")):
        raise FileExistsError(f"{out} already holds shards; give an empty or new folder.")
    out.mkdir(parents=True, exist_ok=True)
    skip_log, taken = SkipLog(), set()
    check = load_rgb if verify else probe_image
    writer = ShardWriter(str(out / SHARD_PATTERN), maxcount=shard_size, verbose=0)
    try:
        for path in find_images(root):
            try:
                check(path)
                data = path.read_bytes()
            except BadImageError as exc:
                skip_log.record(exc.name, exc.reason)
                continue
            except OSError as exc:
                skip_log.record(str(path), failure_reason(exc))
                continue
            relative = path.relative_to(root)
            extension = path.suffix.lower().lstrip(".")
            meta = json.dumps({"path": relative.as_posix()}).encode()
            writer.write({"__key__": sample_key(relative, taken), extension: data, "json": meta})
    finally:
        writer.close()
    shards = sorted(out.glob("shard-*.tar"))
    if not taken:
        for shard in shards:  # the writer opens its first shard before any sample arrives
            shard.unlink()
        raise ValueError(f"No usable image in {root} ({skip_log.summary()}).")
    return shards, skip_log


def shard_pattern(shards: Sequence[Path]) -> str:
    """The brace pattern naming `shards` written by `make_shards`, for `--train_shards`."""
    first, last = (int(re.search(r"(\d+)\.tar$", p.name).group(1)) for p in (shards[0], shards[-1]))
    return str(shards[0].parent / f"shard-{{{first:06d}..{last:06d}}}.tar")


class ShardStream(torch.utils.data.IterableDataset):
    """An endless, seeded stream of training crops from WebDataset shards, split across processes and
    data-loader workers (see the module docstring for the order and the resume guarantee).

    Args:
        urls: The shards (`expand_shards`).
        resolution: Side of the square crops.
        resize_to: Shorter side before cropping (default `resolution`), as in `ImageDataset`.
        center_crop, random_flip, random_hue: The crops, as in `ImageDataset`.
        seed: The run's seed.
        shuffle_buffer: Samples shuffled together (whole shards are read until at least this many).
        rank, world_size: This process and the number of processes.
        exclude: Sample names (`<url>#<key>`) left out, e.g. held-out validation images.

    Set `start` (stream -> position) and `rotation` (which stream the first worker runs) before iterating to
    resume. Items are `ImageDataset`'s, plus `"stream"` and `"position"`.
    """

    def __init__(
        self,
        urls: Sequence[str],
        resolution: int,
        resize_to: int | None = None,
        center_crop: bool = False,
        random_flip: bool = True,
        random_hue: float = 0.0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int = 0,
        world_size: int = 1,
        exclude: frozenset[str] = frozenset(),
    ) -> None:
        self.urls, self.seed, self.shuffle_buffer = list(urls), seed, max(1, shuffle_buffer)
        self.rank, self.world_size, self.exclude = rank, world_size, exclude
        self.crops = ImageDataset(
            [],
            resolution,
            train=True,
            resize_to=resize_to,
            center_crop=center_crop,
            random_flip=random_flip,
            random_hue=random_hue,
        )
        self.skip_log = SkipLog()
        self.start: dict[int, Position] = {}
        self.rotation = 0

    def shards_of(self, epoch: int, stream: int, streams: int) -> list[str]:
        """The shards global stream `rank * streams + stream` reads in `epoch`, in order."""
        order = np.random.default_rng(derived_seed(self.seed, epoch)).permutation(len(self.urls))
        total = self.world_size * streams
        return [self.urls[i] for i in order[self.rank * streams + stream :: total]]

    def check_streams(self, streams: int) -> None:
        """Raise a `ValueError` unless every one of `streams` streams per process gets at least one shard."""
        if len(self.urls) < self.world_size * streams:
            raise ValueError(
                f"{len(self.urls)} shards cannot feed {self.world_size} processes x {streams} data-loader "
                "workers (each needs its own shards); write smaller shards or use fewer workers."
            )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        streams, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        self.check_streams(streams)
        stream = (worker + self.rotation) % streams
        return self.samples(stream, streams, self.start.get(stream, (0, 0, 0)))

    def samples(self, stream: int, streams: int, start: Position) -> Iterator[dict[str, Any]]:
        """Stream `stream` of `streams` of this process from position `start` on, endlessly."""
        epoch, block, offset = start
        global_stream = self.rank * streams + stream
        skipped: list[tuple[str, str]] = []  # broken samples and shards since the last emitted sample
        while True:
            shards, emitted, whole_epoch = self.shards_of(epoch, stream, streams), 0, block == offset == 0
            while block < len(shards):
                raw, end, broken_shards = self._read_block(shards, block)
                if offset == 0:  # else reported before the checkpoint already
                    skipped += broken_shards
                order = np.random.default_rng(derived_seed(self.seed, epoch, global_stream, block))
                order = order.permutation(len(raw))
                for k in range(offset, len(raw)):
                    name, data = raw[order[k]]
                    try:
                        with torch.random.fork_rng(devices=[]):
                            torch.manual_seed(derived_seed(self.seed, epoch, global_stream, block, k))
                            pixels = self.crops.crop(load_rgb(sample_image(name, data)))
                    except BadImageError as exc:
                        self.skip_log.record(exc.name, exc.reason)
                        skipped.append((exc.name, exc.reason))
                        continue
                    emitted += 1
                    position = (epoch, block, k + 1)
                    yield {"pixel_values": pixels, "path": name, "skipped": tuple(skipped), "stream": stream,
                           "position": position}  # fmt: skip
                    skipped = []
                block, offset = end, 0
            if emitted == 0 and whole_epoch:
                raise RuntimeError(
                    f"No usable sample in a whole epoch of stream {global_stream} ({len(shards)} shards, e.g. "
                    f"{shards[0]}): {self.skip_log.summary()}."
                )
            epoch, block = epoch + 1, 0

    def _read_block(self, shards: list[str], first: int) -> tuple[list[tuple[str, bytes | None]], int, list]:
        """Whole shards from `shards[first]` on until `shuffle_buffer` samples are read; returns the samples, the
        index of the next block's first shard and `(name, reason)` of broken shards."""
        raw, broken, index = [], [], first
        while index < len(shards) and (index == first or len(raw) < self.shuffle_buffer):
            try:
                for name, data in read_shard(shards[index]):
                    if name not in self.exclude:
                        raw.append((name, data))
            except Exception as exc:  # missing, unreadable or cut short: keep what it gave, go on
                reason = failure_reason(exc)
                self.skip_log.record(shards[index], reason)
                broken.append((shards[index], reason))
            index += 1
        return raw, index, broken


def collate_stream(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """`collate_images` for `ShardStream` items; the batch keeps the stream and the position of its last sample
    (a worker's batch is consecutive samples of its one stream)."""
    batch = collate_images(samples)
    batch["stream"], batch["position"] = samples[-1]["stream"], samples[-1]["position"]
    return batch
