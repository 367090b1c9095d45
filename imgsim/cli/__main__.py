"""`python -m imgsim.cli`: the same as the `imgsim` command."""

import sys

from imgsim.cli import main

sys.exit(main())
