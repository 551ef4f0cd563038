"""WebDataset shards: `make_shards` / `latentvae make-shards`, and `ShardStream` (split, shuffle, broken samples,
exact resume), then training on shards end to end.

Oracles: Python's `tarfile` (what a shard holds), the source files' bytes, the set arithmetic of the split, an
uninterrupted stream (resume equality), a straight training run (resume equality of the weights).
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_data_zoo import save_rgb
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from train_helpers import assert_identical, reset_accelerate

from latentvae.cli import main as cli_main
from latentvae.data.shards import (
    ShardStream,
    collate_stream,
    expand_shards,
    first_images,
    make_shards,
    shard_pattern,
)
from latentvae.data.skips import SkipLog


@pytest.fixture(autouse=True)
def clean_accelerate_state():
    yield
    reset_accelerate()


def tar_members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def png_bytes(seed: int, size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
        buffer, "PNG"
    )
    return buffer.getvalue()


@pytest.fixture
def shards(tmp_path) -> list[str]:
    """8 shards of 3 samples each, named s<shard>-<i>."""
    urls = []
    for shard in range(8):
        path = tmp_path / f"shard-{shard:06d}.tar"
        write_tar(path, {f"s{shard}-{i}.png": png_bytes(10 * shard + i) for i in range(3)})
        urls.append(str(path))
    return urls


def key(name: str) -> str:
    return name.rsplit("#", 1)[1]


# -- writing shards -------------------------------------------------------------------------------------------------


def test_make_shards_stores_every_good_file_unchanged(tmp_path):
    source = tmp_path / "photos"
    (source / "cats" / "v1.2").mkdir(parents=True)
    files = {
        "a.png": save_rgb(source / "a.png", seed=1),
        "b.jpg": save_rgb(source / "b.jpg", seed=2),
        "cats/v1.2/c.d.png": save_rgb(source / "cats" / "v1.2" / "c.d.png", seed=3),
        "cats/x.png": save_rgb(source / "cats" / "x.png", seed=4),
        "cats/x.webp": save_rgb(source / "cats" / "x.webp", seed=5),  # same key stem as x.png
    }
    (source / "broken.png").write_text("not an image")
    written, skipped = make_shards(source, tmp_path / "out", shard_size=2)
    assert [p.name for p in written] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert skipped.reasons == {str(source / "broken.png"): "not_an_image"}

    members = {}
    for shard in written:
        content = tar_members(shard)
        assert len(content) <= 2 * 2  # an image and its .json per sample
        members.update(content)
    stored = {}
    for name, data in members.items():
        if name.endswith(".json"):
            path = json.loads(data)["path"]
            image = [m for m in members if m.rsplit(".", 1)[0] == name.rsplit(".", 1)[0] and m != name]
            stored[path] = members[image[0]]
            assert (
                "." not in image[0].rsplit("/", 1)[-1].rsplit(".", 1)[0]
            )  # one dot: WebDataset's key | extension
    assert stored == {path: (source / path).read_bytes() for path in files}
    assert expand_shards(shard_pattern(written)) == [str(p) for p in written]


def test_make_shards_command_line(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "empty").mkdir()
    for i in range(3):
        save_rgb(tmp_path / "in" / f"{i}.png", seed=i)
    assert cli_main(["make-shards", str(tmp_path / "in"), str(tmp_path / "out"), "--shard_size", "2"]) == 0
    out = capsys.readouterr().out
    assert f"--train_shards '{tmp_path / 'out'}/shard-{{000000..000001}}.tar'" in out
    # A folder that already holds shards is refused (exit 2, one line), as is a source without images.
    assert cli_main(["make-shards", str(tmp_path / "in"), str(tmp_path / "out")]) == 2
    assert "already holds shards" in capsys.readouterr().err
    assert cli_main(["make-shards", str(tmp_path / "empty"), str(tmp_path / "out2")]) == 2
    assert "No usable image" in capsys.readouterr().err
    assert not list((tmp_path / "out2").glob("*.tar"))


# -- streaming ------------------------------------------------------------------------------------------------------


def stream_items(stream: ShardStream, workers: int, count: int) -> list[dict]:
    loader = DataLoader(stream, batch_size=1, num_workers=workers, collate_fn=collate_stream)
    items = []
    for batch in loader:
        items.append({k: batch[k] for k in ("path", "stream", "position", "skipped", "pixel_values")})
        if len(items) == count:
            return items
    raise AssertionError("the stream ended")


def test_processes_and_workers_read_disjoint_shards_covering_each_epoch(shards):
    # 2 processes x 2 workers = 4 streams of 2 shards (6 samples) an epoch; 24 items a process = 2 epochs.
    per_stream = defaultdict(list)
    for rank in (0, 1):
        stream = ShardStream(shards, 8, seed=3, shuffle_buffer=4, rank=rank, world_size=2)
        for item in stream_items(stream, workers=2, count=24):
            per_stream[rank, item["stream"]].append((item["position"][0], key(item["path"][0])))
    assert len(per_stream) == 4 and all(len(v) == 12 for v in per_stream.values())
    every = {f"s{shard}-{i}" for shard in range(8) for i in range(3)}
    for epoch in (0, 1):
        seen = [{k for e, k in items if e == epoch} for items in per_stream.values()]
        assert set().union(*seen) == every and sum(map(len, seen)) == len(every)  # disjoint, complete
        for keys in seen:  # whole shards per stream
            assert len({k.split("-")[0] for k in keys}) == 2
    # A new shard assignment each epoch, and samples not in tar order.
    shards_by_epoch = [
        [{k.split("-")[0] for e, k in items if e == epoch} for items in per_stream.values()]
        for epoch in (0, 1)
    ]
    assert shards_by_epoch[0] != shards_by_epoch[1]
    orders = [[k for e, k in items if e == 0] for items in per_stream.values()]
    assert any(order != sorted(order, key=lambda k: (int(k[1:].split("-")[0]), k)) for order in orders)


def test_too_few_shards_for_the_streams_is_a_clear_error(shards):
    stream = ShardStream(shards[:3], 8, rank=0, world_size=2)
    with pytest.raises(ValueError, match="3 shards cannot feed 2 processes x 2 data-loader workers"):
        stream.check_streams(2)  # as ShardBatches does before training starts
    stream.check_streams(1)  # 3 shards for 2 processes x 1 stream


def test_broken_samples_and_shards_are_skipped_and_reported(tmp_path, shards):
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(jpeg, "JPEG")
    write_tar(
        tmp_path / "shard-000008.tar",
        {
            "good.png": png_bytes(99),
            "text.png": b"this is not a picture",
            "cut.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
            "nopicture.json": b"{}",
        },
    )
    # A shard cut off in the middle of its first image: tar header (512 bytes) + half the image.
    (tmp_path / "shard-000009.tar").write_bytes(Path(shards[0]).read_bytes()[: 512 + len(png_bytes(0)) // 2])
    urls = [*shards[1:], str(tmp_path / "shard-000008.tar"), str(tmp_path / "shard-000009.tar")]
    urls.append(str(tmp_path / "shard-000010.tar"))  # missing
    stream = ShardStream(urls, 8, seed=0, shuffle_buffer=1)
    items = list(zip(range(40), stream.samples(0, 1, (0, 0, 0)), strict=False))
    epoch0 = [item for _, item in items if item["position"][0] == 0]
    # (the last shard's report rides on the next sample, which may be the next epoch's first)
    skipped = {name: reason for _, item in items for name, reason in item["skipped"]}
    shard8 = str(tmp_path / "shard-000008.tar")
    assert skipped == {
        f"{shard8}#text": "not_an_image",
        f"{shard8}#cut": "truncated",
        f"{shard8}#nopicture": "not_an_image",
        str(tmp_path / "shard-000010.tar"): "missing",
        str(tmp_path / "shard-000009.tar"): "truncated",
    }
    used = {key(item["path"]) for item in epoch0}
    assert {f"s{s}-{i}" for s in range(1, 8) for i in range(3)} | {"good"} <= used
    assert all(item["pixel_values"].shape == (3, 8, 8) for item in epoch0)
    assert stream.skip_log.reasons == skipped  # each warned once (the log warns on a name's first record)


def test_first_images_and_held_out_samples(shards):
    log = SkipLog()
    first = first_images(shards, 4, log)
    assert [key(image.name) for image in first] == ["s0-0", "s0-1", "s0-2", "s1-0"]
    assert first[0].data == tar_members(Path(shards[0]))["s0-0.png"]
    stream = ShardStream(shards, 8, exclude=frozenset(image.name for image in first))
    names = {item["path"] for _, item in zip(range(20), stream.samples(0, 1, (0, 0, 0)), strict=False)}
    assert len(names) == 20 and not names & {image.name for image in first}


@pytest.mark.parametrize("consumed", [3, 5, 8])  # within a block, at a block's end, in the second epoch
def test_resumed_batches_equal_the_uninterrupted_stream(shards, consumed):
    from accelerate import Accelerator

    from latentvae.data.loaders import ShardBatches

    accelerator = Accelerator(cpu=True)

    def batches(state: dict | None, count: int) -> tuple[list, dict]:
        stream = ShardStream(shards, 8, seed=1, shuffle_buffer=4)
        source = ShardBatches(accelerator, stream, batch_size=2, num_workers=2)
        if state is not None:
            source.load_state_dict(state)
        taken = [b for _, b in zip(range(count), source.batches(0), strict=False)]
        return taken, source.state_dict()

    straight, _ = batches(None, consumed + 4)
    _, state = batches(None, consumed)
    resumed, _ = batches(json.loads(json.dumps(state)), 4)  # through JSON, as in a checkpoint
    for a, b in zip(straight[consumed:], resumed, strict=True):
        assert a["path"] == b["path"]
        assert torch.equal(a["pixel_values"], b["pixel_values"])


# -- training on shards ---------------------------------------------------------------------------------------------


def test_training_on_shards_resumes_exactly(tmp_path):
    from test_train import base_flags, write_images

    write_images(tmp_path / "images" / "train", 16, seed=1)
    write_images(tmp_path / "images" / "val", 2, seed=2)
    written, _ = make_shards(tmp_path / "images" / "train", tmp_path / "shards", shard_size=2)
    flags = [
        "--train_shards", shard_pattern(written), "--dataloader_num_workers", "2", "--shuffle_buffer", "3",
        "--max_train_steps", "6", "--checkpointing_steps", "3", "--ema_decay", "0.9",
    ]  # fmt: skip
    image_dirs = (tmp_path / "images" / "train", tmp_path / "images" / "val")

    def run(output: Path, *extra: str) -> None:
        from latentvae.training.config import parse_config
        from training.train import main

        all_flags = base_flags(image_dirs, output) + flags + list(extra)
        at = all_flags.index("--train_data_dir")
        del all_flags[at : at + 2]  # the shards replace the folder
        try:
            main(*parse_config(all_flags))
        finally:
            reset_accelerate()

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight)
    state = json.loads((straight / "checkpoint-3" / "process-0.json").read_text())["data"]
    assert state["workers"] == 2 and set(state["positions"]) == {"0", "1"}
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    run(resumed, "--resume_from_checkpoint", "latest")
    assert_identical(
        load_file(resumed / "final" / "diffusion_pytorch_model.safetensors"),
        load_file(straight / "final" / "diffusion_pytorch_model.safetensors"),
    )


def test_resuming_with_another_worker_count_restarts_the_earliest_epoch(shards, caplog):
    from accelerate import Accelerator

    from latentvae.data.loaders import ShardBatches

    saved = [
        {"processes": 2, "workers": 2, "positions": {"0": [3, 1, 2], "1": [2, 4, 1]}, "next": 1},
        {"processes": 2, "workers": 2, "positions": {"0": [3, 0, 5], "1": [4, 0, 1]}, "next": 0},
    ]
    source = ShardBatches(Accelerator(cpu=True), ShardStream(shards, 8), batch_size=2, num_workers=1)
    with caplog.at_level("WARNING"):
        source.load_state_dict(None, saved)  # this process saved nothing (there were 2, now 1)
    assert source.positions == {0: (2, 0, 0)} and source.next_stream == 0
    assert "beginning of epoch 2" in caplog.text
    batch = next(iter(source.batches(0)))
    assert batch["position"][0] == 2  # no sample of epoch 2 is skipped
