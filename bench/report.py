"""Render bench/results/*.json as the results section of docs/benchmarks.md (between the results markers).

python -m bench.report            print the section
python -m bench.report --write    replace it in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import RESULTS, table

PAGE = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def section() -> str:
    parts = []
    quality, index, extraction, serving, pipeline = (load(n) for n in
                                                     ("quality", "index", "extraction", "serving", "pipeline"))
    if quality:
        m = quality["machine"]
        parts.append(f"Measured on {m['cores']} CPU cores ({m['cpu']}), torch {m['torch']}, {m['date']}.\n")
        parts.append("**1. Quality on Fashion-MNIST** — 10,000 test images as queries against the 60,000 train "
                     f"images; `python -m bench.quality --epochs {quality['config']['epochs']}` (training took "
                     f"{quality['train_seconds'] / 60:.1f} min wall "
                     f"for {quality['config']['epochs']} epochs):\n")
        parts.append(table(quality["rows"], ["embedding", "accuracy", "precision_at_1", "precision_at_10",
                                             "map_at_r", "map_full"]))
        parts.append("\n![accuracy and mAP by epoch](../bench/results/accuracy_map_by_epoch.png)\n")
    if pipeline:
        mm = pipeline["metrics"]
        parts.append(f"**Demo configuration** (`make demo`: 4 epochs, the 75/20/5 split of all 70k images): "
                     f"accuracy {mm.get('accuracy', float('nan')):.4f}, Precision@10 "
                     f"{mm.get('precision_at_10', float('nan')):.4f}, mAP@R {mm.get('map_at_r', float('nan')):.4f}, "
                     f"Annoy recall@10 {mm.get('index_recall_at_10', float('nan')):.4f}.\n")
    if index:
        parts.append(f"**2. Index** — Annoy against exact search on the trained embeddings "
                     f"({index['gallery'][0]:,} x {index['gallery'][1]}), {index['queries']} queries, k=10; "
                     "`python -m bench.index_speed`:\n")
        parts.append(table(index["rows"], ["method", "recall_at_10", "qps", "speedup", "build_seconds", "index_mb"]))
        best = index.get("best")
        if best:
            parts.append(f"\nFastest setting with recall@10 ≥ 0.99: **{best['method']}**, recall@10 "
                         f"{best['recall_at_10']:.4f} at {best['speedup']:.1f}× exact single-query speed.")
        parts.append("\n![recall against queries per second](../bench/results/recall_vs_qps.png)\n")
    if serving:
        parts.append("**3. Serving** — single-image queries against real servers of the demo bundle, in one run. "
                     "`v1`: the real `seldon-core-microservice` (`binData`) with an echo model, imgsim on PyTorch and "
                     "imgsim on ONNX Runtime (the default), all in the same wrapper and settings "
                     f"({', '.join(f'{k}={v}' for k, v in serving['settings'].items())}); `gRPC compact` asks for "
                     "the answer as a JSON string in `strData` (`meta.tags.format=compact`). `v2`: the real "
                     "MLServer as the `serve-v2` image runs it (`model_server/v2/serve.py`: Open Inference "
                     "Protocol, one process, "
                     f"{', '.join(f'{k}={v}' for k, v in serving.get('v2_settings', {}).items())}) with an echo "
                     "model and imgsim (an `images` BYTES tensor, typed tensors back), without and with MLServer's "
                     "adaptive batching "
                     f"({', '.join(f'{k}={v}' for k, v in serving.get('v2_batching', {}).items())}). `of_echo`: "
                     "against the same protocol's echo; `of_v1_onnx`: v2 imgsim against v1 imgsim on ONNX Runtime "
                     "(gRPC: its default `jsonData` answer). The load generator shares the same cores; "
                     "`python -m bench.serving`:\n")
        parts.append(table(serving["rows"], ["server", "protocol", "concurrency", "requests", "errors", "rps",
                                             "p50_ms", "p99_ms", "of_echo", "of_v1_onnx"]))
        before = load("serving-before")
        if before:
            parts.append(f"\nBefore ONNX Runtime and compact answers (the same script on {before['machine']['date']}: "
                         "PyTorch in every worker, `jsonData` answers only; the machine was less loaded then, so "
                         "compare the `of_echo` column):\n")
            parts.append(table(before["rows"], ["server", "protocol", "concurrency", "rps", "p50_ms", "p99_ms",
                                                "of_echo"]))
        if serving.get("memory"):
            parts.append("\nIdle PSS of each server after it answered (all its processes, shared pages once):\n")
            parts.append(table(serving["memory"], ["server", "idle_pss_mb"]))
        v2_http = load("v2_http")
        if v2_http:
            parts.append("\nMLServer's HTTP stack (the `v2` rows above run the image's: uvicorn with httptools, "
                         "answers not gzipped): uvicorn's pure-Python h11 parser against httptools, MLServer's gzip of "
                         "answers over 500 bytes on (its default) and off; each variant a real server, one client, "
                         f"{v2_http['rounds']} interleaved rounds of {v2_http['per_round']} queries; `answer`: what "
                         "a client that accepts gzip is sent (and its size unzipped); `python -m bench.v2_http`:\n")
            parts.append(table(v2_http["rows"], ["model", "http", "gzip", "answer", "requests", "p50_ms", "p90_ms",
                                                 "of_h11_gzip"]))
        if serving.get("protobuf"):
            parts.append(f"\ngRPC messages go through protobuf {serving['protobuf']}: seldon-core 1.18 pins "
                         "protobuf < 4, which ships no compiled module for Python 3.11, so a ranked answer as a "
                         "`jsonData` Struct (~1.2 kB) costs about 1.9 ms to serialise on the server and 0.8 ms to "
                         "parse on a Python client; as `strData` it costs microseconds.")
    if extraction:
        parts.append(f"\n**4. Extraction** — {extraction['images']:,} images, batch {extraction['batch']}; "
                     "`python -m bench.extraction`:\n")
        parts.append(table(extraction["rows"], ["path", "images_per_second", "ratio"]))
    if pipeline:
        parts.append(f"\n**5. Whole pipeline** — `{pipeline['command']}` from a fresh clone"
                     f"{' including the pip install' if pipeline['fresh_venv'] else ''}: "
                     f"{pipeline['wall_seconds'] / 60:.1f} min wall (exit {pipeline['exit_code']}); "
                     "`python -m bench.pipeline`.\n")
    parts += own_images_sections()
    parts += hold_up_sections()
    parts += gallery_sections()
    parts += scale_sections()
    parts += page_sections()
    parts += index_backend_sections()
    parts += filter_sections()
    parts += shard_sections()
    parts += change_sections()
    parts += inflight_sections()
    parts += reuse_sections()
    parts += engine_memory_sections()
    parts += int8_sections()
    parts += pod_memory_sections()
    parts += serving_precision_sections()
    parts += crossover_sections()
    parts += index_10m_sections()
    return "\n".join(parts)


def page_sections() -> list[str]:
    """The search page under hostile clients."""
    page = load("hostile_page")
    if not page:
        return []
    return ["**14. The search page under hostile clients** — `imgsim ui` (gunicorn, gevent worker) in front of the "
            "real server on the demo bundle; PSS of all page processes sampled every 50 ms; `python -m "
            "bench.hostile_page`. Bodies over the limit, 4 clients each (the MiB column is what the client had "
            "written when the 413 arrived, socket buffers included; the page reads at most the route's limit):\n",
            table(page["bodies"], ["case", "clients", "answers", "max_mib_sent_before_answer"]),
            "\nNormal requests (page, thumbnail, search in turn) from one client while 32 connections trickle their "
            "headers and 8 send nothing:\n",
            table([page["slow"]], ["slow_connections", "silent_connections", "normal_requests", "2xx", "4xx", "5xx",
                                   "p50_ms", "p99_ms", "max_ms", "slow_closed_by_page"]),
            "\nPalette-bomb thumbnails (transparent palette PNGs, 3 views each by 4 clients; the 40 MP one is over "
            "the 12 MP limit):\n",
            table([{"file": k, "what": v} for k, v in page["files"].items()], ["file", "what"]), "",
            table([page["bombs"]], ["clients", "requests", "2xx", "4xx", "5xx"]), "",
            table(page["phases"], ["phase", "idle_pss_mb", "peak_pss_mb", "growth_mb"]),
            f"\nThe page answered afterwards: {page['ready_after']}. (`imgsim ui` serves the app the chart's gunicorn "
            "serves, `imgsim.serve.page`; the CLI loads torch only for a stage that needs it.)\n"]


def inflight_sections() -> list[str]:
    """The v2 server and the page under 100 stalled maximum-size uploads beside normal traffic."""
    v2, page = load("hostile_inflight"), load("hostile_page_stalls")
    parts = []
    if v2:
        args = v2["args"]
        rows = [{**r, "staller answers": ", ".join(f"{k} x{n}" for k, n in r["staller_answers"].items())}
                for r in v2["rows"]]
        parts += [f"**19. Stalled uploads in flight** — the Open Inference Protocol server (MLServer behind "
                  f"`model_server/v2/serve.py`'s guard) on the demo bundle; {args['stallers']} clients each declare a "
                  "16 MiB body, send all but its last byte and wait (answered, they wait the Retry-After and start "
                  f"again) while {args['clients']} clients query back to back (a 28x28 PNG, REST JSON, k = 5) for "
                  f"{args['seconds']:g} s; PSS of all server processes sampled every 50 ms; the serving defaults "
                  "against the guard's caps and deadline turned off, in one run; `python -m bench.hostile_inflight`:\n",
                  table(rows, ["config", "idle_pss_mb", "peak_pss_mb", "growth_mb", "queries", "p50_ms", "p99_ms",
                               "5xx_not_cap", "staller answers", "ready_after"]) + "\n"]
    if page and page.get("stalls"):
        st = page["stalls"]
        parts += ["The search page (`imgsim ui`, gunicorn's gevent worker, one worker with the chart pod's "
                  "per-worker cap) in front of the real server, 100 clients stalling the largest upload while one "
                  "sends normal requests; `python -m bench.hostile_page --stalls`:\n",
                  table([st], ["in_flight", "deadline_s", "stalled", "stalled_answers", "normal_requests", "normal_2xx",
                               "normal_cap_503", "5xx_not_cap", "normal_p50_ms", "normal_p99_ms", "idle_pss_mb",
                               "peak_pss_mb", "growth_mb"]) + "\n"]
    return parts


def reuse_sections() -> list[str]:
    """The colour default's train and extract with the backbone on torch or ONNX Runtime, with and without reuse."""
    sets = ("tuxpaint", "oxygen", "wesnoth")
    runs = [r for r in (load(f"reuse-{name}") for name in sets) if r]
    if not runs:
        return []
    columns = ["variant", "train_s", "extract_s", "total_s", "gallery_embedded", "extract_img_s", "precision_at_1",
               "served_p@1", "map_at_r", "index_recall_at_10"]
    parts = ["**20. No image embedded twice** — the colour default (head mode, every setting at its default but the "
             "two compared) trained and extracted in one process per variant, one run per dev set, nothing cached "
             "beforehand. `REV (before)`: the code before feature reuse (`--before REV`; extract at batch 64, because "
             "its default pass of 512 images took the process past 18 GB and was killed). Then this code: "
             "`torch-no-store` runs the backbone on eager torch (channels-last) in train and again in extract, "
             "`onnxruntime-no-store` on ONNX Runtime, and `torch-store` is the default: extract runs only the head "
             "on the features train kept, so only the test queries go through the backbone. `extract_img_s`: images "
             "through the backbone per second of extract's gallery embedding, decoding and perceptual hashes "
             "included. P@1 and mAP@R by exact search, `served_p@1` through the index at its tuned effort. `python -m "
             "bench.reuse --dataset NAME --before REV` (Tux Paint and Oxygen: `--variants torch-store`):\n"]
    for run in runs:
        rows = [{**r, "served_p@1": r.get("served_precision_at_1")} for r in run["rows"]]
        parts += [f"{run['dataset']} ({run['images']:,} images):\n", table(rows, columns) + "\n"]
    other = [r for r in (load(f"reuse-{name}-onnxruntime") for name in sets) if r]
    if other:
        rows = [{"dataset": run["dataset"], **r, "served_p@1": r.get("served_precision_at_1")}
                for run in other for r in run["rows"]]
        parts += ["The same with the backbone on ONNX Runtime (`--variants onnxruntime-store --tag -onnxruntime`, "
                  "earlier runs): the same speed, but its features differ from torch's by float rounding, and the "
                  "head trained on them lands elsewhere within seed noise (on Oxygen 0.013 mAP@R below the run "
                  "before it), so `backbone_runtime=auto` is torch:\n",
                  table(rows, ["dataset", *columns]) + "\n"]
    return parts


