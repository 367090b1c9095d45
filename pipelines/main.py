"""MLflow entry point `main`: a thin wrapper over `imgsim main` (see imgsim/runs/main.py)."""

import sys

from imgsim.cli import main

if __name__ == "__main__":
    sys.exit(main(["main", *sys.argv[1:]]))
