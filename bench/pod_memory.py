"""Bench 23: a colour bundle in its pod. The memory of the real servers, on the chart's default worker settings, serving
a colour-default bundle grown to a gallery of 10^5 images, against the chart's memory limit.

python -m bench.pod_memory --bundle FOLDER [--bundle FOLDER2] [--items 100000]   -> bench/results/pod_memory.json

FOLDER (default $IMGSIM_COLOUR_BUNDLE): a colour-default serving bundle (``imgsim export``: EfficientNet-Lite0,
1,408-d vectors, Annoy), e.g. one made on a bench/colour_sets.py data set; a second --bundle (its int8 export, say)
adds rows. From each the bench builds a bundle of --items images in the work folder ($IMGSIM_BENCH_WORK, else
bench/results/pod_memory-data; reused on a later run): its embeddings tiled with Gaussian noise as
bench/index_backends.py tiles them (the first rows exact copies, so its probes stay valid), indexed as extract indexes
(the bundle's backend and n_trees, seed 42), its item table the original rows then synthetic ones, its model files
copied, and loaded (verified) once written. The chart is rendered with the real Helm engine, protocol seldon and
v2, and each server runs with the settings the rendered pod gets (its container's env and graph parameters): the
Seldon v1 wrapper (seldon-core-microservice: gunicorn's REST workers and the gRPC process each load the bundle) and
MLServer (model_server/v2). Per server and bundle: PSS and RSS of the whole server process tree once every process has
loaded it and it is idle; then REST queries of single gallery images (the bundle's 32 probe images as PNG, in turn,
from as many clients as the REST side has threads; the v1 server's gRPC process gets gRPC queries too) with PSS
sampled every 0.1 s for the peak, and PSS and RSS again once they are answered. The original bundle is a reference
row. The index pages the queries touch stay mapped: the PSS after queries is what the pod's limit has to hold (the
report gives it as a share of the chart's limit as the chart has it then; tests/test_pod_memory.py checks it).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import hashlib
import itertools
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import requests
import yaml

from bench.common import RESULTS, save, table
from bench.hostile import PeakSampler, encode, pss_mb, server_pids, smaps_mb
from bench.index_backends import tiled
from imgsim.bundle import ServingBundle
from imgsim.bundle_format import BUNDLE_JSON, read_meta
from imgsim.index import GalleryIndex, GalleryItem
from imgsim.stages.bundle_writer import write_bundle
from support.servers import REPO, Server, start_mlserver, start_server

CHART = REPO / "charts" / "imgsim"
ITEMS = 100_000  # the gallery size
REST_QUERIES, GRPC_QUERIES = 300, 100
SAMPLE_S = 0.1  # PSS sampling for the peak: a scan of every server process's smaps_rollup, on the same 2 cores
SEED = 42  # extract's index seed
# The variables start_server / start_mlserver set themselves (free loopback ports); the bundle is the built one.
OWN = {"MLSERVER_HTTP_PORT", "MLSERVER_GRPC_PORT", "MLSERVER_METRICS_PORT", "IMGSIM_MODEL_URI"}
COLUMNS = ["server", "bundle", "items", "processes", "idle_pss_mb", "after_pss_mb", "peak_pss_mb", "idle_rss_mb",
           "after_rss_mb", "queries", "after_of_limit"]


def work_dir() -> Path:
    return Path(os.environ.get("IMGSIM_BENCH_WORK") or RESULTS / "pod_memory-data")


# ---- the chart's pod ------------------------------------------------------------------------------------------------

def render(values: dict) -> list[dict]:
    """The chart's manifests with ``values`` over its defaults, from the real Helm engine (as tests/test_deploy.py)."""
    import helm_python as helm

    manifests = helm.Chart.load(CHART).render(values, name="sim", namespace="imgsim", is_install=True)
    return [doc for path, text in sorted(manifests.items()) if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


def server_container(protocol: str) -> tuple[dict, dict]:
    """The server container of the default release's SeldonDeployment under ``protocol``, and its graph node."""
    (sdep,) = [d for d in render({"server": {"protocol": protocol}}) if d["kind"] == "SeldonDeployment"]
    predictor = sdep["spec"]["predictors"][0]
    (component,) = predictor["componentSpecs"]
    (container,) = component["spec"]["containers"]
    return container, predictor["graph"]


def pod_env(protocol: str) -> dict[str, str]:
    """What the rendered pod sets for its server: the container's env (plain values; a secret's is no setting of
    ours) and, for seldon, the graph parameters as the IMGSIM_* variables the wrapper reads as well."""
    container, graph = server_container(protocol)
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    env |= {f"IMGSIM_{p['name'].upper()}": str(p["value"]) for p in graph.get("parameters", [])}
    return {k: v for k, v in env.items() if k not in OWN}


def chart_defaults() -> dict:
    """The chart's server settings as values.yaml has them, and the server container's memory as rendered."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    container, _ = server_container("seldon")
    keep = ("gunicornWorkers", "gunicornThreads", "grpcWorkers", "threads", "runtime")
    return {"server": {k: values["server"][k] for k in keep}, "resources": container["resources"]}


def quantity_mib(text: str) -> float:
    """A Kubernetes memory quantity (2Gi, 1536Mi, 2G, bytes) in MiB."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    text = str(text)
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[:-len(suffix)]) * factor / 2**20
    return float(text) / 2**20