def engine_memory_sections() -> list[str]:
    """A serving process's memory with a colour bundle by ONNX Runtime's images per pass and arena."""
    mem = load("engine_memory")
    if not mem:
        return []
    return ["**21. A serving process's memory with a colour bundle** — the Wesnoth colour-default bundle (Lite0 at "
            "224 px, 1,408 dimensions, 1,451 items) loaded as a server loads it (verifying its 32 probes), then one "
            "request of 32 images; one fresh process per row, without torch, one ONNX Runtime thread. ONNX "
            "Runtime's CPU arena keeps the largest pass's activations for the process's life, so the images per "
            "pass fix each server process's memory; the serving engine now runs one image per pass "
            "(`imgsim.serve.runtime.RUN_CHUNK`), where it ran the probes, and any request, in one. `python -m "
            "bench.engine_memory --bundle FOLDER`:\n",
            table(mem["rows"], ["images_per_pass", "arena", "loaded_pss_mb", "after_32_images_pss_mb",
                                "p50_1_image_ms", "p50_32_images_ms"]) + "\n"]


def int8_sections() -> list[str]:
    """The colour default's retrieval quality and pace in float32 and int8, per dev set."""
    runs = [r for r in (load(f"int8-{name}") for name in ("tuxpaint", "oxygen", "wesnoth")) if r]
    if not runs:
        return []
    quality = [{"dataset": run["dataset"], **r} for run in runs for r in run["rows"]]
    rates = [{"dataset": run["dataset"], **r} for run in runs for r in run["extraction"]]
    latency = [{"dataset": run["dataset"], **r} for run in runs for r in run["latency"]]
    return ["**22. int8** — the colour default (one head-mode model per dev set, every setting at its default) "
            "extracted twice: `fp32` (the default: the head on the features train kept) and `int8` "
            "(`precision=int8`: ONNX Runtime's static quantization of the served model's backbone, QDQ with "
            "per-channel weights and MinMax activation ranges from 256 gallery images, the head in float32; that "
            "model embeds gallery and queries and is what the bundle serves). `d_`: against fp32 in the same run; "
            "`probe_cos`: cosine of the int8 and float32 embeddings of the bundle's 32 probe images. "
            "`python -m bench.int8 --dataset NAME`:\n",
            table(quality, ["dataset", "precision", "precision_at_1", "d_p@1", "map_at_r", "d_map_at_r",
                            "served_precision_at_1", "index_recall_at_10", "extract_s", "int8_probe_cosine_mean",
                            "int8_probe_cosine_min"]) + "\n",
            "The same runs' pace on 256 decoded gallery images, each path in a fresh process: images per second "
            "as extract runs it (64 images a call, all cores), and one image's latency on one thread as a server "
            "process runs the model (`ratio` against the first row of each dataset):\n",
            table(rates, ["dataset", "path", "images_per_second", "ratio"]) + "\n",
            table(latency, ["dataset", "model", "p50_ms", "p99_ms", "ratio"]) + "\n"]


