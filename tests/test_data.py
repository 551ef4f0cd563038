"""Data pipeline: decoding odd and broken images, finding files, the crop dataset, splits and data sources.

Every image is built here, in tmp_path, with PIL / numpy / tifffile or by hand-writing PNG bytes; expected
pixels come from the formats' definitions (EXIF orientation table, CMYK and alpha formulas), not from the code.
"""

import colorsys
import logging
import os
import resource
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_data_zoo import handmade_png, permissions_enforced, random_rgb, run_as_nobody, save_rgb, write_broken
from PIL import Image

from latentvae.data.images import (
    BadImageError,
    ImageBytes,
    ImageDataset,
    collate_images,
    load_rgb,
    probe_image,
)
from latentvae.data.skips import SkipLog
from latentvae.data.sources import (
    ImageData,
    embedded_colour_images,
    embedded_images,
    find_images,
    load_hf_images,
    load_image_data,
    split_train_val,
    validate_images,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def unprivileged():
    """A folder, and a runner in which permission bits apply: directly where they bind this user, else (root
    bypasses them) in a child process running as `nobody`. The folder is world-readable so that `nobody` meets
    exactly the permissions a test sets."""
    folder = Path(tempfile.mkdtemp(prefix="latentvae-permissions-"))
    folder.chmod(0o755)
    if permissions_enforced(folder):
        runner = lambda fn, *args: fn(*args)  # noqa: E731
    elif os.geteuid() == 0:
        runner = run_as_nobody
    else:
        pytest.skip("permissions are not enforced for this user, who cannot switch to another")
    yield folder, runner
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755)
    shutil.rmtree(folder)


# ---------------------------------------------------------------- decoding to 8-bit RGB


def test_gray_and_bilevel_become_equal_channels(tmp_path):
    gray = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(gray >= 128).save(tmp_path / "bilevel.png")  # mode "1"
    rgb = np.asarray(load_rgb(tmp_path / "gray.png"))
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    assert (rgb == gray[..., None]).all()
    bilevel = np.asarray(load_rgb(tmp_path / "bilevel.png"))
    assert (bilevel == np.where(gray >= 128, 255, 0)[..., None]).all()