# ---- the bundle -----------------------------------------------------------------------------------------------------

def grown(source: Path, items: int, work: Path) -> Path:
    """``source`` grown to ``items`` images in ``work`` (built once, reused while its source is the same)."""
    digest = hashlib.sha256((source / BUNDLE_JSON).read_bytes()).hexdigest()[:12]
    out = work / f"{source.resolve().name}-{items}-{digest}"
    if (out / BUNDLE_JSON).exists():
        ServingBundle.load(out)  # a broken leftover fails here, not in three server processes
        return out
    src = ServingBundle.load(source)
    if items <= len(src.index.items):
        raise SystemExit(f"--items {items} is no more than {source}'s own {len(src.index.items)}: nothing to grow")
    base = np.asarray(src.index.embeddings)
    vectors = tiled(base, items, seed=0)
    originals = src.index.items
    extra = [GalleryItem(src.index.next_id + j, f"{Path(o.path).with_suffix('')}-{j}{Path(o.path).suffix}",
                         o.label, o.split, hashlib.sha256(f"{source.name}/{j}".encode()).hexdigest(), o.phash)
             for j, o in zip(range(items - len(originals)), itertools.cycle(originals))]
    print(f"building a {items:,}-item {src.index.backend} index from {source} ...", flush=True)
    index = GalleryIndex.build(vectors, [*originals, *extra], n_trees=src.index.n_trees, seed=SEED,
                               backend=src.index.backend)
    bundle = ServingBundle(src.spec, index, src.probes, src.source, src.search_k, None,
                           onnx_parity=src.onnx_parity, quantization=dict(src.quantization), lineage=src.lineage)
    work.mkdir(parents=True, exist_ok=True)
    write_bundle(bundle, out, model_from=src.model_folder or source)
    ServingBundle.load(out)  # verified: probes, model and index agree
    return out


def query_images(bundle: Path) -> list[bytes]:
    """The bundle's probe images (real gallery pictures, as the model sees them) as PNGs."""
    from PIL import Image

    inputs = ServingBundle.load(bundle).probes.inputs
    return [encode(Image.fromarray(p[0] if p.shape[0] == 1 else p.transpose(1, 2, 0)), "PNG") for p in inputs]


# ---- the servers ----------------------------------------------------------------------------------------------------

def rss_mb(leader: int) -> float:
    """Resident set size summed over the server's processes (shared pages counted in each: for reference)."""
    return smaps_mb(leader, "Rss")