def serving_precision_sections() -> list[str]:
    """A colour bundle's query latency and throughput on both servers, float32 against int8."""
    run = load("serving_precision")
    if not run:
        return []
    return ["**24. A colour bundle served in float32 and int8** — the Oxygen colour-default model's bundle at each "
            "precision (the same gallery), one single-image query at a time and 16 at once, each server for real "
            "on loopback with bench 3's worker settings (one ONNX Runtime thread a worker); the load generator "
            "shares the 2 cores. `python -m bench.serving_precision --fp32 FOLDER --int8 FOLDER`:\n",
            table(run["rows"], ["precision", "server", "protocol", "concurrency", "errors", "rps", "p50_ms",
                                "p99_ms", "p50_of_fp32", "rps_of_fp32"]) + "\n"]


def pod_memory_sections() -> list[str]:
    from bench import pod_memory

    return pod_memory.sections() if load("pod_memory") else []


def crossover_sections() -> list[str]:
    """Exact search against tuned approximate indexes at 1,408 dimensions, by gallery size."""
    run = load("crossover")
    if not run:
        return []
    return [f"**25. Exact search or an index, at {run['bundle_dim']:,} dimensions** — a colour bundle's embeddings "
            f"(Oxygen's) tiled with noise to each size, {run['queries']} other noisy copies as queries; each index "
            "built as extract builds it and its effort tuned to recall@10 0.99 (`imgsim.effort`), then one query at "
            "a time on one core. `p50_of_flat`: against exact search (faiss-flat) at the same size. On these tiled "
            "vectors (each image about 140 noisy copies at 10⁵) HNSW needed its largest efSearch from 30,000 items "
            "and fell short at 10⁵, which extract says when it happens. `python -m bench.crossover --bundle FOLDER`:\n",
            table(run["rows"], ["items", "backend", "effort", "recall_at_10", "p50_ms", "p99_ms", "p50_of_flat",
                                "build_s"]) + "\n"]


