"""Builders for every kind of broken or odd image file a scraped training folder holds (the "bad-data zoo").

Images are written with PIL / numpy or, where PIL would refuse or interfere, PNG bytes are written by hand from the
specification. `write_zoo` puts one of each into a folder and says what training must make of each.
"""

from __future__ import annotations

import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def handmade_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes = b"") -> bytes:
    """A PNG written from the specification, independent of PIL (colour type 2 = RGB, 0 = gray)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def save_rgb(path: Path, height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    pixels = random_rgb(height, width, seed)
    Image.fromarray(pixels).save(path)
    return pixels


def write_broken(folder: Path) -> dict[str, str]:
    """One file per kind of breakage; returns {file name: expected reason}."""
    save_rgb(folder / "source.jpg", 64, 64, seed=1)
    save_rgb(folder / "source.png", 64, 64, seed=2)
    jpeg, png = (folder / "source.jpg").read_bytes(), (folder / "source.png").read_bytes()
    (folder / "source.jpg").unlink()
    (folder / "source.png").unlink()
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is text, not a picture\n")
    (folder / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "cut.png").write_bytes(png[: len(png) // 2])
    # 60000 x 60000 RGB would be 10.8 GB decoded; the header alone must get it rejected.
    (folder / "bomb.png").write_bytes(handmade_png(60000, 60000, 8, 2, b"\x00" * 100))
    return {
        "empty.png": "empty",
        "notes.png": "not_an_image",
        "cut.jpg": "truncated",
        "cut.png": "truncated",
        "bomb.png": "too_large",
    }


def write_odd(folder: Path) -> list[str]:
    """Valid images in every awkward form; returns their paths relative to `folder`."""
    gray = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(np.kron(gray, np.ones((3, 3), np.uint8))).save(folder / "gray.png")
    palette = Image.new("P", (40, 40))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putdata([(x // 5 + y // 5) % 2 for y in range(40) for x in range(40)])
    palette.save(folder / "palette.png", transparency=0)
    rgba = np.dstack([random_rgb(40, 40, seed=3), np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (40, 1))])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    cmyk = np.random.default_rng(4).integers(0, 256, (40, 48, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(folder / "cmyk.jpg", quality=90)
    Image.fromarray(np.linspace(0, 65535, 40 * 48).astype(np.uint16).reshape(40, 48)).save(
        folder / "gray16.png"
    )
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated by 90 degrees
    Image.fromarray(random_rgb(32, 48, seed=5)).save(folder / "exif-rotated.jpg", exif=exif, quality=90)
    save_rgb(folder / "tiny.png", 6, 4, seed=6)  # smaller than any crop: enlarged
    (folder / "nested" / "deeper").mkdir(parents=True)
    save_rgb(folder / "nested" / "deeper" / "nested.png", 40, 48, seed=7)
    (folder / "nested" / "loop").symlink_to(folder, target_is_directory=True)  # a cycle back to the top
    return [
        "gray.png",
        "palette.png",
        "rgba.png",
        "cmyk.jpg",
        "gray16.png",
        "exif-rotated.jpg",
        "tiny.png",
        "nested/deeper/nested.png",
    ]


def permissions_enforced(folder: Path) -> bool:
    """Whether a mode-0 file in `folder` is unreadable for this user (not for root, nor on some file systems)."""
    probe = folder / ".permission-probe"
    probe.write_bytes(b"x")
    probe.chmod(0)
    try:
        probe.read_bytes()
        return False
    except PermissionError:
        return True
    finally:
        probe.unlink()


def write_zoo(folder: Path) -> dict[str, str | None]:
    """Every broken and odd kind in one training folder, plus one mode-0 file.

    Returns:
        {path relative to folder: the reason it must be skipped for, or None if it must train}. The mode-0 file
        is "unreadable" where permissions are enforced, and an ordinary image for root.
    """
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = dict(write_broken(folder))
    expected.update({name: None for name in write_odd(folder)})
    save_rgb(folder / "locked.png", 40, 48, seed=8)
    os.chmod(folder / "locked.png", 0)
    expected["locked.png"] = "unreadable" if permissions_enforced(folder) else None
    return expected


def run_as_nobody(fn, *args):
    """`fn(*args)` in a forked child process running as the user `nobody`, so that permission bits apply even
    when the tests run as root; returns its (picklable) result."""
    read, write = os.pipe()
    pid = os.fork()
    if (
        pid == 0
    ):  # the child: drop root, run, send the result back, leave without running the parent's cleanup
        status = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with os.fdopen(write, "wb") as pipe:
                pickle.dump(fn(*args), pipe)
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and data, f"the unprivileged child failed (status {status})"
    return pickle.loads(data)
