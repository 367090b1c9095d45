"""MLflow entry point `split`: a thin wrapper over `imgsim split` (see imgsim/split.py)."""

import sys

from imgsim.cli import main

if __name__ == "__main__":
    sys.exit(main(["split", *sys.argv[1:]]))
