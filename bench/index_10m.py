"""IVF-PQ at 10^7 128-d vectors streamed from disk: build time, index bytes, peak RSS, recall@10 and latency.

python -m bench.index_10m [--n 10000000] [--queries 1000] [--work DIR] [--pq 16,32] [--nprobe 16,32,64,128,256]
                          [--refine 1,4,10,20]   -> bench/results/index_10m.json   (after `make demo`)

The gallery is bench/index_backends.py's tiling of the demo embeddings (noise NOISE, re-normalised), written CHUNK
rows at a time to a float32 .npy in the work dir ($IMGSIM_BENCH_WORK, else bench/results/index_10m-data; reused, as
are the exact top-10 and each list count's k-means and list assignment) and never in memory whole. Indexes: faiss
IVF-PQ at each --pq bytes per vector (--pq-lists lists; by default the project's count, so all share one k-means:
4,096 at 10^7, 2,441 rows a list) and the project's faiss-ivf (8-bit
scalar quantization, imgsim.index.IVF_*). Builds run on all cores in fresh processes (so peak RSS is the build's):
k-means on a sample and every row's list (shared by the IVF-PQs, counted in each one's build_s), then codes trained
on the sample's residuals and rows added a chunk at a time. Search: one query at a time on one faiss thread; per
nprobe and re-rank factor R (R x k candidates ranked exactly on their rows read from the memory-mapped file; R=1
none), recall@10 against exact search, p50/p99 ms of the whole query and queries/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from imgsim.index import IVF_LISTS_PER_SQRT, IVF_MAX_LISTS, IVF_NPROBE, IVF_REFINE, IVF_TRAIN_PER_LIST
from imgsim.metrics import recall_at_k

CHUNK = 250_000  # rows generated, read and added at a time: 128 MB of float32, whatever n is
TRAIN_CAP = 1 << 20  # k-means sample: IVF_TRAIN_PER_LIST a list up to this (655k points at 16,384 lists)
PQ_TRAIN = 256 * 256  # faiss trains each PQ sub-quantizer on at most 256 points per centroid
GT_BLOCK = 1 << 25  # query x gallery similarities ranked at once: 128 MB of float32 (and twice that of indices)
ROOT = Path(__file__).resolve().parents[1]


def status(key: str) -> int:  # a /proc/self/status field in bytes (VmHWM: peak RSS, mapped file pages included)
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key))) * 1024


def pq_lists(n: int, asked: int = 0) -> int:
    """``asked``, else the project's own count (faiss advises 4-16 sqrt(n), 12,649-50,596 at 10^7: k-means on 2
    cores at 16,384 lists took an estimated 22 min and assigning 10^7 rows 31 more; lists set the coarse recall,
    which nprobe sweeps, not the codes' precision)."""
    return asked or sq8_lists(n)


