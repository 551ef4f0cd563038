"""Where training images come from, and which are held out for validation.

`load_image_data` is the one call a training script needs: it picks one of three sources — a folder
(`--train_data_dir`), a Hugging Face dataset (`--dataset_name`, `--image_column`) or, when neither is given,
photographs bundled with scikit-image — drops the images whose headers show them broken (one warning each, counted
in a `SkipLog`), fails early when none is usable, and splits off a fixed validation set. Feed its result to
`ImageDataset` (re-exported here from `latentvae.data.images`) with `collate_images`:

    data = load_image_data(train_data_dir="photos/")
    print(data.description)
    train = ImageDataset(data.train, resolution=256, train=True, skip_log=data.skip_log)
    loader = DataLoader(train, batch_size=8, shuffle=True, collate_fn=collate_images)
    for batch in loader:
        data.skip_log.merge(batch["skipped"])  # files that only failed when decoded, maybe in a worker
        ...
    print(data.skip_log.summary())

(One concept over about 400 lines: three image sources and the one call that picks among them, in reading order.)
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from latentvae.data.images import (
    IMAGE_EXTENSIONS,
    BadImageError,
    ImageBytes,
    ImageSource,
    probe_image,
    source_name,
)
from latentvae.data.skips import SkipLog, too_many_bad_images

logger = logging.getLogger(__name__)

# Public-domain / CC0 photographs (per their skimage.data docstrings; the Middlebury motorcycle pair is a
# research benchmark) that scikit-image ships inside its wheel. Others in skimage.data are fetched on demand
# from the network, diagrams or tiny; they are not listed.
EMBEDDED_PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
)
# Colour photographs other kept libraries ship in their wheels: the scikit-image ones above hold no green at all
# and are mostly red, so a VAE trained on them alone returns foliage grey (eval/results/recipes/quickstart-colour.md).
# scikit-learn's sample images (CC BY 2.0, credited in sklearn/datasets/images/README.txt): a pagoda among trees
# under a blue sky, and a flower before dark green leaves; matplotlib's sample photograph of Grace Hopper (US Navy,
# public domain): a navy uniform before the US flag. (package, path inside it)
EMBEDDED_COLOUR_PHOTOS = (
    ("sklearn.datasets.images", "china.jpg"),
    ("sklearn.datasets.images", "flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)


def find_images(root: str | os.PathLike) -> list[Path]:
    """Every image file under `root`, recursively.

    Image files are those whose extension is in `IMAGE_EXTENSIONS`, in any letter case. Symbolic links to
    folders are followed, but each folder is walked once, so link loops end. Folders that cannot be listed are
    skipped with a warning.

    Args:
        root: The folder to search.

    Returns:
        Paths under `root` (symbolic links kept as named), sorted by their components relative to `root`, so
        the order is the same on every machine that holds the same tree.

    Raises:
        ValueError: If `root` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"Image folder {root} does not exist or is not a folder.")
    found: list[Path] = []
    walked: set[tuple[int, int]] = set()
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            info = folder.stat()  # of the link target, so a loop back to a walked folder is recognised
            if (info.st_dev, info.st_ino) in walked:
                continue
            walked.add((info.st_dev, info.st_ino))
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as exc:
            logger.warning("Skipping folder %s, which cannot be read: %s", folder, exc)
            continue
        for entry in reversed(entries):  # reversed onto a stack: folders are walked in name order
            try:
                is_folder = entry.is_dir()  # follows links
            except OSError:
                is_folder = False
            if is_folder:
                pending.append(folder / entry.name)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(folder / entry.name)
    return sorted(found, key=lambda path: path.relative_to(root).parts)