def index_10m_sections() -> list[str]:
    """IVF-PQ and the project's IVF (8-bit) at 10^7 vectors, built streamed."""
    run = load("index_10m")
    if not run:
        return []
    best = [{"index": name, **(r or {"nprobe": None})} for name, r in run["cheapest_at_target"].items()]
    at = run["disk_and_memory_at_1408d"]
    estimate = [{"index": f"ivfpq{e['m']}", "bytes_per_item": e["bytes_per_item"], "index_gb": e["index_gb"]}
                for e in at["ivfpq"]] + [{"index": "faiss-ivf (sq8)", **{k: at["faiss_ivf_sq8"][k] for k in
                                                                       ("bytes_per_item", "index_gb")}}]
    return [f"**26. 10⁷ items** — {run['n']:,} vectors of {run['dim']} dimensions (the demo's embeddings tiled with "
            f"noise, written {run['chunk_rows']:,} rows at a time to a {run['data_file_bytes'] / 1e9:.1f} GB file "
            f"and never in memory whole), {run['queries']:,} other noisy copies as queries. Each index built in fresh "
            "processes: k-means on a sample and every row's list (shared by the indexes with the same list count), "
            "then codes trained on the sample and rows added a chunk at a time; `peak_rss_mib`: the build's. "
            "Searched one query at a time on one core: R × 10 candidates re-ranked exactly on their rows read from "
            "the file (in page cache). `python -m bench.index_10m --work DIR`:\n",
            table(run["builds"], ["index", "lists", "code_bytes", "train_points", "coarse_train_s", "assign_s",
                                  "encoder_train_s", "encode_s", "build_s", "bytes_per_item", "peak_rss_mib"]) + "\n",
            "The settings swept up to 64 lists searched a query (`nprobe`; the JSON has up to 256), R × 10 "
            "re-ranked:\n",
            table([r for r in run["search"] if r["nprobe"] <= 64],
                  ["index", "nprobe", "refine", "recall_at_10", "p50_ms", "p99_ms", "qps_1"]) + "\n",
            f"The cheapest setting reaching recall@10 {run['target_recall']} per index (none: not reached):\n",
            table(best, ["index", "nprobe", "refine", "recall_at_10", "p50_ms", "p99_ms"]) + "\n",
            f"At the colour default's {at['dim']:,} dimensions the same 10⁷ items would need (by formula, not "
            f"measured) {at['raw_float32_on_disk_gb']:.0f} GB of float32 vectors on disk for re-ranking, and in "
            "memory:\n",
            table(estimate, ["index", "bytes_per_item", "index_gb"]) + "\n"]


