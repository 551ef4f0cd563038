"""The instrumented distillation of `test_preview.py::test_two_processes_stay_identical`.

    accelerate launch --multi_gpu --num_processes 2 tests/preview_probe.py PROBE_DIR VAE [flags]

Records each process's prepared models and registered state at every checkpoint, as `train_probe.py` does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from train_probe import record

from latentvae.training.distill import main
from latentvae.training.preview import parse_preview_config

if __name__ == "__main__":
    record(Path(sys.argv[1]), rank=int(os.environ["RANK"]))
    main(*parse_preview_config(sys.argv[2:]))
