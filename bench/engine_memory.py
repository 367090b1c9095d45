"""Bench 21: where a serving process's memory goes with a colour bundle: ONNX Runtime's CPU arena keeps the largest
pass's activations, so the images per pass (imgsim.serve.runtime.RUN_CHUNK) fix each process's memory. Each row is
a fresh process: PSS after loading the bundle (which verifies its 32 probes), after one request of 32 images, and
the median times of a single image and of 32 images (one thread); the process imports what a server does (no
torch).

python -m bench.engine_memory --bundle FOLDER   -> bench/results/engine_memory.json

FOLDER: a serving bundle (``imgsim export``), e.g. the colour default's on bench/colour_sets.py's wesnoth.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


CONFIGS = [(32, True), (8, True), (4, True), (1, True), (32, False)]  # (images per pass, arena)
COLUMNS = ["images_per_pass", "arena", "loaded_pss_mb", "after_32_images_pss_mb", "p50_1_image_ms",
           "p50_32_images_ms"]


def _pss_mb() -> float:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024


def child(folder: str, per_pass: int, arena: bool) -> dict:
    import numpy as np
    import onnxruntime as ort

    from imgsim.serve import runtime

    runtime.RUN_CHUNK = per_pass
    options = ort.SessionOptions

    def with_arena():
        o = options()
        o.enable_cpu_mem_arena = arena
        return o

    runtime.ort.SessionOptions = with_arena
    from imgsim.bundle import ServingBundle

    bundle = ServingBundle.load(folder, runtime="onnx", threads=1)
    loaded = _pss_mb()
    images = np.random.default_rng(0).integers(0, 256, (32, *bundle.engine.session.get_inputs()[0].shape[1:]),
                                               dtype=np.uint8)
    bundle.engine(images)
    after = _pss_mb()

    def median_ms(x, n):
        times = []
        for _ in range(n):
            started = time.perf_counter()
            bundle.engine(x)
            times.append(time.perf_counter() - started)
        return 1000 * float(np.median(times))

    return {"images_per_pass": per_pass, "arena": arena, "loaded_pss_mb": loaded, "after_32_images_pss_mb": after,
            "p50_1_image_ms": median_ms(images[:1], 30), "p50_32_images_ms": median_ms(images, 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("ROW " + json.dumps(child(args.bundle, int(args.child[0]), args.child[1] == "1")))
        return
    from bench.common import save, table  # not in the measured processes: it imports torch

    rows = []
    for per_pass, arena in CONFIGS:
        out = subprocess.run([sys.executable, "-m", "bench.engine_memory", "--bundle", args.bundle, "--child",
                              str(per_pass), "1" if arena else "0"], check=True, text=True,
                             stdout=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
        rows.append(json.loads(next(line[4:] for line in out.splitlines() if line.startswith("ROW "))))
        print(table(rows[-1:], COLUMNS), flush=True)
    print(table(rows, COLUMNS))
    print(f"wrote {save('engine_memory', {'rows': rows})}")


if __name__ == "__main__":
    main()
