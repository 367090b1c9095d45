"""A closed-loop load generator shared by the serving benchmarks: ``concurrency`` threads, each with its own
connection, one request at a time. Needs only numpy, so it runs in MLServer's environment too (bench/oip_load.py).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import numpy as np

WARMUP = 20


def load(make_client, concurrency: int, total: int) -> dict:
    """``total`` requests from ``concurrency`` threads, each with its own connection; latencies in ms."""
    latencies, errors, lock = [], [0], threading.Lock()
    per_thread = total // concurrency

    def worker():
        call = make_client()
        for _ in range(WARMUP // concurrency + 1):
            call()
        barrier.wait()
        for _ in range(per_thread):
            started = time.perf_counter()
            ok = call()
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                latencies.append(elapsed)
                errors[0] += not ok

    barrier = threading.Barrier(concurrency + 1)
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(worker) for _ in range(concurrency)]
        barrier.wait()
        started = time.perf_counter()
        for f in futures:
            f.result()
        wall = time.perf_counter() - started
    return {"requests": len(latencies), "errors": errors[0], "rps": len(latencies) / wall,
            "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99))}