def test_rgba_and_la_composited_on_white(tmp_path):
    colour = np.array([200, 40, 10])
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[..., :3] = colour
    rgba[0, :, 3], rgba[1, :, 3], rgba[2, :, 3] = 0, 128, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = np.asarray(load_rgb(tmp_path / "rgba.png")).astype(float)
    assert (out[0] == 255).all()  # fully transparent -> the white background, not the stored colour
    assert np.abs(out[1] - (colour * 128 / 255 + 255 * (1 - 128 / 255))).max() <= 1  # alpha blend
    assert (out[2] == colour).all()

    la = np.stack([np.full((2, 2), 30, np.uint8), np.array([[0, 255], [0, 255]], np.uint8)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = np.asarray(load_rgb(tmp_path / "la.png"))
    assert (out[:, 0] == 255).all() and (out[:, 1] == 30).all()


def test_palette_with_transparent_index_is_white(tmp_path):
    image = Image.new("P", (4, 2))
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    image.save(tmp_path / "palette.png", transparency=0)
    out = np.asarray(load_rgb(tmp_path / "palette.png"))
    index = np.array([[0, 1, 0, 1], [1, 1, 0, 0]])
    assert (out[index == 0] == 255).all()
    assert (out[index == 1] == [10, 200, 30]).all()


def test_cmyk_jpeg_converted_to_rgb(tmp_path):
    inks = [(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 128)]
    cmyk = np.concatenate([np.full((32, 32, 4), ink, np.uint8) for ink in inks], axis=1)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    out = np.asarray(load_rgb(tmp_path / "cmyk.jpg")).astype(float)
    for i, (c, m, y, k) in enumerate(inks):
        # naive CMYK -> RGB: R = 255 (1 - C)(1 - K), and likewise G from M, B from Y
        expected = [255 * (1 - ink / 255) * (1 - k / 255) for ink in (c, m, y)]
        block = out[8:24, 32 * i + 8 : 32 * i + 24]  # away from the JPEG block edges between patches
        assert np.abs(block.mean(axis=(0, 1)) - expected).max() < 8, (i, block.mean(axis=(0, 1)), expected)


def test_16bit_gray_png_rescaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 1024).round().astype(np.uint16).reshape(1, -1)
    Image.fromarray(values).save(tmp_path / "gray16.png")  # PIL writes mode I;16 as a 16-bit PNG
    out = np.asarray(load_rgb(tmp_path / "gray16.png"))[0, :, 0].astype(int)
    assert out.min() == 0 and out.max() == 255
    assert (np.diff(out) >= 0).all()  # monotone
    assert len(np.unique(out)) == 256  # the full 8-bit range is used, not clipped to a few values
    assert np.abs(out - values[0] / 257).max() <= 0.5 + 1e-9  # v * 255 / 65535, rounded


def test_16bit_rgb_png_and_tiffs(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    ramp = np.linspace(0, 65535, 64).round().astype(np.uint16)
    rgb16 = np.stack([ramp, ramp[::-1], np.full_like(ramp, 32896)], -1)[None]  # 1 x 64 x 3
    rows = b"\x00" + rgb16.astype(">u2").tobytes()  # filter byte 0, big-endian samples
    (tmp_path / "rgb16.png").write_bytes(handmade_png(64, 1, 16, 2, rows))
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16)
    tifffile.imwrite(tmp_path / "gray16.tif", ramp[None])
    tifffile.imwrite(tmp_path / "float.tif", (ramp[None] / 65535).astype(np.float32))
    for name in ("rgb16.png", "rgb16.tif"):
        out = np.asarray(load_rgb(tmp_path / name)).astype(float)
        assert np.abs(out - rgb16 / 257).max() <= 1.0, name  # high byte or rounded v / 257: within 1
    for name in ("gray16.tif", "float.tif"):
        out = np.asarray(load_rgb(tmp_path / name))[0, :, 0].astype(float)
        assert np.abs(out - ramp / 257).max() <= 1.0, name


# EXIF orientation (TIFF 6.0 / EXIF 2.3): where the stored top-left and top-right pixels end up when displayed.
_ORIENTATION = {
    1: ("TL", "TR"),
    2: ("TR", "TL"),
    3: ("BR", "BL"),
    4: ("BL", "BR"),
    5: ("TL", "BL"),
    6: ("TR", "BR"),
    7: ("BR", "TR"),
    8: ("BL", "TL"),
}


@pytest.mark.parametrize("orientation", sorted(_ORIENTATION))
def test_exif_orientation_applied(tmp_path, orientation):
    stored = np.full((32, 64, 3), 128, np.uint8)  # 64 wide, 32 high
    stored[:8, :8] = (255, 0, 0)  # top-left: red
    stored[:8, -8:] = (0, 0, 255)  # top-right: blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    out = np.asarray(load_rgb(tmp_path / "photo.jpg")).astype(int)
    assert out.shape == ((32, 64, 3) if orientation <= 4 else (64, 32, 3))
    corners = {"TL": out[2, 2], "TR": out[2, -3], "BL": out[-3, 2], "BR": out[-3, -3]}
    red_at, blue_at = _ORIENTATION[orientation]
    assert corners[red_at][0] > 200 and corners[red_at][2] < 60
    assert corners[blue_at][2] > 200 and corners[blue_at][0] < 60


def test_bytes_source_decodes_like_a_file(tmp_path):
    pixels = save_rgb(tmp_path / "a.png")
    out = load_rgb(ImageBytes("row[0]", (tmp_path / "a.png").read_bytes()))
    assert (np.asarray(out) == pixels).all()


# ---------------------------------------------------------------- broken files


def test_each_broken_file_raises_with_its_reason(tmp_path):
    for name, reason in write_broken(tmp_path).items():
        with pytest.raises(BadImageError) as caught:
            load_rgb(tmp_path / name)
        assert caught.value.reason == reason and caught.value.name == str(tmp_path / name)
        assert name in str(caught.value)
    with pytest.raises(BadImageError, match="missing"):
        load_rgb(tmp_path / "gone.png")
    with pytest.raises(BadImageError, match="empty"):
        load_rgb(ImageBytes("row[3]", b""))


def test_decompression_bomb_rejected_without_allocating(tmp_path, monkeypatch):
    (tmp_path / "bomb.png").write_bytes(handmade_png(60000, 60000, 8, 2, b"\x00" * 100))  # 10.8 GB as RGB
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for check in (probe_image, load_rgb):
        with pytest.raises(BadImageError) as caught:
            check(tmp_path / "bomb.png")
        assert caught.value.reason == "too_large"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib < 200 * 1024  # < 200 MiB

    # Between 1x and 2x the limit PIL only warns; that is refused as well.
    (tmp_path / "big.png").write_bytes(handmade_png(10000, 10000, 8, 0, b"\x00" * 100))
    assert 10000 * 10000 > Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadImageError, match="too large"):
        probe_image(tmp_path / "big.png")
    # The limit is PIL's own setting, so users can raise or lower it.
    save_rgb(tmp_path / "small.png", 24, 32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 24 * 32 - 1)
    with pytest.raises(BadImageError, match="too large"):
        load_rgb(tmp_path / "small.png")


