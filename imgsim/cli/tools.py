"""The commands around the pipeline: the data set, the tracking store, bundles, in-process search, and the
steps around a running server (wait-ready, query)."""

from __future__ import annotations

from pathlib import Path

from imgsim.errors import ImgsimError, redact


def _prepare(ns):
    from imgsim.fashion_mnist import prepare
    print(f"image folder: {prepare(ns.out, source=ns.source, per_class=ns.per_class)}")


def _export(ns):
    from imgsim.runs import tracking
    from imgsim.runs.export import export_bundle
    if sum(map(bool, (ns.run, ns.uri, ns.result))) != 1:
        raise ImgsimError("give one of --run <extract run id>, --uri <runs:/..., models:/..., folder> or "
                          "--result <main's result file>")
    uri = f"runs:/{ns.run}" if ns.run else ns.uri or _result(ns.result).bundle_uri
    tracking.setup()
    print(f"bundle written to {export_bundle(uri, ns.out)}")


def _shard_bundle(ns):
    from imgsim.stages.sharding import shard_bundle
    summary = shard_bundle(ns.bundle, ns.out, ns.shards)
    print(f"sharded gallery {summary['gallery']} written to {summary['out']}: {summary['items']} images in "
          f"{summary['shards']} shards of {min(summary['shard_items'])}-{max(summary['shard_items'])}, plus the "
          f"embedder part ({summary['bytes'] / 1e6:.1f} MB). Serve it with the chart's serving.shards="
          f"{summary['shards']} and model.uri pointing at that folder's copy in your store.")


def _result(path: str):
    from imgsim.result import MainResult
    return MainResult.load(path)


def _pick_image(ns):
    from imgsim.manifest import Manifest
    from imgsim.runs import tracking
    if bool(ns.result) == bool(ns.manifest):
        raise ImgsimError("give --result <main's result file> or --manifest <runs:/<split run>/split or a folder>")
    uri = ns.manifest or _result(ns.result).manifest_uri
    if tracking.local_path(uri) is None:
        tracking.setup()
    with tracking.fetched(uri, "manifest") as folder:
        print(Manifest.load(folder).image_path(ns.split, ns.index))


def _report(ns):
    from imgsim.runs import tracking
    print(_result(ns.result).report())
    print(f"\nMLflow UI: mlflow ui --backend-store-uri {redact(tracking.tracking_uri())} --port 8080  "
          "(then open http://127.0.0.1:8080)")


def _wait_ready(ns):
    from imgsim.serve import client, protocols
    seconds = client.wait_ready(ns.url, ns.timeout_s, ns.pid, ns.log, protocols.protocol(ns.protocol, ns.model))
    print(f"server at {ns.url} ready after {seconds:.1f} s")


def _setup_tracking(ns):
    from imgsim.runs import tracking
    print(f"MLflow tracking: {tracking.setup()} (experiment {tracking.EXPERIMENT!r} or $MLFLOW_EXPERIMENT_NAME)")


def _search(ns):
    from imgsim.runs import tracking
    from imgsim.runs.export import fetched_bundle
    from imgsim.serve.search import Searcher
    tracking.setup()
    with fetched_bundle(ns.bundle) as folder:
        searcher = Searcher(folder)
        for image in ns.images:
            result = searcher.search_bytes([Path(image).read_bytes()], ns.k)[0]
            guess = f"predicted {result.predicted_label} (p={result.probability:.3f})" if result.predicted_label \
                is not None else "embed-only model: no classes"
            print(f"{image}: {guess}")
            for n in result.neighbours:
                print(f"  {n.rank:>3}  id={n.id:<7} {n.label:<14} score={n.score:.4f}  {n.path}")


def _query(ns):
    from imgsim.serve import client, protocols
    proto = protocols.protocol(ns.protocol, ns.model)
    if ns.grpc and proto.name == "v2":
        raise ImgsimError("--grpc speaks Seldon's protocol; for the Open Inference Protocol's gRPC use a KServe V2 "
                          "client (support/oip_client.py runs one in .venv-serve-v2), or ask over REST with --url")
    for image in ns.images:
        try:
            data = Path(image).read_bytes()
        except OSError as exc:
            raise ImgsimError(f"cannot read the image {image}: {exc.strerror}") from None
        where = client.filter_tags(ns.labels, ns.exclude_ids)
        answers = [("REST", client.query_rest(ns.url, data, ns.k, where, proto=proto))] if ns.url else []
        answers += [("gRPC", client.query_grpc(ns.grpc, data, ns.k, where))] if ns.grpc else []
        if not answers:
            raise ImgsimError("give --url http://HOST:9000 and/or --grpc HOST:5000")
        for protocol, answer in answers:
            print(client.format_table(f"{image} via {protocol}", answer))
        if ns.out:
            print(f"picture: {client.draw(data, answers[0][1], ns.gallery_root, Path(ns.out))}")


