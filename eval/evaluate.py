"""Reconstruction quality of one or more VAEs by the published protocol, side by side.

    python eval/evaluate.py --model [NAME=]PATH [--model [NAME=]PATH ...] --data_dir DIR --output_dir OUT

The same command as `latentvae evaluate` (see `--help`, and the README's "Evaluate" section); it writes
summary.json, per_image.csv, report.md and PNG grids into OUT.
"""

import sys

from latentvae.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