class HFImageColumn(Sequence):
    """One image column of a Hugging Face `datasets.Dataset`, read as encoded bytes or file paths.

    Decoding is left to `load_rgb` (the column's automatic decoding is switched off), so a broken row is
    skipped and counted exactly like a broken file.

    Args:
        dataset: The dataset.
        column: An `Image` column, or a string column of file paths, or a binary column of encoded images.
        label: How rows are named in logs: `label[row]`.
        rows: Which rows, in order (default: all).
    """

    def __init__(self, dataset: Any, column: str, label: str, rows: Sequence[int] | None = None) -> None:
        import datasets

        if column not in dataset.column_names:
            raise ValueError(
                f"Dataset {label} has no column {column!r}; its columns are {dataset.column_names}. "
                "Pass the one holding the images with --image_column."
            )
        feature = dataset.features[column]
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        elif not (
            isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "binary")
        ):
            raise ValueError(
                f"Column {column!r} of dataset {label} holds {feature}, not images, image paths or image bytes."
            )
        self.dataset = dataset.select_columns([column])
        self.column = column
        self.label = label
        self.rows = range(len(dataset)) if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> ImageSource:
        row = self.rows[index]
        cell = self.dataset[row][self.column]
        if isinstance(cell, str):
            return Path(cell)
        if isinstance(cell, bytes):
            return ImageBytes(f"{self.label}[{row}]", cell)
        if cell.get("bytes") is None and cell.get("path"):  # e.g. an imagefolder that points at local files
            return Path(cell["path"])
        return ImageBytes(f"{self.label}[{row}]", cell.get("bytes") or b"")

    def select(self, indices: Iterable[int]) -> HFImageColumn:
        """The rows at `indices` of this column (row names stay those of the full dataset)."""
        return HFImageColumn(self.dataset, self.column, self.label, [self.rows[i] for i in indices])


