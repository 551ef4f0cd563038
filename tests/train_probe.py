"""The instrumented training run of `test_train.py::test_two_processes_stay_identical_and_see_disjoint_samples`.

    accelerate launch --multi_gpu --num_processes 2 tests/train_probe.py PROBE_DIR [flags]

Trains with the flags like `training/train.py` and records, per process R, from the outside (wrapping library
calls, nothing in the script): the training images it loaded (`samples-rank{R}.txt`) and, at every checkpoint,
the parameters of every prepared model and the state registered for checkpointing, i.e. EMA and logvar
(`state-rank{R}-{checkpoint}.pt`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from latentvae.data.images import ImageDataset
from latentvae.training.config import parse_config
from training.train import main


def record(out: Path, rank: int) -> None:
    samples = open(out / f"samples-rank{rank}.txt", "w")
    load_item = ImageDataset.__getitem__
    prepare, register, save_state = (
        Accelerator.prepare,
        Accelerator.register_for_checkpointing,
        Accelerator.save_state,
    )
    prepared, registered = [], []

    def recording_getitem(self, index):
        item = load_item(self, index)
        if self.train:
            samples.write(item["path"] + "\n")
            samples.flush()
        return item

    def recording_prepare(self, *args, **kwargs):
        result = prepare(self, *args, **kwargs)
        prepared.extend(
            r for r in (result if isinstance(result, tuple) else (result,)) if isinstance(r, nn.Module)
        )
        return result

    def recording_register(self, *objects):
        registered.extend(objects)
        return register(self, *objects)

    def recording_save_state(self, output_dir=None, **kwargs):
        result = save_state(self, output_dir, **kwargs)
        models = [dict(self.unwrap_model(m).named_parameters()) for m in prepared]
        state = {"models": models, "registered": [obj.state_dict() for obj in registered]}
        torch.save(state, out / f"state-rank{rank}-{Path(output_dir).name.strip('.')}.pt")
        return result

    ImageDataset.__getitem__ = recording_getitem
    Accelerator.prepare = recording_prepare
    Accelerator.register_for_checkpointing = recording_register
    Accelerator.save_state = recording_save_state


if __name__ == "__main__":
    record(Path(sys.argv[1]), rank=int(os.environ["RANK"]))
    main(*parse_config(sys.argv[2:]))