def index_backend_sections() -> list[str]:
    """Annoy, faiss exact, HNSW and IVF side by side at 10^5 and 10^6 tiled demo embeddings."""
    ib = load("index_backends")
    if not ib:
        return []
    largest = max(r["items"] for r in ib["rows"])
    hnsw_build = next(r["build_s"] for r in ib["rows"] if r["items"] == largest and r["backend"] == "faiss-hnsw")
    return [f"**15. Index backends** — the demo gallery's own 128-d embeddings ({ib['queries']:,} of them held out "
            f"as queries), then tiled with noise (σ {ib['noise']} per dimension) to each size with {ib['queries']:,} "
            "other noisy copies as queries; k = 10; each backend at its "
            "default (annoy: 20 trees, search_k 1500; faiss-hnsw: M 32, efConstruction 80, efSearch "
            f"{ib.get('ef_search', 64)}; faiss-ivf: 4√n lists of 8-bit vectors, nprobe {ib.get('nprobe', 16)}, 4 × k "
            "candidates re-ranked with the memory-mapped embeddings, which its bytes_per_item, the index file's, "
            "leave out); one query per core, builds on all cores, each in a fresh process; "
            "`python -m bench.index_backends`:\n",
            table(ib["rows"], ["items", "data", "backend", "recall_at_10", "p50_ms", "p99_ms", "qps_1", "qps_4",
                               "qps_1_vs_annoy", "build_s", "bytes_per_item", "peak_build_mib"]),
            "\nqps_4 is four client threads on the 2 cores; below qps_1 where a query takes 0.1 ms or less, the threads "
            "contend for the interpreter (the server scales with worker processes, not threads). 10⁷ items were not "
            f"run: the HNSW build took {hnsw_build:.0f} s at {largest:,} items on 2 cores and grows faster than "
            "linearly, so it alone would take about half an hour.\n"
            "\nfaiss-hnsw's search effort (efSearch), swept at each size; the default is the smallest with "
            "recall@10 ≥ 0.99 at every size:\n",
            table(ib["ef_sweep"], ["items", "data", "ef_search", "recall_at_10", "qps_1"]) + "\n",
            *(["\nfaiss-ivf's search effort (lists searched, nprobe), swept the same way:\n",
               table(ib["nprobe_sweep"], ["items", "data", "lists", "nprobe", "recall_at_10", "qps_1"]) + "\n"]
              if ib.get("nprobe_sweep") else [])]


