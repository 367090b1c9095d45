"""The ``imgsim`` command: a thin map from subcommand to core function."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from imgsim import config, logs
from imgsim.errors import ImgsimError
from imgsim.split import SplitConfig
from imgsim.stages.settings import ExtractConfig, TrainConfig

STAGES = (("split", SplitConfig), ("train", TrainConfig), ("extract", ExtractConfig))
# main sets these itself: each step reads the previous step's artifact URI.
CHAINED = frozenset({"manifest_uri", "model_uri"})
# Names several stages declare with one meaning; any other shared name needs a stage-specific name instead
# (extract's inference batch is embed_batch_size, not train's batch_size).
SAME_MEANING = frozenset({"data_dir", "seed", "threads", "workers"})


def _split(ns):
    from imgsim.runs.split import run_split
    print(f"split run: {run_split(config.from_namespace(SplitConfig, ns))}")


def _train(ns):
    from imgsim.runs.train import run_train
    run_id, model_uri = run_train(config.from_namespace(TrainConfig, ns))
    if run_id:
        print(f"train run: {run_id}\nmodel: {model_uri}")


def _extract(ns):
    from imgsim.runs.extract import run_extract
    print(f"extract run: {run_extract(config.from_namespace(ExtractConfig, ns))}")


def _main(ns):
    from imgsim.result import MainResult
    from imgsim.runs.main import run_main
    result = MainResult(**run_main(*main_configs(ns).values()))
    if ns.result_file:  # the table comes with `imgsim report`, after what the caller does next
        print(f"main: {result.summary()}; `imgsim report {result.save(ns.result_file)}` shows runs and metrics")
    else:
        print(result.report())


def main_configs(ns) -> dict:
    """Each stage's config for ``main``: default < the file's section (or its flat keys) < flags the user gave.

    A flag applies to every stage that has a setting of that name (``seed`` to all three)."""
    sections = config.read_yaml(ns.config) if ns.config else {}
    unknown = set(sections) - {name for name, _ in STAGES}
    flat = {k: sections.pop(k) for k in unknown}
    names = {f.name for _, cls in STAGES for f in dataclasses.fields(cls)}
    if set(flat) - names:
        raise ImgsimError(f"config file {ns.config}: unknown key(s) {sorted(set(flat) - names)}; use the sections "
                          "split:, train:, extract: or settings of those stages")
    cfgs = {}
    for name, cls in STAGES:
        fields = {f.name for f in dataclasses.fields(cls)}
        from_file = {k: v for k, v in flat.items() if k in fields} | (sections.get(name) or {})
        from_flags = {k: getattr(ns, k, None) for k in fields - CHAINED}
        cfgs[name] = config.resolve(cls, None, from_file | config.given(from_flags))
    return cfgs


def shared_settings() -> dict[str, list[str]]:
    """Settings more than one stage declares, with those stages: ``main`` sets each of them in all, so they
    must mean the same in each (a test holds them to :data:`SAME_MEANING`): no flag silently means two things."""
    stages: dict[str, list[str]] = {}
    for name, cls in STAGES:
        for field in dataclasses.fields(cls):
            if field.name not in CHAINED:
                stages.setdefault(field.name, []).append(name)
    return {k: v for k, v in stages.items() if len(v) > 1}


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
    print(f"\nMLflow UI: mlflow ui --backend-store-uri {tracking.tracking_uri()} --port 8080  "
          "(then open http://127.0.0.1:8080)")


def _wait_ready(ns):
    from imgsim.serve import client
    seconds = client.wait_ready(ns.url, ns.timeout_s, ns.pid, ns.log)
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
    from imgsim.serve import client
    for image in ns.images:
        data = Path(image).read_bytes()
        answers = [("REST", client.query_rest(ns.url, data, ns.k))] if ns.url else []
        answers += [("gRPC", client.query_grpc(ns.grpc, data, ns.k))] if ns.grpc else []
        if not answers:
            raise ImgsimError("give --url http://HOST:9000 and/or --grpc HOST:5000")
        for protocol, answer in answers:
            print(client.format_table(f"{image} via {protocol}", answer))
        if ns.out:
            print(f"picture: {client.draw(data, answers[0][1], ns.gallery_root, Path(ns.out))}")


def _gallery_add(ns):
    from imgsim.runs.gallery import run_gallery_add
    from imgsim.stages.settings import AddConfig
    _print_change(run_gallery_add(config.from_namespace(AddConfig, ns), ns.images or None))


def _gallery_remove(ns):
    from imgsim.runs.gallery import run_gallery_remove
    from imgsim.stages.settings import RemoveConfig
    _print_change(run_gallery_remove(config.from_namespace(RemoveConfig, ns)))


def _print_change(summary: dict) -> None:
    for line in summary.pop("skipped"):
        print(f"  skipped {line}", file=sys.stderr)
    print(json.dumps(summary, indent=2))


def _duplicates(ns):
    from imgsim import duplicates
    if bool(ns.folder) == bool(ns.bundle):
        raise ImgsimError("give a folder of images or --bundle URI (one of them)")
    if ns.folder:
        report, root = duplicates.find_in_folder(ns.folder, ns.hash_distance), Path(ns.folder)
    else:
        from imgsim.runs import tracking
        from imgsim.runs.export import fetched_bundle
        tracking.setup()
        with fetched_bundle(ns.bundle) as folder:
            report, root = duplicates.find_in_bundle(folder, ns.hash_distance, ns.embedding_distance)
        root = Path(ns.root) if ns.root else root
    files = report.write(ns.out, root if root and Path(root).is_dir() else None)
    for path, why in report.skipped[:20]:
        print(f"  unreadable {path}: {why}", file=sys.stderr)
    print(json.dumps(report.counts() | {k: str(v) for k, v in files.items()}, indent=2))


def _rollout(ns):
    from imgsim.runs import rollout, tracking
    if ns.bundle.startswith(("runs:/", "models:/")):
        tracking.setup()
    result = rollout.rollout(ns.release, ns.bundle, namespace=ns.namespace, predictor=ns.predictor,
                             dry_run=ns.dry_run)
    print(json.dumps(result, indent=2))


def _ui(ns):
    from imgsim.serve.page import UiConfig, serve
    if ns.gallery_root and not Path(ns.gallery_root).is_dir():
        raise ImgsimError(f"--gallery-root {ns.gallery_root} is not a folder")
    # Flags win over IMGSIM_UI_* (as the chart sets them), which win over the defaults.
    cfg = UiConfig.from_env(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(UiConfig)})
    serve(dataclasses.replace(cfg, url=cfg.url.rstrip("/")), ns.host, ns.port)


def _add_operations_parsers(sub) -> None:
    """Living with a deployment: gallery changes, duplicates, rollout and the search page."""
    from imgsim import duplicates
    from imgsim.bundle import GALLERY_ALIAS, GALLERY_NAME
    from imgsim.serve.page import UiConfig
    from imgsim.stages.settings import AddConfig, RemoveConfig
    gallery = sub.add_parser("gallery", help="add or remove gallery images without retraining (a new bundle version)")
    actions = gallery.add_subparsers(dest="action", required=True)
    p = actions.add_parser("add", help="embed new images into a new gallery version; copies are skipped and reported")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files to add (or --folder DIR)")
    config.add_arguments(p, AddConfig)
    p.set_defaults(fn=_gallery_add)
    p = actions.add_parser("remove", help="remove images by id or path into a new gallery version")
    config.add_arguments(p, RemoveConfig)
    p.set_defaults(fn=_gallery_remove)
    p = sub.add_parser("duplicates", help="find exact and near-duplicate groups in a folder or a gallery")
    p.add_argument("folder", nargs="?", help="folder of images (perceptual hash)")
    p.add_argument("--bundle", help=f"or a gallery: folder, runs:/..., models:/{GALLERY_NAME}@{GALLERY_ALIAS} (hash + embedding)")
    p.add_argument("--root", help="with --bundle: where its images are, for the picture (default: the bundle's root)")
    p.add_argument("--hash-distance", type=int, default=duplicates.DEFAULT_HASH_DISTANCE,
                   help=f"most differing bits of 64 for a near copy (default {duplicates.DEFAULT_HASH_DISTANCE}; -1: exact only)")
    p.add_argument("--embedding-distance", type=float, default=duplicates.DEFAULT_EMBEDDING_DISTANCE,
                   help=f"with --bundle: largest cosine distance for a near copy (default {duplicates.DEFAULT_EMBEDDING_DISTANCE})")
    p.add_argument("--out", default="duplicates", help="folder for duplicates.csv and duplicates.png")
    p.set_defaults(fn=_duplicates)
    p = sub.add_parser("rollout", help="point a running SeldonDeployment at another bundle (rolling update)")
    p.add_argument("--release", required=True, help="the SeldonDeployment's name (the chart's full name)")
    p.add_argument("--bundle", required=True, help="s3://... / pvc://..., or runs:/ / models:/ whose artifact store the cluster reads")
    p.add_argument("--namespace", default="", help="default: the kube context's namespace")
    p.add_argument("--predictor", default="", help="only this predictor (default: all)")
    p.add_argument("--dry-run", action="store_true", help="let the API server validate the patch without applying it")
    p.set_defaults(fn=_rollout)
    p = sub.add_parser("ui", help="a search page for a running server: drop an image, browse its neighbours",
                       epilog="Every setting can also come from IMGSIM_UI_<NAME> (IMGSIM_UI_GALLERY_ROOT, ...), as the "
                              "chart sets them; a flag wins.")
    config.add_arguments(p, UiConfig, config_flag=False)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8501, help="port to listen on (default: %(default)s)")
    p.set_defaults(fn=_ui, log_level="INFO")  # a server: its start and requests are worth seeing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgsim", description="Image similarity search: split, train, extract, serve.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help=f"show every log line (MLflow's store set-up too); or set ${logs.LEVEL_ENV}=DEBUG/INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cls, fn, help_ in (("split", SplitConfig, _split, "validate images and write a stratified manifest"),
                                 ("train", TrainConfig, _train, "train the embedding model"),
                                 ("extract", ExtractConfig, _extract, "embed the gallery, build and evaluate the index")):
        p = sub.add_parser(name, help=help_)
        config.add_arguments(p, cls)
        p.set_defaults(fn=fn)
    p = sub.add_parser("main", help="split -> train -> extract in one tracked run; any stage's setting as a flag",
                       description="split -> train -> extract in one tracked run. Every stage's setting is a flag; "
                                   "a name several stages share means the same in each and sets it in each.")
    p.add_argument("--config", help="YAML file with optional split:, train:, extract: sections (or flat keys)")
    shared = shared_settings()
    seen: set[str] = set(CHAINED)
    for name, cls in STAGES:
        config.add_arguments(p, cls, skip=frozenset(seen), config_flag=False, title=name, shared=shared)
        seen |= {f.name for f in dataclasses.fields(cls)}
    p.add_argument("--result-file", "--result_file", dest="result_file",
                   help="also write the run ids, URIs and metrics as JSON here (for export, pick-image, report)")
    p.set_defaults(fn=_main)
    _add_helper_parsers(sub)
    _add_operations_parsers(sub)
    _verbose_everywhere(parser)
    return parser


def _verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """``--verbose`` after the command too (``imgsim main --verbose``), for every command and sub-command; and
    no abbreviated flags anywhere: ``--epoch`` silently meant ``--epochs``, and a script or a document using a
    prefix breaks the day a second flag shares it."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                child.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                   help="show every log line; or set $IMGSIM_LOG_LEVEL")
                _verbose_everywhere(child)


def _add_helper_parsers(sub) -> None:
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
    p.set_defaults(fn=_wait_ready)
    p = sub.add_parser("query", help="ask a running server for the images most similar to IMAGE")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files to query with")
    p.add_argument("--url", help="REST endpoint, e.g. http://127.0.0.1:9000")
    p.add_argument("--grpc", help="gRPC endpoint, e.g. 127.0.0.1:5000")
    p.add_argument("-k", type=int, default=5, help="neighbours per image (default: %(default)s)")
    p.add_argument("--out", help="write a PNG of the query beside its neighbours")
    p.add_argument("--gallery-root", help="local copy of the gallery, to draw the neighbours in --out")
    p.set_defaults(fn=_query)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logs.configure(ns.verbose, default=getattr(ns, "log_level", "WARNING"))
    try:
        ns.fn(ns)
    except ImgsimError as exc:
        command = " ".join(filter(None, (ns.command, getattr(ns, "action", None))))
        print(f"imgsim {command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
