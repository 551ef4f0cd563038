"""The recipe benchmark: the same initial VAE trained with each recipe at one budget, evaluated on held-out photos.

    python eval/recipes.py --runs diffusers-example from-scratch --seeds 0 1

Writes recipes.md (the table), recipes.json, curves.png and recipes.jpg into `--out` (default eval/results/recipes);
the runs, their logs and the full evaluation report go to `--work_dir` (default runs/recipes). See
`latentvae.benchmark.recipes` and the README's "Choosing a recipe".
"""

import argparse
import sys

from latentvae.benchmark.recipes import add_arguments, run_benchmark

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    sys.exit(run_benchmark(parser.parse_args()))
