"""Reconstruction quality of one or more VAEs by the published protocol, side by side.

    python eval/evaluate.py --model [NAME=]PATH [--model [NAME=]PATH ...] --data_dir DIR --output_dir OUT

The same command as `latentvae evaluate` (see `--help`, and the README's "Evaluate" section); it writes
summary.json, per_image.csv, report.md and PNG grids into OUT. With `--diagnostics` it is `latentvae diagnose`
(the README's "Diagnose" section) with the other arguments: diagnostics.json, diagnostics.md and plots.
"""

import sys

from latentvae.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    command = "diagnose" if "--diagnostics" in argv else "evaluate"
    sys.exit(main([command, *(arg for arg in argv if arg != "--diagnostics")]))
