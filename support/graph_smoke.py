"""scripts/podman-graph-smoke.sh's query: one image through a sharded gallery's graph nodes (containers on loopback
ports), compared with brute force over the whole gallery's embeddings. Exit status 1 if they differ.

python -m support.graph_smoke IMAGE BUNDLE EMBEDDER_URL MERGER_URL SHARD_URL...
"""

from __future__ import annotations

import argparse
import base64
import sys

import numpy as np

from imgsim.serve.search import Searcher
from support.servers import run_graph


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("bundle", help="the whole bundle the shards were cut from")
    parser.add_argument("embedder")
    parser.add_argument("merger")
    parser.add_argument("shards", nargs="+")
    parser.add_argument("-k", type=int, default=5)
    args = parser.parse_args()
    with open(args.image, "rb") as f:
        data = f.read()
    body = {"jsonData": {"image": base64.b64encode(data).decode(), "k": args.k}}
    answer = run_graph(body, args.embedder, args.shards, args.merger)
    answer.raise_for_status()
    got = [n["id"] for n in answer.json()["jsonData"]["results"][0]["neighbours"]]
    whole = Searcher(args.bundle)  # the same model embeds the image here as in the embedder container
    embedding = whole.embed_inputs(whole.preprocess.decode(data)[None])[0][0]
    exact = np.argsort(-(np.asarray(whole.index.embeddings) @ embedding), kind="stable")[:args.k]
    want = [whole.index.items[r].id for r in exact]
    print(f"graph-smoke: {args.image} through embedder -> {len(args.shards)} shards -> merger: {got}; exact: {want}")
    return 0 if set(got) == set(want) else 1


if __name__ == "__main__":
    sys.exit(main())