def filter_sections() -> list[str]:
    """Filtered queries (labels, excluded ids) per backend: the exact path against over-fetching the index."""
    f = load("filters")
    if not f:
        return []
    return [f"**16. Filtered queries** — the demo bundle ({f['gallery']:,} items, 10 labels), {f['queries']} gallery "
            "vectors as queries, k = 10, recall@10 against brute force over the admissible items; `default` ranks "
            "a label filter's items exactly (it admits at most 20,000 here), `index only` forces the over-fetch "
            "path (4× k candidates at a time) the default takes for larger label sets; `python -m bench.filters`:\n",
            table(f["rows"], ["backend", "filter", "path", "recall_at_10", "p50_ms", "p99_ms"]) + "\n"]


def shard_sections() -> list[str]:
    """A sharded gallery against the whole one per backend: recall, the critical path, what shard-bundle writes."""
    sh = load("shards")
    if not sh:
        return []
    columns = ["backend", "shards", "recall whole", "recall sharded", "p50 ms whole", "p50 ms slowest shard",
               "p50 ms merge", "shard-bundle s", "MB written", "whole bundle MB"]
    return [f"**17. Sharded gallery** — the demo bundle ({sh['gallery']:,} items) indexed whole and cut into shards by "
            f"`imgsim shard-bundle`; {sh['queries']:,} gallery vectors as queries (each query's own item left out), "
            "k = 10, recall@10 against brute force (faiss-flat's shortfall from 1 is ties between duplicate images); "
            "the sharded answer is each shard's top k merged by the graph's COMBINER code; latency in-process, the "
            "slowest shard being the critical path of the graph's parallel fan-out; `python -m bench.shards`:\n",
            table(sh["rows"], columns) + "\n"]


def change_sections() -> list[str]:
    """A gallery version stored as its changes over the base against a whole rebuilt copy, per backend."""
    ch = load("changes")
    if not ch:
        return []
    columns = ["backend", "version", "seconds", "index s", "MB stored", "recall@10", "search p50 ms", "vs whole"]
    return [f"**18. Gallery versions as changes** — the demo gallery ({ch['gallery']:,} items) indexed whole per "
            f"backend and registered in a fresh MLflow store; {ch['changed']} images it does not hold (1 %) added "
            "through the real `gallery add`, as changes over that version (the default) and as a whole rebuilt copy "
            f"(`--full`); then {ch['changed']} others removed as changes. seconds: the whole change (fetch, load and "
            "verify the parent, embed, check copies, measure recall, write, log); index s: the changed index made "
            "from base + changes against rebuilt whole from the same vectors; MB stored: what the version writes to "
            f"MLflow; search: {ch['queries']:,} gallery vectors as queries, k = 10, one thread, in-process, the "
            "versions timed in turn query by query; `python -m bench.changes`:\n",
            table(ch["rows"], columns) + "\n"]


def scale_sections() -> list[str]:
    """Extraction with 1 vs 2 shard processes, and the merge's index build at 10^5 and 10^6 embeddings."""
    scale = load("scale")
    if not scale:
        return []
    return [f"**13. Scale-out** — {scale['gallery']:,} Fashion-MNIST gallery images and {scale['queries']:,} queries "
            "embedded by real `imgsim extract` shard processes (wall time includes each process's start, ~5 s), "
            "then merged; the 2 cores shared as 1 process × 2 torch threads or 2 × 1; `python -m bench.scale`:\n",
            table(scale["extraction"], ["processes", "torch threads each", "images", "wall seconds", "images/s",
                                        "vs 1 process", "merge seconds"]),
            "\nThe merge's index build (GalleryIndex.build, 20 trees, 128-d unit vectors), each size in its own "
            "process:\n",
            table(scale["merge"], ["embeddings", "build seconds", "peak MB", "of which the data", "index files MB",
                                   "bytes per item"]) + "\n"]


