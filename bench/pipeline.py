"""Bench 5: wall time of the README's demo command (`make demo`), from a fresh clone (install included unless cached).

python -m bench.pipeline [--keep-venv]
A fresh clone gets its own .venv, so the figure includes the pip install; --keep-venv links this
checkout's .venv to time the pipeline alone.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, save

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep-venv", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgsim-demo-") as tmp:
        clone = Path(tmp) / "imgsim"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        if args.keep_venv:
            for venv in (".venv", ".venv-k8s"):
                (clone / venv).symlink_to(REPO / venv)
        log = RESULTS / "pipeline-demo.log"
        started = time.perf_counter()
        with open(log, "w") as out:
            code = subprocess.run(["make", "demo"], cwd=clone, stdout=out, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - started
    text = log.read_text(errors="replace")
    metrics = dict(re.findall(r'"(accuracy|map_at_r|precision_at_10|index_recall_at_10)": ([\d.]+)', text))
    result = {"command": "make demo", "fresh_venv": not args.keep_venv, "exit_code": code,
              "wall_seconds": wall, "metrics": {k: float(v) for k, v in metrics.items()}}
    print(f"make demo: exit {code}, {wall / 60:.1f} min wall ({'with' if not args.keep_venv else 'without'} install); "
          f"metrics {result['metrics']}")
    print(f"wrote {save('pipeline', result)}")
    sys.exit(code)


if __name__ == "__main__":
    main()
