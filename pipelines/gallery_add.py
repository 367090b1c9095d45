"""MLflow entry point `gallery_add`: a thin wrapper over `imgsim gallery add` (see imgsim/stages/gallery.py)."""

import sys

from imgsim.cli import main

if __name__ == "__main__":
    sys.exit(main(["gallery", "add", *sys.argv[1:]]))
