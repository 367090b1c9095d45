"""MLflow entry point `gallery_remove`: a thin wrapper over `imgsim gallery remove` (see imgsim/stages/gallery.py)."""

import sys

from imgsim.cli import main

if __name__ == "__main__":
    sys.exit(main(["gallery", "remove", *sys.argv[1:]]))