def rest_queries(call, images: list[bytes], clients: int, total: int) -> int:
    """``total`` single-image queries from ``clients`` threads, each image in turn; the number that failed."""
    bodies, errors, lock = itertools.cycle(images), [0], threading.Lock()

    def client(n: int) -> None:
        session = requests.Session()
        for _ in range(n):
            with lock:
                image = next(bodies)
            ok = call(session, image)
            with lock:
                errors[0] += not ok
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, [total // clients + (i < total % clients) for i in range(clients)]))
    return errors[0]


def v1_call(server: Server):
    def call(session: requests.Session, image: bytes) -> bool:
        reply = session.post(f"{server.rest}/api/v1.0/predictions", timeout=60,
                             json={"binData": base64.b64encode(image).decode()})
        return reply.ok and "jsonData" in reply.json()
    return call


def v2_call(server: Server):
    from bench.serving import v2_body

    def call(session: requests.Session, image: bytes) -> bool:
        reply = session.post(f"{server.rest}/v2/models/imgsim/infer", json=v2_body(image), timeout=60)
        return reply.ok and "outputs" in reply.json()
    return call


def grpc_queries(server: Server, images: list[bytes], total: int) -> int:
    from bench.serving import grpc_client

    calls = [grpc_client(server.grpc, image) for image in images]
    return sum(not calls[i % len(calls)]() for i in range(total))


def measure(protocol: str, bundle: Path, env: dict[str, str], images: list[bytes], clients: int, log: Path) -> dict:
    uri = {"IMGSIM_MODEL_URI": str(bundle)}
    server = start_server(env | uri, log, every_process=True, timeout=900) if protocol == "seldon" else \
        start_mlserver(env | uri, log, timeout=900)
    try:
        time.sleep(3)  # past start-up: what the pod holds between requests
        leader = server.proc.pid
        row = {"processes": len(server_pids(leader)), "idle_pss_mb": pss_mb(leader), "idle_rss_mb": rss_mb(leader)}
        with PeakSampler(leader, SAMPLE_S) as peak:
            errors = rest_queries(v1_call(server) if protocol == "seldon" else v2_call(server), images, clients,
                                  REST_QUERIES)
            queries = f"{REST_QUERIES} REST"
            if protocol == "seldon":  # the gRPC process loads the bundle too: it answers its share
                errors += grpc_queries(server, images, GRPC_QUERIES)
                queries += f" + {GRPC_QUERIES} gRPC"
        if errors:
            raise RuntimeError(f"{errors} of the queries to {bundle} failed:\n{server.logs()}")
        time.sleep(2)
        row |= {"after_pss_mb": pss_mb(leader), "peak_pss_mb": max(peak.peak, pss_mb(leader)),
                "after_rss_mb": rss_mb(leader), "queries": queries, "errors": errors, "clients": clients}
    finally:
        server.stop()
    return row


SERVERS = {"seldon": "v1 (Seldon)", "v2": "v2 (MLServer)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("IMGSIM_COLOUR_BUNDLE")
    parser.add_argument("--bundle", type=Path, action="append", default=None,
                        help="a colour-default bundle folder (repeat for more rows; default $IMGSIM_COLOUR_BUNDLE)")
    parser.add_argument("--items", type=int, default=ITEMS)
    parser.add_argument("--protocols", default="seldon,v2")
    args = parser.parse_args()
    sources = args.bundle or ([Path(default)] if default else [])
    if not sources:
        parser.error("--bundle FOLDER is required (or set IMGSIM_COLOUR_BUNDLE)")
    chart = chart_defaults()
    limit = quantity_mib(chart["resources"]["limits"]["memory"])  # for the printed table: the report reads today's
    envs = {p: pod_env(p) for p in args.protocols.split(",")}
    # Both servers get as many clients at once as the chart's REST side has threads.
    clients = chart["server"]["gunicornWorkers"] * chart["server"]["gunicornThreads"]
    rows = []
    for source in sources:
        images = query_images(source)
        for bundle in (source, grown(source, args.items, work_dir())):
            items = read_meta(bundle)["index"]["count"]
            for protocol, env in envs.items():
                log = RESULTS / f"pod_memory-{source.resolve().name}-{items}-{protocol}.log"
                rows.append({"server": SERVERS[protocol], "protocol": protocol, "bundle": source.resolve().name,
                             "items": items, **measure(protocol, bundle, env, images, clients, log)})
                print(rows[-1], flush=True)
    print(table(of_limit(rows, limit), COLUMNS))
    saved = save("pod_memory", {"items": args.items, "chart": chart, "env": envs, "rows": rows})
    print(f"wrote {saved}")


def of_limit(rows: list[dict], limit_mib: float) -> list[dict]:
    """The rows with their PSS after queries as a share of a memory limit."""
    return [r | {"after_of_limit": r["after_pss_mb"] / limit_mib} for r in rows]


def sections() -> list[str]:
    """The report's section: each server's memory against the chart's limit, at the bundle's own size and 10^5."""
    path = RESULTS / "pod_memory.json"
    if not path.exists():
        return []
    mem = json.loads(path.read_text())
    s = mem["chart"]["server"]
    limit = yaml.safe_load((CHART / "values.yaml").read_text())["resources"]["limits"]["memory"]  # the chart's now
    return [f"**23. A colour bundle in its pod** — the real v1 (Seldon: {s['gunicornWorkers']} REST workers x "
            f"{s['gunicornThreads']} threads and {s['grpcWorkers']} gRPC process, each loading the bundle) and v2 "
            "(MLServer) servers with the settings the chart's default pod gets, serving a colour-default bundle at "
            f"its own size and tiled to {mem['items']:,} images; PSS and RSS (MiB) of the whole server process tree "
            "once loaded and idle, and peak during and after single-image queries; the share of the chart's memory "
            f"limit ({limit}) that the PSS after queries takes; `python -m bench.pod_memory --bundle FOLDER`:\n",
            table(of_limit(mem["rows"], quantity_mib(limit)), COLUMNS) + "\n"]


if __name__ == "__main__":
    main()