def sq8_lists(n: int) -> int:  # what imgsim.index.FaissBackend.build picks
    return max(1, min(int(IVF_LISTS_PER_SQRT * np.sqrt(n)), IVF_MAX_LISTS, n // IVF_TRAIN_PER_LIST))


def ivf_bytes(n: int, dim: int, lists: int, code: int, direct_map: bool = False) -> int:
    return n * (code + 8 + 8 * direct_map) + lists * dim * 4


def layout(path: Path) -> tuple[tuple, np.dtype, int]:
    mm = np.load(path, mmap_mode="r")
    return mm.shape, mm.dtype, mm.offset


def read(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a .npy by a plain read, so streaming it leaves no mapped pages in this process's RSS."""
    shape, dtype, offset = layout(path)
    row = int(np.prod(shape[1:]))
    out = np.fromfile(path, dtype, (stop - start) * row, offset=offset + start * row * dtype.itemsize)
    return out.reshape(-1, *shape[1:])


def sample(path: Path, rows: np.ndarray) -> np.ndarray:  # the sorted ``rows``, gathered chunk by chunk
    (n, dim), _, _ = layout(path)
    out = np.empty((len(rows), dim), np.float32)
    for s in range(0, n, CHUNK):
        lo, hi = np.searchsorted(rows, [s, s + CHUNK])
        if hi > lo:
            out[lo:hi] = read(path, s, min(n, s + CHUNK))[rows[lo:hi] - s]
    return out


def progress(label: str, done: int, total: int, started: float, last: list) -> None:  # a line at most each 15 s
    if done == total or time.perf_counter() - last[0] > 15:
        last[0] = time.perf_counter()
        print(f"  {label}: {done:,}/{total:,} ({last[0] - started:.0f} s)", file=sys.stderr, flush=True)


def generate(path: Path, base: np.ndarray, n: int, seed: int) -> float | None:
    """index_backends.tiled, a chunk at a time (each its own seeded stream); None when the file is already there."""
    from bench.index_backends import NOISE
    if path.exists() and layout(path)[0] == (n, base.shape[1]):
        return None
    started, last, tmp = time.perf_counter(), [0.0], path.with_suffix(".partial.npy")  # renamed when complete
    np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, base.shape[1]))  # sized, then closed
    for c, s in enumerate(range(0, n, CHUNK)):
        rng, idx = np.random.default_rng([seed, c]), np.arange(s, min(n, s + CHUNK))
        x = base[np.where(idx < len(base), idx, rng.integers(0, len(base), len(idx)))].astype(np.float32)
        noisy = idx >= len(base)  # the first len(base) rows are exact copies, as in tiled()
        x[noisy] += NOISE * rng.standard_normal((int(noisy.sum()), x.shape[1]), dtype=np.float32)
        out = np.lib.format.open_memmap(tmp, mode="r+")  # mapped per chunk: written pages leave this RSS on del
        out[s:s + len(idx)] = x / np.linalg.norm(x, axis=1, keepdims=True)
        del out
        progress("vectors written", s + len(idx), n, started, last)
    tmp.replace(path)
    return time.perf_counter() - started


def ground_truth(path: Path, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k (inner product) over the file, a block of rows at a time with a running top-k."""
    n = layout(path)[0][0]
    best_s, best_i = np.full((len(queries), k), -np.inf, np.float32), np.zeros((len(queries), k), np.int64)
    step, started, last = max(1024, GT_BLOCK // len(queries)), time.perf_counter(), [0.0]
    for s in range(0, n, step):
        sims = queries @ read(path, s, min(n, s + step)).T
        kk = min(k, sims.shape[1])  # the last block may be shorter than k
        part = np.argpartition(sims, sims.shape[1] - kk, axis=1)[:, -kk:]
        cand_s = np.concatenate([best_s, np.take_along_axis(sims, part, 1)], 1)
        cand_i = np.concatenate([best_i, part + s], 1)
        keep = np.argpartition(cand_s, cand_s.shape[1] - k, axis=1)[:, -k:]  # the k largest of both
        best_s, best_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
        progress("ground truth rows", min(n, s + step), n, started, last)
    return np.take_along_axis(best_i, np.argsort(-best_s, axis=1), 1)


def worker(spec: str) -> None:
    """One build step in a fresh interpreter: "coarse" (k-means, every row's list) or "encode" (codes, add)."""
    import faiss
    p, started = json.loads(spec), time.perf_counter()
    path, before, lists = Path(p["vectors"]), status("VmRSS:"), p["lists"]
    (n, dim), _, _ = layout(path)
    xs = sample(path, np.sort(np.random.default_rng(0).choice(n, p["train"], replace=False)))
    out = {"sample_read_s": time.perf_counter() - started}
    quantizer, started, last = faiss.IndexFlatIP(dim), time.perf_counter(), [0.0]
    if p["step"] == "coarse":
        index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)  # spherical k-means, as any IVF
        index.cp.min_points_per_centroid = 1  # as imgsim.index's faiss-ivf (it only silences a warning here)
        index.verbose = index.cp.verbose = True  # k-means prints its iterations: minutes at 10^7
        index.train(xs)
        out["coarse_train_s"], started, xs = time.perf_counter() - started, time.perf_counter(), None
        assign = np.empty(n, np.int64)
        for s in range(0, n, CHUNK):
            assign[s:s + CHUNK] = quantizer.search(read(path, s, min(n, s + CHUNK)), 1)[1][:, 0]
            progress(f"{lists:,} lists, rows assigned", min(n, s + CHUNK), n, started, last)
        out["assign_s"] = time.perf_counter() - started
        np.save(p["centroids"], quantizer.reconstruct_n(0, lists))
        np.save(p["assign"], assign)
    else:
        quantizer.add(np.load(p["centroids"]))  # trained: index.train skips the k-means
        if p["m"]:
            index = faiss.IndexIVFPQ(quantizer, dim, lists, p["m"], 8, faiss.METRIC_INNER_PRODUCT)
            xs = xs[:PQ_TRAIN].copy()  # what faiss's PQ training would sample of them anyway
        else:  # as imgsim.index.FaissBackend.build makes faiss-ivf
            index = faiss.IndexIVFScalarQuantizer(quantizer, dim, lists, faiss.ScalarQuantizer.QT_8bit,
                                                  faiss.METRIC_INNER_PRODUCT)
        index.verbose = True
        index.train(xs)
        out["encoder_train_s"], started, index.verbose = time.perf_counter() - started, time.perf_counter(), False
        del xs  # not held while the lists grow
        for s in range(0, n, CHUNK):  # ids are the rows, in order; lists as assigned in the coarse step
            x, a = read(path, s, min(n, s + CHUNK)), read(Path(p["assign"]), s, min(n, s + CHUNK))
            index.add_core(len(x), faiss.swig_ptr(x), None, faiss.swig_ptr(a))
            progress(f"{p['name']} rows added", min(n, s + CHUNK), n, started, last)
        if not p["m"]:
            index.make_direct_map()  # the project's faiss-ivf keeps one (8 B per item)
            index.nprobe = IVF_NPROBE
        out["encode_s"] = time.perf_counter() - started
        faiss.write_index(index, p["out"])
    out.update(peak_rss_mib=status("VmHWM:") / 2**20, peak_step_mib=(status("VmHWM:") - before) / 2**20)
    Path(p["result"]).write_text(json.dumps(out))


def step(spec: dict) -> dict:
    """A worker step in a fresh process; the coarse step's files are reused when there (keyed by data and lists)."""
    if not Path(spec["result"]).exists():
        subprocess.run([sys.executable, "-c", "import sys; from bench.index_10m import worker; worker(sys.argv[1])",
                        json.dumps(spec)], check=True, cwd=ROOT)
    return json.loads(Path(spec["result"]).read_text())


def sweep(index, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int, nprobes, refines) -> list:
    """Single-query latency of search + exact re-rank of R x k candidates read from the memmap."""
    rows = []
    for nprobe in nprobes:
        index.nprobe = nprobe
        for r in refines:
            found, lat, started = [], [], time.perf_counter()
            for q in queries:
                t = time.perf_counter()
                ids = index.search(q[None], r * k)[1][0]
                if r > 1:
                    ids = np.sort(ids[ids >= 0])  # sorted: the memmap reads in file order
                    ids = ids[np.argsort(vectors[ids] @ q)[::-1][:k]]
                lat.append(time.perf_counter() - t)
                found.append(ids[:k].tolist())
            rows.append({"nprobe": nprobe, "refine": r, "candidates": r * k,
                         "recall_at_10": recall_at_k(found, truth, k),
                         "p50_ms": 1000 * float(np.percentile(lat, 50)), "p99_ms": 1000 * float(np.percentile(lat, 99)),
                         "qps_1": len(queries) / (time.perf_counter() - started),
                         "project_default": None if r != IVF_REFINE or nprobe != IVF_NPROBE else True})
    return rows


def main() -> None:
    import faiss
    from bench.common import RESULTS, save, table
    from bench.index_backends import K, N_QUERIES, NOISE, TARGET_RECALL, tiled
    faiss.omp_set_num_threads(1)  # searching: one core per query, as a serving process
    ints = lambda s: [int(v) for v in s.split(",") if v]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10**7)
    parser.add_argument("--queries", type=int, default=N_QUERIES)
    parser.add_argument("--work", default=os.environ.get("IMGSIM_BENCH_WORK") or str(RESULTS / "index_10m-data"))
    parser.add_argument("--bundle", default="bundles/demo", help="a bundle whose embeddings.npy to tile")
    parser.add_argument("--pq", type=ints, default="16,32,64", help="IVF-PQ bytes per vector to build")
    parser.add_argument("--pq-lists", type=int, default=0, help="IVF-PQ's lists; 0: the project's faiss-ivf count")
    parser.add_argument("--nprobe", type=ints, default="16,32,64,128,256")
    parser.add_argument("--refine", type=ints, default="1,4,10,20,50", help="re-rank factors R (1 = none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    base_file, work, n = Path(args.bundle) / "embeddings.npy", Path(args.work), args.n
    if not base_file.exists():
        raise SystemExit(f"{base_file} not found: run `make demo` first (or pass --bundle)")
    work.mkdir(parents=True, exist_ok=True)
    base, path = np.load(base_file), work / f"vectors-n{n}-s{args.seed}.npy"
    print(f"{n:,} vectors -> {path}", flush=True)
    gen_s = generate(path, base, n, args.seed)
    queries = tiled(base, len(base) + args.queries, seed=args.seed + 1)[len(base):]  # other noisy copies
    truth_file, truth_s, started = work / f"truth-n{n}-q{args.queries}-s{args.seed}.npy", None, time.perf_counter()
    if not truth_file.exists():
        np.save(truth_file, ground_truth(path, queries, K))
        truth_s = time.perf_counter() - started
    truth, started = np.load(truth_file), time.perf_counter()
    for s in range(0, n, CHUNK):  # one pass through the file, so re-ranking reads hit the page cache if it fits
        read(path, s, min(n, s + CHUNK))
    warm_s, vectors, dim = time.perf_counter() - started, np.load(path, mmap_mode="r"), base.shape[1]
    builds, searches, best, made = [], [], {}, set()
    plan = [(f"ivfpq{m}", m, pq_lists(n, args.pq_lists)) for m in args.pq] + [("faiss-ivf-sq8", 0, sq8_lists(n))]
    for name, m, lists in plan:
        stem, train = work / f"{path.stem}-l{lists}", min(n, TRAIN_CAP, IVF_TRAIN_PER_LIST * lists)
        spec = {"name": name, "m": m, "lists": lists, "train": train, "vectors": str(path),
                "centroids": f"{stem}-centroids.npy", "assign": f"{stem}-assign.npy", "out": f"{work / name}-n{n}.faiss"}
        print(f"building {name} ({lists:,} lists, k-means on {train:,} rows)", flush=True)
        earlier = Path(f"{stem}-coarse.json").exists() and lists not in made
        coarse = step({**spec, "step": "coarse", "result": f"{stem}-coarse.json"})
        made.add(lists)
        Path(f"{work / name}-n{n}.json").unlink(missing_ok=True)  # the index is always rebuilt: that is the measure
        enc = step({**spec, "step": "encode", "result": f"{work / name}-n{n}.json"})
        size, code = Path(spec["out"]).stat().st_size, m or dim
        builds.append({"index": name, "lists": lists, "code_bytes": code, "train_points": train,
                       **{k: coarse[k] for k in ("coarse_train_s", "assign_s")},
                       **{k: enc[k] for k in ("encoder_train_s", "encode_s")},
                       "build_s": sum(v for k, v in [*coarse.items(), *enc.items()] if k.endswith("_s")),
                       "coarse_from_earlier_run": earlier, "index_bytes": size, "bytes_per_item": size / n,
                       "formula_bytes_per_item": ivf_bytes(n, dim, lists, code, not m) / n,
                       "peak_build_mib": max(coarse["peak_step_mib"], enc["peak_step_mib"]),
                       "peak_rss_mib": max(coarse["peak_rss_mib"], enc["peak_rss_mib"])})
        print(table(builds[-1:], list(builds[-1])), flush=True)
        index = faiss.read_index(spec["out"])
        sweep(index, vectors, queries[:50], truth[:50], K, args.nprobe[:1], args.refine[-1:])  # warm-up
        rows = [{"index": name, **r} for r in sweep(index, vectors, queries, truth, K, args.nprobe, args.refine)]
        searches += rows
        best[name] = min((r for r in rows if r["recall_at_10"] >= TARGET_RECALL), key=lambda r: r["p50_ms"],
                         default=None)
        print(table(rows, list(rows[0])), flush=True)
        del index
    d, big = 1408, 10**7  # the colour default's vectors, at 10^7 items
    estimate = {"note": "estimates by formula, not measured: raw float32 on disk for re-ranking; in memory a code + "
                        "an 8-byte id per item (+ 8 B direct map for faiss-ivf) + the centroids. k-means, list "
                        "assignment and re-rank arithmetic grow about 11x (1408/128); recall at 1,408-d unmeasured",
                "items": big, "dim": d, "raw_float32_on_disk_gb": big * d * 4 / 1e9,
                "ivfpq": [{"m": m, "lists": pq_lists(big), "bytes_per_item": m + 8,
                           "index_gb": ivf_bytes(big, d, pq_lists(big), m) / 1e9} for m in (64, 128)],
                "faiss_ivf_sq8": {"lists": sq8_lists(big), "bytes_per_item": d + 16,
                                  "index_gb": ivf_bytes(big, d, sq8_lists(big), d, True) / 1e9}}
    process = {k.lower().strip(":") + "_mib": status(k) / 2**20 for k in ("VmHWM:", "RssAnon:", "RssFile:")}
    notes = ["data_generation_s / ground_truth_s are null when the work dir's copy was reused",
             "build_s = sample reads + k-means + list assignment + code training + adding, each step in a fresh "
             "process on all cores (peak_build_mib: its peak RSS above the interpreter's after imports; the data file "
             "is read, not mapped, so it is not in it); k-means and assignment ran once per list count",
             "IVF-PQ codes train on the sample's first 65,536 rows, what faiss's PQ would sample anyway",
             "search: one query at a time, faiss on 1 thread; p50/p99 cover search + re-rank",
             f"re-rank reads from page cache: the {path.stat().st_size / 1e9:.1f} GB file was read once before "
             "searching (page_cache_warm_s); without memory for it re-ranks read from disk. Rows touched count in "
             "the search process's RssFile",
             "faiss-ivf-sq8 is imgsim.index's faiss-ivf: IVF_* list count and sample, 8-bit SQ, direct map"]
    payload = {"n": n, "dim": dim, "queries": args.queries, "k": K, "noise": NOISE, "seed": args.seed,
               "chunk_rows": CHUNK, "data_file_bytes": path.stat().st_size, "data_generation_s": gen_s,
               "ground_truth_s": truth_s, "page_cache_warm_s": warm_s, "builds": builds, "search": searches,
               "target_recall": TARGET_RECALL, "cheapest_at_target": best, "search_process": process, "notes": notes,
               "disk_and_memory_at_1408d": estimate}
    columns = ["index", "lists", "code_bytes", "train_points", "coarse_train_s", "assign_s", "encoder_train_s",
               "encode_s", "build_s", "bytes_per_item", "peak_rss_mib"]
    print("\n" + table(builds, columns) + "\n\n" + table(searches, list(searches[0])))
    for name, r in best.items():
        print(f"{name}: " + (f"recall@10 >= {TARGET_RECALL} cheapest at nprobe {r['nprobe']}, R {r['refine']}: "
                             f"{r['p50_ms']:.2f} ms p50" if r else f"recall@10 {TARGET_RECALL} not reached"))
    print(f"search process: peak RSS {process['vmhwm_mib']:,.0f} MiB (mapped file pages {process['rssfile_mib']:,.0f})")
    print(f"wrote {save('index_10m', payload)}")


if __name__ == "__main__":
    main()