def gallery_sections() -> list[str]:
    """Adding to and removing from the gallery vs a full extract, and the duplicate finder."""
    gallery = load("gallery")
    if not gallery:
        return []
    rows = gallery["rows"]
    d = gallery["defaults"]
    return [f"**12. Living gallery** — the demo model over the default split with {gallery['held_back']} training "
            "images held back, one fresh MLflow store; `gallery add` then adds exactly those, and `gallery remove` "
            f"removes {gallery['held_back']} others; recall@10 against exact search at the bundle's search_k; "
            "`python -m bench.gallery`:\n",
            table(rows, ["step", "images", "seconds", "vs extract", "recall@10"]),
            f"\nThe gallery part of extract alone (embedding + index build) took {gallery['extract_gallery_seconds']} s. "
            f"Duplicate finder (hash distance {d['hash_distance']}, embedding distance {d['embedding_distance']}):\n",
            table(gallery["duplicates"], ["scan", "seconds", "images/s", "exact pairs", "near pairs", "groups",
                                          "images in groups"]) + "\n"]


def hold_up_sections() -> list[str]:
    """The server's memory under hostile images, and the soak."""
    parts = []
    hostile, soak = load("hostile_memory"), load("soak")
    if hostile:
        parts.append("**10. Memory under hostile images** — the demo bundle served with the chart's worker settings; "
                     "4 concurrent clients each send every kind below as a REST JSON batch of 16 copies, as one "
                     "REST image and over gRPC (binData; for v2 an `images` tensor), 3 rounds; PSS of all server "
                     "processes sampled every 50 ms; the same mix against the bounded defaults, 2 decodes per "
                     "worker, split's 40 MP limit with no request budget or decode cap, and the Open Inference "
                     "Protocol server (MLServer, one process) on the defaults; `python -m bench.hostile_memory`:\n")
        parts.append(table([{"kind": k, "bytes": v} for k, v in hostile["payload_bytes"].items()], ["kind", "bytes"]))
        parts.append("")
        parts.append(table(hostile["rows"], ["config", "idle_pss_mb", "peak_pss_mb", "growth_mb", "requests", "2xx",
                                             "4xx", "5xx", "ready_after"]) + "\n")
    if soak:
        sm = soak["summary"]
        warm = f" after a {sm['warmup_seconds']:g} s warm-up of the same traffic" if sm.get("warmup_seconds") else ""
        parts.append(f"**11. Soak** — the demo bundle for {sm['minutes']:g} minutes{warm} at concurrency "
                     f"{sm['concurrency']}, 70 % good queries (binData, JSON image, batch of 4, id, path; REST and "
                     "gRPC) and 30 % bad ones (junk bytes, bad base64, k out of range, a 401-digit k, unknown id, "
                     "outside path, truncated PNG, 36 MP bombs, non-object bodies); `python -m bench.soak`:\n")
        parts.append(table(soak["minutes"], ["minute", "requests", "2xx", "4xx", "5xx", "p50_ms", "p99_ms", "pss_mb"]))
        parts.append(f"\n{sm['requests']:,} requests: {sm['2xx']:,} 2xx, {sm['4xx']:,} 4xx, **{sm['5xx']} 5xx**; "
                     f"PSS {sm['pss_start_mb']:,.0f} MB at the start, {sm['pss_end_mb']:,.0f} MB at the end "
                     f"(**{sm['pss_growth_pct']:+.1f} %**); ready afterwards: {sm['ready_after']}.\n")
    return parts


COLOUR_SETS = ("tuxpaint", "oxygen", "wesnoth")
# The notes under the table: hand-written, kept beside the results (bench/colour_notes.md), not in this code.
COLOUR_NOTES = Path(__file__).with_name("colour_notes.md")


def colour_rows() -> list[dict]:
    """Every measured route of every colour dev set, one table."""
    rows = []
    for name in COLOUR_SETS:
        for suffix in ("", "-scratch", "-ft"):
            q = load(f"quality-{name}{suffix}")
            for r in (q or {}).get("rows", []):
                if suffix and not r["embedding"].startswith(("scratch", "full", "trained")):
                    continue  # the baselines come from the main run
                route, _, how = r["embedding"].partition(": ")
                if route.startswith("trained"):  # files from before the routes: the then default, from scratch
                    route, how = "scratch", f"resnet_small, full, {route.split(', ')[1].rstrip(')')}"
                row = {"dev_set": name, "route": f"{route}: {how}" if how else route,
                             "precision_at_1": r["precision_at_1"], "precision_at_10": r["precision_at_10"],
                             "map_at_r": r["map_at_r"], "train_min": r.get("train_min", q.get("train_seconds", 0) / 60
                                                                         if route == "scratch" else None),
                             "embed_img_s": r.get("embed_img_s"), "size_px": r.get("size_px") or
                             (q.get("preprocess") or {}).get("size")}
                rows.append({k: v for k, v in row.items() if v is not None})
    return rows


