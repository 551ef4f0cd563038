"""`training/train.py`, made observable and slow from the outside, for the fault-injection tests of
`test_robustness.py` (nothing in the script itself changes):

    python tests/robustness_probe.py steps PROBE_DIR [train flags]   # each optimizer step appends its number to
                                                                      # PROBE_DIR/steps and then sleeps a while
    python tests/robustness_probe.py save PROBE_DIR [train flags]    # the second checkpoint save writes half of
                                                                      # model.safetensors, touches PROBE_DIR/saving
                                                                      # and hangs there, to be killed

Each process writes its pid to PROBE_DIR/pid-<rank>. The sleep is PROBE_STEP_SECONDS (default 0.5).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import accelerate.checkpointing

from latentvae.training.config import parse_config
from latentvae.training.step import TrainStep
from training.train import main


def slow_steps(probe: Path) -> None:
    step = TrainStep.__call__
    delay = float(os.environ.get("PROBE_STEP_SECONDS", "0.5"))

    def observed_step(self, images, global_step, generator=None):
        logs = step(self, images, global_step, generator)
        if self.accelerator.sync_gradients:
            with open(probe / f"steps-{self.accelerator.process_index}", "a") as handle:
                handle.write(f"{global_step + 1}\n")
            time.sleep(delay)
        return logs

    TrainStep.__call__ = observed_step


def hanging_second_save(probe: Path) -> None:
    save = accelerate.checkpointing.save  # what Accelerate writes each model and optimizer file with
    checkpoints = set()

    def interrupted_save(obj, path, *args, **kwargs):
        checkpoints.add(Path(path).parent)
        result = save(obj, path, *args, **kwargs)
        if len(checkpoints) == 2 and Path(path).name == "model.safetensors":
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])  # the write is half done ...
            (probe / "saving").touch()
            time.sleep(600)  # ... when the kill comes
        return result

    accelerate.checkpointing.save = interrupted_save


if __name__ == "__main__":
    mode, probe_dir = sys.argv[1], Path(sys.argv[2])
    (probe_dir / f"pid-{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
    {"steps": slow_steps, "save": hanging_second_save}[mode](probe_dir)
    logging.basicConfig(format="%(levelname)s %(message)s", level=logging.INFO)
    main(*parse_config(sys.argv[3:]))
