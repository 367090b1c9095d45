"""MLflow entry point `extract`: a thin wrapper over `imgsim extract` (see imgsim/stages/extract.py)."""

import sys

from imgsim.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
