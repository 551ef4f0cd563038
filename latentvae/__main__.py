"""`python -m latentvae ...`: the same command line as the `latentvae` console script."""

import sys

from latentvae.cli import main

if __name__ == "__main__":
    sys.exit(main())