def add_parsers(sub) -> None:
    """The data set, the tracking store, bundles, in-process search, and the steps around a server."""
    p = sub.add_parser("prepare", help="write Fashion-MNIST out as a class-per-folder image tree")
    p.add_argument("--out", default="data/fashion-mnist", help="the image folder to write (default: %(default)s)")
    p.add_argument("--source", help="folder with the IDX files (default: Debian's dataset-fashion-mnist)")
    p.add_argument("--per-class", type=int, default=0, help="keep at most this many per class and part (0 = all)")
    p.set_defaults(fn=_prepare)
    p = sub.add_parser("export", help="write a verified serving bundle from an extract run")
    p.add_argument("--run", help="extract run id")
    p.add_argument("--uri", help="or any bundle URI: runs:/<id>/bundle, models:/name/version, models:/name@alias")
    p.add_argument("--result", help="or the result file of `imgsim main --result-file`: its bundle")
    p.add_argument("--out", required=True, help="the folder to write the bundle into (replaced atomically)")
    p.set_defaults(fn=_export)
    p = sub.add_parser("shard-bundle", help="cut a bundle into an embedder part and N index shards for the chart's "
                       "serving.shards")
    p.add_argument("bundle", help="the bundle folder (imgsim export)")
    p.add_argument("--shards", type=int, required=True, help="how many index shards (2 or more); an image goes to "
                   "shard id %% N")
    p.add_argument("--out", required=True, help="the folder to write embedder/ and shard-<i>/ into (replaced "
                   "atomically)")
    p.set_defaults(fn=_shard_bundle)
    p = sub.add_parser("setup-tracking", help="create the local MLflow store and experiment (mlflow run needs it first)")
    p.set_defaults(fn=_setup_tracking)
    p = sub.add_parser("report", help="print the runs and metrics of a `main` result file")
    p.add_argument("result", help="the result file of `imgsim main --result-file`")
    p.set_defaults(fn=_report)
    p = sub.add_parser("pick-image", help="print the path of one image of a split, e.g. a test image to query with")
    p.add_argument("--result", help="the result file of `imgsim main --result-file`: its manifest")
    p.add_argument("--manifest", help="or a manifest: runs:/<split run>/split or a folder")
    p.add_argument("--split", default="test", help="train, test or eval (default: %(default)s)")
    p.add_argument("--index", type=int, default=0, help="which image of the split, in manifest order (default: 0)")
    p.set_defaults(fn=_pick_image)
    p = sub.add_parser("search", help="query a bundle in-process (no server)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files to query with")
    p.add_argument("--bundle", required=True, help="bundle folder or URI")
    p.add_argument("-k", type=int, default=5, help="neighbours per image (default: %(default)s)")
    p.set_defaults(fn=_search)
    p = sub.add_parser("wait-ready", help="wait until a server answers its health check")
    p.add_argument("--url", default="http://127.0.0.1:9000", help="the server's REST endpoint (default: %(default)s)")
    p.add_argument("--timeout-s", type=float, default=120.0, help="give up after this many seconds (default: 120)")
    p.add_argument("--pid", type=int, help="the server's process: stop waiting if it exits")
    p.add_argument("--log", default="", help="the server's log file, named in the error if it does not come up")
    _protocol_args(p)
    p.set_defaults(fn=_wait_ready)
    p = sub.add_parser("query", help="ask a running server for the images most similar to IMAGE")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files to query with")
    p.add_argument("--url", help="REST endpoint, e.g. http://127.0.0.1:9000")
    p.add_argument("--grpc", help="gRPC endpoint, e.g. 127.0.0.1:5000")
    p.add_argument("-k", type=int, default=5, help="neighbours per image (default: %(default)s)")
    p.add_argument("--labels", help="only neighbours with one of these labels, comma-separated")
    p.add_argument("--exclude-ids", help="never these gallery ids, comma-separated")
    p.add_argument("--out", help="write a PNG of the query beside its neighbours")
    p.add_argument("--gallery-root", help="local copy of the gallery, to draw the neighbours in --out")
    _protocol_args(p)
    p.set_defaults(fn=_query)


def _protocol_args(p) -> None:
    from imgsim.serve.protocols import DEFAULT_V2_MODEL, PROTOCOLS
    p.add_argument("--protocol", choices=PROTOCOLS, default="seldon", help="seldon: the Seldon v1 server "
                   "(model_server/ModelServer.py); v2: the Open Inference Protocol server (MLServer, "
                   "model_server/v2) (default: %(default)s)")
    p.add_argument("--model", default=DEFAULT_V2_MODEL, help="the v2 model name: imgsim, or the graph node's name "
                   "behind Seldon's executor (default: %(default)s)")
