"""Speed and memory of the autoencoder: latentvae against diffusers with the same weights, the fast path, tiling.

    python eval/benchmark.py [--preset sd-kl-f8] [--model TRAINED_VAE] [--out eval/results] [--quick]

The same command as `latentvae benchmark` (see `--help`, the README's "Speed and memory" section, and
`latentvae.benchmark.modes`, where the modes are); it writes benchmark.json and benchmark.md into `--out`.
"""

import sys

from latentvae.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
