"""MLflow entry point `train`: a thin wrapper over `imgsim train` (see imgsim/stages/train.py)."""

import sys

from imgsim.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