def _failure_reason(path: Path) -> str | None:
    try:
        load_rgb(path)
    except BadImageError as exc:
        return exc.reason
    return None


def test_unreadable_file_reported(unprivileged):
    folder, run = unprivileged
    save_rgb(folder / "locked.png")
    save_rgb(folder / "open.png")
    (folder / "locked.png").chmod(0)
    assert run(_failure_reason, folder / "locked.png") == "unreadable"
    assert run(_failure_reason, folder / "open.png") is None  # the same user reads an ordinary file


def test_broken_files_skipped_counted_and_warned_once(tmp_path, caplog):
    expected = write_broken(tmp_path)
    good = {f"good{i}.png": save_rgb(tmp_path / f"good{i}.png", 16, 16, seed=10 + i) for i in range(3)}
    data = load_image_data(train_data_dir=tmp_path, val_count=0, max_bad_fraction=1.0)
    # The header scan catches all but the truncated JPEG, whose header is intact.
    assert {Path(name).name: reason for name, reason in data.skip_log.reasons.items()} == {
        name: reason for name, reason in expected.items() if name != "cut.jpg"
    }
    assert sorted(Path(p).name for p in data.train) == sorted(["cut.jpg", *good])

    caplog.clear()
    dataset = ImageDataset(data.train, 16, train=False, skip_log=data.skip_log)
    with caplog.at_level(logging.WARNING, logger="latentvae"):
        samples = [dataset[i] for i in range(len(dataset))] + [dataset[0]]  # a second epoch's worth
    assert all(Path(sample["path"]).name in good for sample in samples)
    assert samples[0]["skipped"] == ((str(tmp_path / "cut.jpg"), "truncated"),)  # cut.jpg sorts first
    assert sum("cut.jpg" in record.getMessage() for record in caplog.records) == 1
    assert samples[-1]["skipped"] == ()  # known now: passed over silently, same replacement image
    assert samples[-1]["path"] == samples[0]["path"]
    assert data.skip_log.counts() == {"truncated": 2, "empty": 1, "not_an_image": 1, "too_large": 1}
    assert data.skip_log.summary().startswith("5 images skipped (2 truncated")


def test_more_broken_files_than_allowed_is_an_early_error_with_the_list(tmp_path):
    expected = write_broken(tmp_path)  # 5 files, 4 of them caught by the header scan
    for i in range(36):
        save_rgb(tmp_path / f"good{i:02d}.png", 8, 8, seed=i)
    # 4 of 41 files (9.8 %) are within the default 10 %.
    assert len(load_image_data(train_data_dir=tmp_path, val_count=0).skip_log) == 4
    (tmp_path / "good00.png").write_bytes(b"")  # 5 of 41 (12.2 %): too many
    with pytest.raises(ValueError, match=r"5 of 41 images .*12\.2 %.*--max_bad_fraction 0\.1") as caught:
        load_image_data(train_data_dir=tmp_path, val_count=0)
    message = str(caught.value)
    for name, reason in {**expected, "good00.png": "empty"}.items():
        if name != "cut.jpg":
            assert f"{tmp_path / name}: {reason.replace('_', ' ')}" in message
    assert "2 empty" in message  # the counts by reason
    assert len(load_image_data(train_data_dir=tmp_path, val_count=0, max_bad_fraction=0.2).skip_log) == 5
    with pytest.raises(ValueError, match="max_bad_fraction must be in"):
        load_image_data(train_data_dir=tmp_path, max_bad_fraction=1.5)


