"""Preemption: the first SIGTERM / SIGINT asks training to stop after the current step; a second one ends it at once.

Cluster schedulers send SIGTERM (SLURM, Kubernetes) some time before they kill a job, and a person at a terminal
presses Ctrl-C (SIGINT). The first of either is only noted here; the training loop asks `stop_requested` after each
optimizer step, writes a checkpoint and exits normally. The handlers are then set back to the operating system's
default, so a second signal ends the process at once, even inside a long C call; the newest complete checkpoint
stays loadable because checkpoints are renamed into place only when complete (`latentvae.training.checkpointing`).

With several processes the signal may reach only some of them; `stop_requested` all-reduces the flag, so every
process stops after the same step (otherwise the others would wait forever in the next gradient all-reduce).
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionHandler:
    """Context manager that turns the first SIGTERM / SIGINT into a request to stop at the next step boundary.

    Args:
        signals: The signals to catch.

    Example:
        with PreemptionHandler() as preemption:
            for batch in batches:
                step(batch)
                if preemption.stop_requested(accelerator):
                    save_checkpoint(...)
                    break
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> PreemptionHandler:
        # Python only lets the main thread install handlers (e.g. not under some notebook or test runners).
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)
        for sig in self.signals:  # the next signal, of either kind, takes the default action: exit now
            signal.signal(sig, signal.SIG_DFL)
        # os.write, not print or logging: a handler can run in the middle of another write to the same stream.
        message = (
            f"\nreceived {self.received.name}: finishing the current step, then writing a checkpoint and exiting "
            f"(send {self.received.name} again to exit at once; the newest complete checkpoint stays usable)\n"
        )
        os.write(2, message.encode())

    def stop_requested(self, accelerator=None) -> bool:
        """Whether any process received a stop signal. With several processes every one must call this at the
        same point of the loop, as it is a collective operation."""
        if accelerator is None or accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor([float(self.received is not None)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: workers ignore SIGTERM / SIGINT and let the main process decide.

    Ctrl-C reaches every process of the terminal's process group and schedulers signal every process of a job;
    a data-loader worker that died of it would make the main process fail instead of finishing its step. The
    workers end when the main process does.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
