"""Bench: glibc's malloc thresholds and CPU inference (imgsim.nn.allocator), side by side in one run.

python -m bench.allocator [--images 192] [--batch 64]   -> a table; bench/results/allocator.json

Each row runs in a fresh process (a threshold, once raised, stays raised): EfficientNet-Lite0's pooled features
at 224 px, channels-last, as head mode computes them; user and system CPU seconds and minor page faults.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from bench.common import save, table

CHILD = """
import json, resource, sys, time, torch
from imgsim.nn import allocator
from imgsim.nn.efficientnet_lite import Lite0Trunk
raised = allocator.keep_freed_memory() if sys.argv[1] == "raised" else False
n, batch = int(sys.argv[2]), int(sys.argv[3])
model = Lite0Trunk().eval().to(memory_format=torch.channels_last)
x = torch.rand(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    model(x[:8])
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(max(1, n // batch)):
        model(x)
    seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"raised": raised, "img_s": max(1, n // batch) * batch / seconds,
                  "user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime,
                  "minor_faults": after.ru_minflt - before.ru_minflt}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    rows = []
    for mode in ("glibc defaults", "raised"):
        out = subprocess.run([sys.executable, "-c", CHILD, "raised" if mode == "raised" else "default",
                              str(args.images), str(args.batch)], capture_output=True, text=True, check=True)
        rows.append({"thresholds": mode, **json.loads(out.stdout.strip().splitlines()[-1])})
    rows.append({"thresholds": "ratio raised / defaults", "img_s": rows[1]["img_s"] / rows[0]["img_s"]})
    print(table(rows, ["thresholds", "img_s", "user_s", "sys_s", "minor_faults"]))
    print(f"wrote {save('allocator', {'images': args.images, 'batch': args.batch, 'rows': rows})}")


if __name__ == "__main__":
    main()
