#!/usr/bin/env bash
# Every benchmark, in dependency order; each prints a table and writes bench/results/<name>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
$PY -m bench.quality --epochs 20          # the default config for 20 epochs (~22 min on 2 cores)
$PY -m bench.quality --dataset tuxpaint   # colour dev sets with the defaults (~8 and ~7 min)
$PY -m bench.quality --dataset oxygen
$PY -m bench.memory                       # extract's peak memory at N and 10 x N images
$PY -m bench.loader                       # streaming vs in-memory data path on Fashion-MNIST
# bench/sweep.py (the recipe sweep behind the colour defaults) is not run here: ~2 h on 2 cores.
$PY -m bench.index_speed
$PY -m bench.extraction
$PY -m bench.serving
$PY -m bench.pipeline                     # `make demo` from a fresh clone, timed
# The server benches below use the demo bundle (bundles/demo): make it unless a valid one is there.
[ -f bundles/demo/bundle.json ] || bash scripts/demo.sh     # each bench also verifies it before use
$PY -m bench.v2_http                      # MLServer's HTTP parser and gzip, side by side (~2 min)
$PY -m bench.hostile_memory               # server memory under hostile images (~2 min)
$PY -m bench.hostile_page                 # the search page under hostile clients (~2 min)
$PY -m bench.soak                         # 10 minutes of mixed good and bad traffic
$PY -m bench.gallery                      # add/remove 1% of the gallery vs a full extract; duplicates (~10 min)
$PY -m bench.scale                        # 1 vs 2 shard processes; index build at 10^5 and 10^6 (~5 min)
$PY -m bench.index_backends               # annoy, faiss-flat, faiss-hnsw at 10^5 and 10^6 items (~10 min)
$PY -m bench.filters                      # label / excluded-id filters per backend (~1 min)
$PY -m bench.shards                       # a sharded gallery vs the whole one, per backend (~1 min)
$PY -m bench.changes                      # gallery versions as changes vs whole copies, per backend (~6 min)
$PY -m bench.report --write               # the results section of docs/benchmarks.md