def load_hf_images(
    dataset_name: str, image_column: str = "image", split: str = "train", cache_dir: str | None = None
) -> HFImageColumn:
    """Open a Hugging Face dataset's image column.

    Args:
        dataset_name: A Hub name, a local folder of images or data files (read by `datasets.load_dataset`),
            or a folder written by `Dataset.save_to_disk` (read by `datasets.load_from_disk`).
        image_column: The column holding the images.
        split: The split to read.
        cache_dir: Where `datasets` caches what it prepares (default: its own).

    Returns:
        The column, as a sequence of image sources for `ImageDataset`.

    Raises:
        ValueError: If the split or the column does not exist (the message lists those that do).
    """
    import datasets

    folder = Path(dataset_name)
    if (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(
                    f"Dataset {dataset_name} has no split {split!r}; its splits are {list(loaded)}."
                )
            loaded = loaded[split]
    else:
        loaded = datasets.load_dataset(dataset_name, split=split, cache_dir=cache_dir)
    return HFImageColumn(loaded, image_column, label=dataset_name)


def embedded_images() -> list[Path]:
    """Paths of the photographs in `EMBEDDED_PHOTOS` that the installed scikit-image ships in its package, then
    `embedded_colour_images()`.

    They are read as files from the package folders, never through `skimage.data`'s downloader, so this works
    offline; a photograph that some version of its package does not bundle is simply left out.
    """
    folder = Path(str(importlib.resources.files("skimage.data")))
    return [folder / name for name in EMBEDDED_PHOTOS if (folder / name).is_file()] + embedded_colour_images()


def embedded_colour_images() -> list[Path]:
    """Paths of the photographs in `EMBEDDED_COLOUR_PHOTOS` that the installed scikit-learn and matplotlib ship."""
    paths = []
    for package, name in EMBEDDED_COLOUR_PHOTOS:
        try:
            path = Path(str(importlib.resources.files(package))) / name
        except ModuleNotFoundError:
            continue
        if path.is_file():
            paths.append(path)
    return paths


def _take(sources: Sequence[ImageSource], indices: list[int]) -> Sequence[ImageSource]:
    if isinstance(sources, HFImageColumn):
        return sources.select(indices)
    return [sources[i] for i in indices]


def validate_images(
    sources: Sequence[ImageSource], progress: bool = False
) -> tuple[Sequence[ImageSource], dict[str, str]]:
    """Sort images into usable and broken by reading their headers (`probe_image`), without decoding pixels.

    Catches missing, unreadable, empty, non-image and oversized files and truncated or corrupted PNGs; a
    truncated JPEG passes here and is caught by `ImageDataset` when decoded.

    Args:
        sources: Paths, `ImageBytes`, or an `HFImageColumn`.
        progress: Show a progress bar.

    Returns:
        `(good, bad)`: the usable sources in their original order (same container kind as `sources`), and
        `{name: reason}` for the others.
    """
    good: list[int] = []
    bad: dict[str, str] = {}
    for index in tqdm(range(len(sources)), desc="Checking images", unit="img", disable=not progress):
        try:
            probe_image(sources[index])
            good.append(index)
        except BadImageError as exc:
            bad[exc.name] = exc.reason
    return _take(sources, good), bad


def default_val_count(num_images: int) -> int:
    """How many images `load_image_data` holds out when not told: 5 %, at least 2, at most 100, and never
    more than half (so 0 for a single image)."""
    return min(100, max(2, round(0.05 * num_images)), num_images // 2)


def split_train_val(
    sources: Sequence[ImageSource],
    val_count: int | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
) -> tuple[Sequence[ImageSource], Sequence[ImageSource]]:
    """Hold out a fixed validation set.

    The held-out positions depend only on the number of images and `seed` (a hash, not a random generator),
    so a given file list splits the same way on every machine and in every library version, wherever the
    folder is mounted — which keeps resumed runs on the same training set.

    Args:
        sources: The images, in a fixed order (as `find_images` returns them).
        val_count: How many to hold out. Give this or `val_fraction`.
        val_fraction: Which fraction to hold out, in [0, 1); rounded, at least one when positive.
        seed: Chooses the held-out set.

    Returns:
        `(train, val)`, each in the original order.

    Raises:
        ValueError: If both or neither size is given, or if no training image would remain.
    """
    total = len(sources)
    if (val_count is None) == (val_fraction is None):
        raise ValueError("Give exactly one of val_count and val_fraction.")
    if val_fraction is not None:
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        val_count = max(1, round(total * val_fraction)) if val_fraction > 0 else 0
    if val_count < 0 or (val_count > 0 and val_count >= total):
        raise ValueError(
            f"Cannot hold out {val_count} of {total} images for validation and still train on some; "
            "hold out fewer or give a separate validation folder."
        )
    order = sorted(range(total), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    held_out = set(order[:val_count])
    train = [i for i in range(total) if i not in held_out]
    return _take(sources, train), _take(sources, sorted(held_out))


@dataclass
class ImageData:
    """The images `load_image_data` found.

    Attributes:
        train: Training images (paths, or an `HFImageColumn`).
        val: Validation images.
        description: One line for the log saying where they come from and how many there are.
        skip_log: Images rejected before training; hand it to `ImageDataset` to keep counting.
        embedded: Whether these are the bundled default photographs (no data was given).
    """

    train: Sequence[ImageSource]
    val: Sequence[ImageSource]
    description: str
    skip_log: SkipLog = field(default_factory=SkipLog)
    embedded: bool = False

    @property
    def val_names(self) -> list[str]:
        """Names of the validation images, for the log."""
        return [source_name(source) for source in self.val]


def _checked(
    sources: Sequence[ImageSource], where: str, skip_log: SkipLog, max_bad_fraction: float
) -> Sequence[ImageSource]:
    good, bad = validate_images(sources, progress=len(sources) >= 1000)  # a bar only where the wait is felt
    for name, reason in bad.items():
        skip_log.record(name, reason)
    if len(good) == 0:
        raise ValueError(
            f"No usable image in {where}: {len(sources)} image files found, none readable (image files are "
            f"those ending in {', '.join(IMAGE_EXTENSIONS)}, in any case; see the warnings above for why each "
            "was rejected). Check the path."
        )
    error = too_many_bad_images(bad, len(sources), max_bad_fraction, where)
    if error is not None:
        raise error
    return good


def load_image_data(
    train_data_dir: str | os.PathLike | None = None,
    dataset_name: str | None = None,
    image_column: str = "image",
    val_data_dir: str | os.PathLike | None = None,
    val_count: int | None = None,
    seed: int = 0,
    split: str = "train",
    cache_dir: str | None = None,
    max_bad_fraction: float = 0.1,
) -> ImageData:
    """Find the training and validation images, drop unreadable ones, and fail early if none is left.

    Args:
        train_data_dir: A folder searched recursively (`find_images`).
        dataset_name: Instead, a Hugging Face dataset (`load_hf_images`). With neither, the photographs
            bundled with scikit-image (`embedded_images`) are used, and `description` says so.
        image_column: The dataset column holding the images.
        val_data_dir: A folder of validation images. Without it, `val_count` training images are held out
            (`split_train_val`).
        val_count: How many to hold out; default `default_val_count(number of usable images)`.
        seed: Chooses the held-out images.
        split: The Hugging Face dataset split.
        cache_dir: The `datasets` cache folder.
        max_bad_fraction: The largest fraction of a source's image files that may be broken (default 10 %).

    Returns:
        An `ImageData` with the usable images and the files skipped so far.

    Raises:
        ValueError: If both data sources are given, or if a source holds no usable image (before any model is
            built, so a wrong path costs seconds).
        TooManyBadImagesError: (a `ValueError`) If more than `max_bad_fraction` of a source's files are broken;
            the message lists them.
    """
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}.")
    if train_data_dir is not None and dataset_name is not None:
        raise ValueError(
            "Give either a training folder (--train_data_dir) or a dataset (--dataset_name), not both."
        )
    skip_log = SkipLog()
    if dataset_name is not None:
        where = f"Hugging Face dataset {dataset_name!r} (split {split!r}, column {image_column!r})"
        sources = load_hf_images(dataset_name, image_column, split, cache_dir)
    elif train_data_dir is not None:
        where = f"folder {train_data_dir}"
        sources = find_images(train_data_dir)
    else:
        sources = embedded_images()
        names = ", ".join(Path(source).stem for source in sources)
        where = (
            f"the {len(sources)} photographs bundled with scikit-image, scikit-learn and matplotlib ({names})"
        )
    train = _checked(sources, where, skip_log, max_bad_fraction)
    embedded = dataset_name is None and train_data_dir is None
    # The few bundled photographs with green and blue always train; validation holds out scikit-image ones.
    always_train = set(embedded_colour_images()) if embedded else set()

    if val_data_dir is not None:
        val_where = f"validation folder {val_data_dir}"
        val = _checked(find_images(val_data_dir), val_where, skip_log, max_bad_fraction)
        val_note = f"{len(val)} validation images from {val_data_dir}"
    else:
        kept = [source for source in train if source in always_train]
        if kept:
            train = [source for source in train if source not in always_train]
        count = default_val_count(len(train)) if val_count is None else val_count
        train, val = split_train_val(train, val_count=count, seed=seed)
        val_note = f"{len(val)} held out for validation (seed {seed})"
        if kept:
            train = [*train, *kept]
        if len(val) == 0:  # one image, or val_count=0: validation then measures the fit to training images
            val = train
            val_note = "no image held out, so validation uses the training images"

    description = f"{where}: {len(train)} training images, {val_note}; {skip_log.summary()}."
    if embedded:
        description = (
            f"No --train_data_dir or --dataset_name given, so using {description} "
            "Pass --train_data_dir DIR or --dataset_name NAME to train on your own images."
        )
    return ImageData(train, val, description, skip_log, embedded)