def own_images_sections() -> list[str]:
    """Colour dev sets, the recipe sweep, and the streaming data path's memory and throughput."""
    parts = []
    rows = colour_rows()
    if rows:
        parts.append("**6. Quality on colour images** — the training routes side by side on three colour dev sets "
                     "built from Debian packages by `bench/colour_sets.py`: Tux Paint stamps by category (771 images, "
                     "13 classes); Oxygen icons by context (1,111, 9; one size per icon so near-duplicates cannot "
                     "straddle the split); Wesnoth map tiles by terrain (2,295, 18). 65/25/10 split, test images as "
                     "queries against train + eval; 2 CPU threads. `python -m bench.quality --dataset NAME --routes "
                     "pixels,features,head` (one run per set): raw pixels, the pretrained features as they are, and "
                     "the default (head mode). The from-scratch rows are the former default, from earlier runs "
                     "(`--routes scratch`, `quality-NAME-scratch.json`); Wesnoth's scratch run shared the two cores "
                     "with another job, so its time is an upper bound. Full fine-tuning was run on Tux Paint only (`--routes "
                     "full`: Lite0 at 128 px, 4 epochs, batch 32, lr 0.02). Throughput: the model's embedding rate "
                     "at its input size (torch, batch 64, decoded images).\n")
        parts.append(table(rows, ["dev_set", "route", "precision_at_1", "precision_at_10", "map_at_r", "train_min",
                                  "embed_img_s", "size_px"]) + "\n")
        parts.append(COLOUR_NOTES.read_text())
    allocator = load("allocator")
    if allocator:
        parts.append("CPU inference got faster on the way: `imgsim.nn.allocator` keeps freed memory in the "
                     "process, where glibc's malloc handed each batch's activations back to the kernel and "
                     f"page-faulted them in again (EfficientNet-Lite0 at 224 px, {allocator['images']} images, batch "
                     f"{allocator['batch']}, each row a fresh process); `python -m bench.allocator`:\n")
        parts.append(table(allocator["rows"], ["thresholds", "img_s", "user_s", "sys_s", "minor_faults"]) + "\n")
    sweeps = [s for s in (load("sweep-tuxpaint"), load("sweep-oxygen")) if s]
    if sweeps:
        rows = {}
        for sweep in sweeps:
            for r in sweep["rows"]:
                row = rows.setdefault(r["variant"], {"variant": r["variant"]})
                row[f"{r['dataset']}_p1"], row[f"{r['dataset']}_map_at_r"] = r["precision_at_1"], r["map_at_r"]
        base = ", ".join(f"{k}={v}" for k, v in sweeps[0]["base"].items())
        parts.append(f"**7. Recipe sweep** — one setting changed at a time from a base ({base}, cosine head, "
                     "photo augmentation, selection on eval mAP@R), both colour sets; `python -m bench.sweep` "
                     f"(run once on a GPU machine, torch {sweeps[0]['machine']['torch']}, to compare settings quickly; "
                     "~190 and ~275 queries, so differences under ~0.03 are noise):\n")
        parts.append(table(list(rows.values()), ["variant", "tuxpaint_p1", "tuxpaint_map_at_r", "oxygen_p1",
                                                 "oxygen_map_at_r"]) + "\n")
    memory, loader = load("memory"), load("loader")
    if memory:
        parts.append(f"**8. Memory of extract** — generated JPEGs embedded at {memory['size']} px, streamed through "
                     "the DataLoader (now) and decoded into one array first (before); `python -m bench.memory`:\n")
        parts.append(table(memory["rows"], ["path", "images", "peak_rss_mb", "worker_peak_rss_mb", "growth_mb",
                                            "seconds"]) + "\n")
    if loader:
        parts.append("**9. Fashion-MNIST throughput, streaming data path against the in-memory one it replaced** "
                     f"(train: {loader['train_images']:,} images of optimizer steps; extract: "
                     f"{loader['extract_images']:,} PNG files to embeddings); `python -m bench.loader`:\n")
        parts.append(table(loader["rows"], ["stage", "before_images_per_second", "now_images_per_second",
                                            "now_over_before"]) + "\n")
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true")
    text = section()
    if not parser.parse_args().write:
        print(text)
        return
    readme = PAGE.read_text()
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    PAGE.write_text(f"{head}{START}\n{text}\n{END}{tail}")
    print(f"updated {PAGE}")


if __name__ == "__main__":
    main()
