"""Bad-file accounting, shared by every data source: which images were skipped and why (`SkipLog`), the limit on
how much of the data may be broken (`too_many_bad_images`, `--max_bad_fraction`) and the running check during
training (`BadDataMonitor`)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger(__name__)


class SkipLog:
    """The images skipped so far and why: one warning per image, and counts by reason for the run summary."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}  # image name -> BadImageError.reason

    def record(self, name: str, reason: str, warn: bool = True) -> bool:
        """Note that `name` was skipped for `reason`; warn the first time. Returns whether it was new."""
        if name in self.reasons:
            return False
        self.reasons[name] = reason
        if warn:
            logger.warning("Skipping image %s: %s", name, reason.replace("_", " "))
        return True

    def merge(self, entries: Iterable[tuple[str, str]]) -> None:
        """Add `(name, reason)` pairs already warned about elsewhere, e.g. a batch's `"skipped"` from workers."""
        for name, reason in entries:
            self.record(name, reason, warn=False)

    def __contains__(self, name: str) -> bool:
        return name in self.reasons

    def __len__(self) -> int:
        return len(self.reasons)

    def counts(self) -> dict[str, int]:
        """Number of skipped images per reason, most frequent first."""
        return dict(Counter(self.reasons.values()).most_common())

    def summary(self) -> str:
        """One line for the log, e.g. `"3 images skipped (2 truncated, 1 not an image)"`."""
        if not self.reasons:
            return "no images skipped"
        kinds = ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in self.counts().items())
        return f"{len(self.reasons)} image{'s' * (len(self.reasons) != 1)} skipped ({kinds})"


class TooManyBadImagesError(ValueError):
    """More of the data is broken than the run allows (`--max_bad_fraction`): raised early, with the list."""


def too_many_bad_images(
    bad: dict[str, str], tried: int, max_fraction: float, where: str, shown: int = 50
) -> TooManyBadImagesError | None:
    """The error to raise when more than `max_fraction` of `tried` images failed, else None.

    Args:
        bad: `{name: reason}` of the images that failed (e.g. `SkipLog.reasons`).
        tried: How many images were tried, the failed ones included.
        max_fraction: The largest acceptable fraction of failures, in [0, 1].
        where: What was read, for the message (a folder, a shard pattern).
        shown: How many names the message lists (each one was also named in its own warning).
    """
    if tried == 0 or len(bad) / tried <= max_fraction:
        return None
    log = SkipLog()
    log.merge(bad.items())
    listing = "\n".join(f"  {name}: {reason.replace('_', ' ')}" for name, reason in list(bad.items())[:shown])
    more = f"\n  ... and {len(bad) - shown} more (each named in a warning above)" if len(bad) > shown else ""
    return TooManyBadImagesError(
        f"{len(bad)} of {tried} images in {where} ({100 * len(bad) / tried:.1f} %) cannot be used, more than "
        f"--max_bad_fraction {max_fraction:g} allows: {log.summary()}.\n{listing}{more}\n"
        "Repair or remove these files, or raise --max_bad_fraction if losing them is acceptable."
    )


class BadDataMonitor:
    """Counts the images this process tried and those that failed to decode; once `min_tried` were tried, more
    than `max_fraction` failures is an error with the list (`TooManyBadImagesError`).

    Args:
        skip_log: The run's log, into which every batch's skips are merged (for the end-of-run summary).
        max_fraction: `--max_bad_fraction`.
        where: The data, for the message.
        min_tried: Images to see before the fraction means something.
    """

    def __init__(self, skip_log: SkipLog, max_fraction: float, where: str, min_tried: int = 100) -> None:
        self.skip_log, self.max_fraction, self.where, self.min_tried = (
            skip_log,
            max_fraction,
            where,
            min_tried,
        )
        self.bad: dict[str, str] = {}
        self.tried = 0

    def update(self, batch: dict[str, Any]) -> None:
        new = {name: reason for name, reason in batch["skipped"] if name not in self.bad}
        self.bad.update(new)
        self.tried += len(batch["path"]) + len(new)
        self.skip_log.merge(batch["skipped"])
        if self.tried >= self.min_tried:
            error = too_many_bad_images(self.bad, self.tried, self.max_fraction, self.where)
            if error is not None:
                raise error
