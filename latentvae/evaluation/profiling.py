"""Timing and peak memory of model stages, for evaluation and benchmarks."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StageTimer:
    """Wall-clock seconds per stage and batch; CUDA is synchronised at each edge so queued work is counted."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.batches: list[dict[str, float]] = []

    def start_batch(self, num_images: int) -> None:
        self.batches.append({"images": num_images})

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.batches[-1][name] = self.batches[-1].get(name, 0.0) + time.perf_counter() - start

    def ms_per_image(self, name: str) -> float | None:
        """Mean milliseconds per image of stage `name` over all batches (None before any batch)."""
        images = sum(batch["images"] for batch in self.batches)
        return 1000 * sum(batch.get(name, 0.0) for batch in self.batches) / images if images else None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class PeakMemory:
    """Peak memory of a model's encode + decode: its weights plus the largest growth during one batch.

    The growth is measured per batch from the memory in use when the batch starts, so the data, the metric
    networks and earlier models do not count. CUDA: `torch.cuda.max_memory_allocated` (tensors, not the allocator's
    cache). CPU on Linux: the process's peak resident set size (`VmHWM`, reset through `/proc/self/clear_refs`)
    over its resident size, after glibc's `malloc_trim` has handed freed memory back (else reused memory would go
    unseen); anything else the process allocates meanwhile counts too, so read it as an approximation. Elsewhere:
    not measured (`kind` is None).

    Args:
        device: where the model runs.
        weight_bytes: the model's parameters and buffers, in bytes.
    """

    def __init__(self, device: torch.device, weight_bytes: int) -> None:
        self.device = device
        self.weight_bytes = weight_bytes
        self.growth = 0
        if device.type == "cuda":
            self.kind = "CUDA max_memory_allocated"
        elif device.type == "cpu" and _reset_peak_rss():
            self.kind = "CPU peak resident set size (Linux VmHWM)"
        else:
            self.kind = None

    @contextmanager
    def track(self) -> Iterator[None]:
        if self.kind is None:
            yield
        elif self.device.type == "cuda":
            start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            self.growth = max(self.growth, torch.cuda.max_memory_allocated(self.device) - start)
        else:
            _trim_heap()
            _reset_peak_rss()
            start = _proc_status_bytes("VmRSS")
            yield
            self.growth = max(self.growth, _proc_status_bytes("VmHWM") - start)

    @property
    def peak_mb(self) -> float | None:
        return (self.weight_bytes + self.growth) / 2**20 if self.kind is not None else None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")  # 5: reset the peak resident set size to the current one (Linux >= 4.0)
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline may then include freed memory
        pass


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {key}")