def test_skips_reach_the_main_process_from_workers(tmp_path):
    for i in range(4):
        save_rgb(tmp_path / f"good{i}.png", 16, 16, seed=i)
    save_rgb(tmp_path / "x.jpg", 64, 64)
    jpeg = (tmp_path / "x.jpg").read_bytes()
    (tmp_path / "x.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    files, bad = validate_images(find_images(tmp_path))
    assert bad == {} and len(files) == 5
    dataset = ImageDataset(files, 8, train=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, num_workers=2, collate_fn=collate_images)
    main_log = SkipLog()
    for batch in loader:
        assert batch["pixel_values"].shape == (5, 3, 8, 8)  # the broken file was replaced, batch full
        main_log.merge(batch["skipped"])
    assert main_log.reasons == {str(tmp_path / "x.jpg"): "truncated"}
    assert len(dataset.skip_log) == 0  # the main process's copy never decoded anything


def test_no_usable_image_is_a_clear_error(tmp_path):
    (tmp_path / "a.png").write_text("not an image")
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match=f"No usable image in folder {tmp_path}"):
        load_image_data(train_data_dir=tmp_path)
    (tmp_path / "a.png").unlink()
    with pytest.raises(ValueError, match="0 image files found"):
        load_image_data(train_data_dir=tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_image_data(train_data_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not both"):
        load_image_data(train_data_dir=tmp_path, dataset_name="x")


# ---------------------------------------------------------------- finding files


def test_find_images_recursive_sorted_case_insensitive(tmp_path):
    for relative in ["b.PNG", "a/z.jpg", "a/b/c.JpEg", "a/b/d.webp", "c.bmp", "d.TIFF", "e.tif", "a.png"]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("skip me")
    (tmp_path / "folder.png").mkdir()  # a folder with an image-like name is walked, not listed
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a/b/c.JpEg", "a/b/d.webp", "a/z.jpg", "a.png", "b.PNG", "c.bmp", "d.TIFF", "e.tif"]


def test_find_images_follows_links_and_ends_on_loops(tmp_path):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "data" / "sub" / "x.png").write_bytes(b"x")
    (tmp_path / "elsewhere" / "y.png").write_bytes(b"x")
    (tmp_path / "data" / "sub" / "loop").symlink_to(tmp_path / "data")  # a cycle
    (tmp_path / "data" / "self").symlink_to(".")  # another cycle
    (tmp_path / "data" / "linked").symlink_to(tmp_path / "elsewhere")  # a linked folder: followed
    found = [p.relative_to(tmp_path / "data").as_posix() for p in find_images(tmp_path / "data")]
    assert found == ["linked/y.png", "sub/x.png"]


def _find_with_warnings(folder: Path) -> tuple[list[Path], list[str]]:
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("latentvae").addHandler(handler)
    try:
        return find_images(folder), records
    finally:
        logging.getLogger("latentvae").removeHandler(handler)


def test_unreadable_folder_skipped_with_warning(unprivileged):
    folder, run = unprivileged
    (folder / "locked").mkdir()
    (folder / "locked" / "a.png").write_bytes(b"x")
    (folder / "b.png").write_bytes(b"x")
    (folder / "locked").chmod(0)
    found, warnings = run(_find_with_warnings, folder)
    assert found == [folder / "b.png"]
    assert len(warnings) == 1 and "locked" in warnings[0]


# ---------------------------------------------------------------- the crop dataset


def test_output_shape_range_and_exact_center_crop(tmp_path):
    pixels = save_rgb(tmp_path / "a.png", 48, 32)  # shorter side already 32: no resampling
    sample = ImageDataset([tmp_path / "a.png"], 32, train=False)[0]
    values = sample["pixel_values"]
    assert values.shape == (3, 32, 32) and values.dtype == torch.float32
    assert values.min() >= -1 and values.max() <= 1
    expected = torch.from_numpy(pixels[8:40].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(values, expected, rtol=0, atol=1e-6)
    assert sample["path"] == str(tmp_path / "a.png")


def test_small_images_enlarged_to_the_crop(tmp_path):
    Image.new("RGB", (6, 4), (255, 0, 51)).save(tmp_path / "tiny.png")
    gradient = np.tile(np.linspace(0, 255, 5).astype(np.uint8)[None, :, None], (3, 1, 3))
    Image.fromarray(gradient).save(tmp_path / "ramp.png")  # 5 wide, 3 high
    dataset = ImageDataset([tmp_path / "tiny.png", tmp_path / "ramp.png"], 24, train=False)
    flat = dataset[0]["pixel_values"]
    assert flat.shape == (3, 24, 24)
    torch.testing.assert_close(flat, torch.tensor([1.0, -1.0, -0.6]).view(3, 1, 1).expand(3, 24, 24))
    ramp = dataset[1]["pixel_values"]
    assert ramp.shape == (3, 24, 24)
    assert (ramp[:, :, 1:] - ramp[:, :, :-1] >= -1e-6).all()  # still increasing left to right after resizing


def test_downscaling_is_antialiased(tmp_path):
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)  # 1-pixel checkerboard
    Image.fromarray(checker).save(tmp_path / "checker.png")
    values = ImageDataset([tmp_path / "checker.png"], 16, train=False)[0]["pixel_values"]
    # Averaging the checkerboard gives mid-gray (0 in [-1, 1]); point sampling would give only -1 or +1.
    assert values.abs().max() < 0.1


def test_train_crops_reproducible_valid_and_flipped(tmp_path):
    pixels = save_rgb(tmp_path / "a.png", 20, 30)
    dataset = ImageDataset([tmp_path / "a.png"], 12, train=True)
    resized = np.asarray(Image.fromarray(pixels).resize((18, 12), Image.Resampling.BICUBIC))
    windows = {}
    for left in range(18 - 12 + 1):
        window = resized[:, left : left + 12]
        windows[(left, False)], windows[(left, True)] = window, window[:, ::-1]

    torch.manual_seed(0)
    first = [dataset[0]["pixel_values"] for _ in range(30)]
    torch.manual_seed(0)
    again = [dataset[0]["pixel_values"] for _ in range(30)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    seen = set()
    for values in first:
        as_uint8 = ((values.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        matches = [key for key, window in windows.items() if (window == as_uint8).all()]
        assert len(matches) >= 1  # every crop is a window (maybe mirrored) of the resized image
        seen.update(matches)
    assert {flip for _, flip in seen} == {False, True}
    assert len({left for left, _ in seen}) > 1


@pytest.mark.parametrize("random_flip", [False, True])
def test_center_crop_and_random_flip_flags(tmp_path, random_flip):
    # --center_crop / --random_flip, as in the diffusers examples: the window is the center one (the same pixels
    # as a numpy slice of the resized image); flipping happens only where asked, and then in both directions.
    pixels = save_rgb(tmp_path / "a.png", 20, 30)
    resized = np.asarray(Image.fromarray(pixels).resize((18, 12), Image.Resampling.BICUBIC))
    center = resized[:, 3:15]
    dataset = ImageDataset([tmp_path / "a.png"], 12, train=True, center_crop=True, random_flip=random_flip)
    torch.manual_seed(0)
    flips = set()
    for _ in range(20):
        as_uint8 = ((dataset[0]["pixel_values"].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        assert (as_uint8 == center).all() or (random_flip and (as_uint8 == center[:, ::-1]).all())
        flips.add(bool((as_uint8 == center[:, ::-1]).all() and not (as_uint8 == center).all()))
    assert flips == ({False, True} if random_flip else {False})


@pytest.mark.parametrize("max_shift", [0.1, 0.5])
def test_random_hue_rotates_hue_within_range_and_keeps_saturation(tmp_path, max_shift):
    # --random_hue: a saturated, uniformly coloured image keeps its saturation and value (stdlib colorsys as the
    # oracle) while its hue moves by at most max_shift of the colour circle, to both sides; validation crops and
    # random_hue=0 leave the colour alone.
    colour = (230, 40, 40)
    Image.new("RGB", (16, 16), colour).save(tmp_path / "red.png")
    hue0, sat0, val0 = colorsys.rgb_to_hsv(*(c / 255 for c in colour))
    dataset = ImageDataset([tmp_path / "red.png"], 16, train=True, random_hue=max_shift)
    torch.manual_seed(0)
    shifts = []
    for _ in range(40):
        pixel = ((dataset[0]["pixel_values"][:, 8, 8] + 1) * 127.5).tolist()
        hue, sat, val = colorsys.rgb_to_hsv(*(c / 255 for c in pixel))
        assert sat == pytest.approx(sat0, abs=0.02) and val == pytest.approx(val0, abs=0.01)
        shifts.append((hue - hue0 + 0.5) % 1.0 - 0.5)
    assert max(abs(s) for s in shifts) <= max_shift + 0.01
    assert min(shifts) < -max_shift / 3 and max(shifts) > max_shift / 3
    plain = ImageDataset([tmp_path / "red.png"], 16, train=False, random_hue=max_shift)
    assert ((plain[0]["pixel_values"][:, 8, 8] + 1) * 127.5).round().tolist() == list(colour)
    with pytest.raises(ValueError, match="random_hue"):
        ImageDataset([tmp_path / "red.png"], 16, random_hue=0.6)


def test_validation_crop_is_deterministic(tmp_path):
    save_rgb(tmp_path / "a.png", 40, 70)
    dataset = ImageDataset([tmp_path / "a.png"], 16, train=False)
    torch.manual_seed(1)
    first = dataset[0]["pixel_values"]
    torch.manual_seed(2)
    assert torch.equal(first, dataset[0]["pixel_values"])


# ---------------------------------------------------------------- splits and sources


def test_split_is_fixed_disjoint_and_seeded():
    files = [Path(f"img{i:03d}.png") for i in range(50)]
    train, val = split_train_val(files, val_count=5, seed=0)
    assert (
        len(val) == 5
        and len(train) == 45
        and set(train).isdisjoint(val)
        and set(train) | set(val) == set(files)
    )
    assert train == sorted(train) and val == sorted(val)
    assert split_train_val(files, val_count=5, seed=0) == (train, val)
    assert split_train_val(files, val_count=5, seed=1)[1] != val
    assert len(split_train_val(files, val_fraction=0.1)[1]) == 5
    assert split_train_val(files, val_count=0) == (files, [])
    with pytest.raises(ValueError, match="still train"):
        split_train_val(files, val_count=50)
    with pytest.raises(ValueError, match="exactly one"):
        split_train_val(files)


def test_embedded_photographs_load_offline():
    paths = embedded_images()
    assert len(paths) >= 10
    for path in paths:
        assert load_rgb(path).mode == "RGB"
    data = load_image_data(seed=0)
    assert data.embedded and "scikit-image" in data.description and "--train_data_dir" in data.description
    assert len(data.train) + len(data.val) == len(paths) and len(data.val) >= 1
    assert set(data.val_names).isdisjoint(map(str, data.train))


def test_embedded_colour_photographs_bring_green_and_always_train():
    """scikit-learn's and matplotlib's photographs are found in their installed packages, hold green-dominant
    pixels (PIL's HSV: hue 70-170 degrees, saturation and value > 0.2, so not the dark sky noise of the Hubble deep
    field) where no scikit-image one does, and are never held out."""
    colour = embedded_colour_images()
    assert [p.name for p in colour] == ["china.jpg", "flower.jpg", "grace_hopper.jpg"]

    def green_fraction(path) -> float:
        hsv = np.asarray(load_rgb(path).convert("HSV"), dtype=np.float64)
        hue, saturation, value = hsv[..., 0] * 360 / 255, hsv[..., 1] / 255, hsv[..., 2] / 255
        return float(((hue > 70) & (hue < 170) & (saturation > 0.2) & (value > 0.2)).mean())

    assert max(green_fraction(p) for p in colour) > 0.05
    assert max(green_fraction(p) for p in embedded_images() if p not in colour) < 0.01
    for seed in range(4):
        data = load_image_data(seed=seed)
        assert set(colour) <= set(data.train) and set(colour).isdisjoint(map(Path, data.val))


def test_separate_validation_folder(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    for i in range(3):
        save_rgb(tmp_path / "train" / f"{i}.png")
    save_rgb(tmp_path / "val" / "v.png")
    data = load_image_data(train_data_dir=tmp_path / "train", val_data_dir=tmp_path / "val")
    assert isinstance(data, ImageData) and len(data.train) == 3
    assert data.val_names == [str(tmp_path / "val" / "v.png")]


def _hf_dataset(tmp_path: Path, images: list):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"picture": datasets.Image(), "label": datasets.Value("int64")})
    table = datasets.Dataset.from_dict(
        {"picture": images, "label": list(range(len(images)))}, features=features
    )
    table.save_to_disk(str(tmp_path / "saved"))
    return str(tmp_path / "saved")


def test_hf_dataset_from_disk_with_a_broken_row(tmp_path):
    pictures = [random_rgb(16 + i, 20, seed=i) for i in range(5)]
    broken = {"bytes": b"definitely not an image", "path": None}
    saved = _hf_dataset(tmp_path, [Image.fromarray(p) for p in pictures[:3]] + [broken] + pictures[3:])
    data = load_image_data(dataset_name=saved, image_column="picture", val_count=2, max_bad_fraction=0.2)
    assert data.skip_log.reasons == {f"{saved}[3]": "not_an_image"}
    assert len(data.train) == 3 and len(data.val) == 2
    assert all(name.startswith(f"{saved}[") for name in data.val_names)
    # Every row decodes to its own pixels, whatever the split.
    for source in [*data.train, *data.val]:
        row = int(source.name.rsplit("[", 1)[1].rstrip("]"))
        original = pictures[row if row < 3 else row - 1]
        assert (np.asarray(load_rgb(source)) == original).all()
    sample = ImageDataset(data.train, 16, train=False)[0]
    assert sample["pixel_values"].shape == (3, 16, 16)


def test_hf_missing_column_lists_the_columns(tmp_path):
    saved = _hf_dataset(tmp_path, [Image.fromarray(random_rgb(8, 8))])
    with pytest.raises(ValueError, match=r"no column 'image'.*\['picture', 'label'\].*--image_column"):
        load_hf_images(saved)
    with pytest.raises(ValueError, match="not images"):
        load_hf_images(saved, image_column="label")


def test_hf_imagefolder_offline(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "pics" / "cats").mkdir(parents=True)
    first = save_rgb(tmp_path / "pics" / "cats" / "a.png", 12, 12, seed=3)
    save_rgb(tmp_path / "pics" / "b.jpg", 12, 12, seed=4)
    column = load_hf_images(str(tmp_path / "pics"), cache_dir=str(tmp_path / "cache"))
    assert len(column) == 2
    by_name = {Path(source).name: source for source in column}
    assert (np.asarray(load_rgb(by_name["a.png"])) == first).all()


def test_resize_to_crops_detail_instead_of_the_whole_image(tmp_path):
    """With resize_to = 2 x resolution the crop covers half the (resized) image: a center crop of a left-to-right
    ramp then spans the middle half of the ramp's range instead of all of it."""
    ramp = np.tile(np.linspace(0, 255, 128, dtype=np.float64), (128, 1)).round().astype(np.uint8)
    path = tmp_path / "ramp.png"
    Image.fromarray(np.stack([ramp] * 3, axis=-1)).save(path)
    whole = ImageDataset([path], resolution=32, train=False)[0]["pixel_values"]
    detail = ImageDataset([path], resolution=32, train=False, resize_to=64)[0]["pixel_values"]
    whole_span = whole[0, 0, -1] - whole[0, 0, 0]
    detail_span = detail[0, 0, -1] - detail[0, 0, 0]
    assert 1.8 < whole_span < 2.0  # nearly the full [-1, 1] range
    assert 0.85 < detail_span < 1.05  # about half of it
    with pytest.raises(ValueError, match="resize_to"):
        ImageDataset([path], resolution=32, resize_to=16)


def test_cache_keeps_decoded_images_and_gives_the_same_pixels(tmp_path, monkeypatch):
    import latentvae.data.images as images_module

    path = tmp_path / "a.png"
    Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)).save(path)
    decodes = []
    real_load_rgb = images_module.load_rgb
    monkeypatch.setattr(
        images_module, "load_rgb", lambda source: decodes.append(source) or real_load_rgb(source)
    )
    cached = ImageDataset([path], resolution=32, train=False, cache=True)
    plain = ImageDataset([path], resolution=32, train=False)
    first, second = cached[0]["pixel_values"], cached[0]["pixel_values"]
    assert len(decodes) == 1  # decoded once, served from memory the second time
    assert torch.equal(first, second) and torch.equal(first, plain[0]["pixel_values"])
